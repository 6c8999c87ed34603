"""Weakly supervised remix examples: an UNLABELLED track's original excerpt plus a LABELLED song's true stem.

The strong kind (:func:`demix.pipeline.batch.remix.plan.plan_remixes`) takes every target from the
separator's estimates, so the model learns its own mistakes back. The weak kind uses only what is known:

- the *recipient* is an unlabelled track of a committed catalog run. Its presence segments (the stems
  manifest's ``active_segments``) say where stem ``S`` sounds; the example's window lies where ``S`` is
  inactive (outside every active segment widened by ``margin_s``) for the example's whole length. The
  window is cut from the track's ORIGINAL audio (the tracks manifest's ``source_uri``), not from a
  separated stem: nothing the separator made enters the example;
- the *donor* is a song of a labelled MUSDB-layout dataset (true stems; ``truth.json`` passes over songs
  where ``S`` is absent). As in the strong kind, the tempo-closest of a few candidates is used; its ``S``
  is cut from its longest active stretch (an energy gate, there being no presence columns for labelled
  songs), in whole bars, and looped with crossfades to the example's length;
- each part gets a random gain (``gain_db``), both are scaled alike when the sum would peak above ``peak``.

Files, ``OUT/<split>/<example_id>/``: ``mixture.wav`` (= ``rest.wav`` + ``<S>.wav``, float32),
``<S>.wav`` (exactly what was added: a known target), ``rest.wav`` (the recipient's excerpt with its gain:
the known SUM of the other stems) and ``weak.json`` ``{"known": [S], "rest_of": [the other stems],
"rest": "rest", ...}``. The training side (:mod:`demix.pipeline.data.weak`,
:func:`demix.pipeline.learn.masked.masked_loss`) reads them and fits ``S`` and the sum of the other
estimates to ``rest``; nothing constrains how the model splits ``rest`` among those stems.

Lineage rows are the ``remixes`` rows of the strong kind, with two parts in ``stems``: ``S`` (role
``donor``; ``source_track_id`` the labelled song, ``source_stem_uri`` its stem file inside the labelled
dataset) and ``rest`` (role ``recipient``; ``source_stem_uri`` the recipient's source audio). Example ids
start with ``wk-`` and a digest of the plan's inputs (run stems, labelled songs, config); as in the strong
kind example ``k`` draws from ``default_rng([seed, k])`` alone, so a rerun is exactly once and a larger
``examples`` extends the set.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa

from demix.pipeline.batch.remix.plan import Recipe, RemixConfig, RemixError, StemSource
from demix.pipeline.io import audio_info
from demix.pipeline.stems import STEMS

DEFAULT_WEAK_SECONDS = 6.0
"""Example length of weak examples when ``RemixConfig.seconds`` is ``None``."""

SILENCE_MARGIN_S = 0.25
"""Active segments are widened by this much on each side before looking for silent windows."""


def labelled_donors(root: str | Path, stems: tuple[str, ...]) -> dict[str, list[StemSource]]:
    """``{stem: [StemSource]}`` of the labelled MUSDB-layout dataset at ``root`` (local folder): every
    song folder with ``mixture.wav`` and that stem, unless its ``truth.json`` marks the stem absent.
    A donor's ``segments`` is its whole length (the build finds the active stretch).

    Raises:
        RemixError: ``root`` is not a folder or holds no song.
    """
    folder = Path(root).expanduser()
    if not folder.is_dir():
        raise RemixError(f"labelled dataset folder not found: {folder}")
    truth_path = folder / "truth.json"
    truth = json.loads(truth_path.read_text()) if truth_path.is_file() else {}
    songs = sorted(p for p in folder.iterdir() if p.is_dir() and (p / "mixture.wav").is_file())
    if not songs:
        raise RemixError(f"labelled dataset {folder} holds no song folders (<song>/mixture.wav)")
    out: dict[str, list[StemSource]] = {s: [] for s in stems}
    for song in songs:
        for stem in stems:
            path = song / f"{stem}.wav"
            if not path.is_file() or not truth.get(song.name, {}).get(stem, True):
                continue
            info = audio_info(str(path))
            seconds = float(info.frames) / info.sample_rate
            out[stem].append(StemSource(song.name, stem, str(path.resolve()), seconds, int(info.sample_rate), True, ((0.0, seconds),)))
    return out


def silent_windows(src: StemSource | None, duration: float, seconds: float, margin: float = SILENCE_MARGIN_S) -> list[tuple[float, float]]:
    """Ranges ``(first, last)`` of window starts in ``[0, duration]`` whose ``seconds`` lie wholly outside
    ``src``'s active segments, each widened by ``margin`` (``src`` ``None``: the stem was not separated,
    so nothing is known to be silent, and there is no window)."""
    if src is None:
        return []
    busy = sorted((max(0.0, a - margin), min(duration, b + margin)) for a, b in src.segments)
    gaps, pos = [], 0.0
    for a, b in busy:
        if a > pos:
            gaps.append((pos, a))
        pos = max(pos, b)
    if duration > pos:
        gaps.append((pos, duration))
    return [(a, round(b - seconds, 6)) for a, b in gaps if b - a >= seconds - 1e-9]


def _digest(sources: Mapping[str, Mapping[str, StemSource]], donors: Mapping[str, list[StemSource]], config: RemixConfig,
            mixtures: Mapping[str, str]) -> str:
    payload = {
        "kind": "weak",
        "stems": sorted((s.track_id, s.stem, s.present, s.segments) for t in sources.values() for s in t.values()),
        "mixtures": sorted(mixtures.items()),
        "donors": sorted((d.track_id, d.stem, round(d.duration_s, 3)) for v in donors.values() for d in v),
        "config": {k: v for k, v in asdict(config).items() if k != "examples"},
        "margin": SILENCE_MARGIN_S,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=list).encode()).hexdigest()[:10]


def _mixtures(tracks_table: pa.Table) -> dict[str, str]:
    """``{track_id: source_uri}`` of the run's ok tracks."""
    return {r["track_id"]: r["source_uri"] for r in tracks_table.select(["track_id", "source_uri", "status"]).to_pylist()
            if r["status"] == "ok"}


def plan_weak(  # long: one pass over pairs, then one recipe per example, as plan_remixes
    sources: Mapping[str, Mapping[str, StemSource]], tracks_table: pa.Table, labelled: str, config: RemixConfig, *,
    run_uri: str, out: str,
) -> list[Recipe]:
    """The recipes of ``config.examples`` weak examples (see the module docstring); deterministic.

    Raises:
        RemixError: no (track, stem) has a silent window of the example's length and a labelled donor.
    """
    seconds = float(config.seconds or DEFAULT_WEAK_SECONDS)
    names = tuple(sorted({s for t in sources.values() for s in t}, key=lambda s: (STEMS.index(s) if s in STEMS else 9, s)))
    mixtures = _mixtures(tracks_table)
    donors = labelled_donors(labelled, names)
    pairs = []
    for t in sorted(sources):
        if t not in mixtures:
            continue
        duration = min(s.duration_s for s in sources[t].values())
        for s in names:
            windows = silent_windows(sources[t].get(s), duration, seconds)
            if windows and donors[s] and any(o.present for k, o in sources[t].items() if k != s):
                pairs.append((t, s, windows))
    if not pairs:
        raise RemixError(
            f"nothing to remix weakly: no track of the run ({len(sources)} tracks) has a stem silent for {seconds:g} s "
            f"(outside its active segments, {SILENCE_MARGIN_S:g} s margin) that a song of {labelled} can fill"
        )
    digest = _digest(sources, donors, config, mixtures)
    cover = np.random.default_rng([config.seed, 2**31]).permutation(len(pairs))
    recipes = []
    for k in range(config.examples):
        rng = np.random.default_rng([config.seed, k])
        track, stem, windows = pairs[int(cover[k % len(pairs)])]
        spans = np.array([b - a for a, b in windows]) + 1e-3
        a, b = windows[int(rng.choice(len(windows), p=spans / spans.sum()))]
        offset = float(rng.uniform(a, b)) if b > a else a
        pool = donors[stem]
        cands = [pool[int(i)] for i in rng.choice(len(pool), size=min(config.donor_candidates, len(pool)), replace=False)]
        lo, hi = config.gain_db
        gains = {stem: float(rng.uniform(lo, hi)), "rest": float(rng.uniform(lo, hi))}
        drums = {d.track_id: d.uri for d in donors.get("drums", [])}
        beats = tuple(drums.get(c.track_id) if stem != "drums" else None for c in cands)
        recipes.append(
            Recipe(
                example_id=f"wk-{digest}-{k:06d}", index=k, target_stem=stem, stems=names,
                recipient={s: asdict(v) for s, v in sources[track].items()},
                donors=tuple(asdict(c) for c in cands), donor_beats=beats,
                offset_s=round(offset, 6), seconds=round(seconds, 6), gains_db=gains, seed=config.seed,
                plan_digest=digest, run_uri=run_uri, split=config.split, peak=config.peak, out=out,
                kind="weak", mixture_uri=mixtures[track], labelled=str(Path(labelled).expanduser().resolve()),
            )
        )
    return recipes
