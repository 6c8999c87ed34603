"""The remix-dataset builder (Demucs' "unlabeled data remixing"): new, strongly labelled training
examples from a separated catalog.

For a track where stem ``S`` is absent (the presence detector says so), every other stem of that
track (the *recipient*) is kept, and ``S`` is taken from another track where it is present (the
*donor*). The example's stems are the recipient's separated stems (absent ones silent), the donor's
``S``, each with a random gain; the mixture is their exact sum, so the target for ``S`` is exactly
what was added, and the recipient's own mixture held no ``S`` to leak.

Planning (:func:`plan_remixes`) is a pure function of the committed run's manifests and the
:class:`RemixConfig`: example ``k`` draws from ``numpy.random.default_rng([seed, k])``, so the same
run and seed give the same examples, and asking for more examples later keeps the first ones. Each
example's id starts with a digest of the plan's inputs, so a rerun recognises committed examples.

Building one example (:func:`build_example`, run on the Ray layer by the flow):

- the recipient's stems are read over the example's window (the whole track, or ``seconds`` from a
  random offset);
- each donor candidate's tempo is estimated (onset autocorrelation), and the candidate whose tempo is
  closest to the recipient's (octave errors folded) is used: tempo-aware choice, no time stretching;
- the donor's ``S`` comes from its longest active segment, cut to a whole number of bars (4 beats at
  the donor's tempo) and looped with 10 ms crossfades to the example's length;
- gains are drawn per stem within ``gain_db``; if the mixture would peak above ``peak`` every stem
  is scaled by the same factor (recorded in the gains);
- stems and mixture are written as 32-bit float WAV in MUSDB layout,
  ``OUT/<split>/<example_id>/{mixture,<stems>}.wav``, all staged and committed together.

Lineage lands in ``OUT/manifests/remixes.parquet`` (:data:`REMIXES_SCHEMA`): per example the
recipient, the target stem, the donor, the seed, and per stem its source track, source URI, offset,
loop length, gain and role.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from demix.pipeline.io.storage import join

STEM_LINEAGE = pa.struct(
    [
        ("stem", pa.string()),
        ("uri", pa.string()),
        ("role", pa.string()),  # recipient | donor | silent
        ("source_track_id", pa.string()),
        ("source_stem_uri", pa.string()),
        ("offset_s", pa.float64()),
        ("loop_s", pa.float64()),
        ("gain_db", pa.float64()),
        ("active_s", pa.float64()),  # seconds of the example where this stem sounds (per presence)
    ]
)

REMIXES_SCHEMA = pa.schema(
    [
        ("example_id", pa.string()),
        ("index", pa.int64()),
        ("split", pa.string()),
        ("mixture_uri", pa.string()),
        ("target_stem", pa.string()),
        ("recipient_track_id", pa.string()),
        ("donor_track_id", pa.string()),
        ("recipient_tempo_bpm", pa.float64()),
        ("donor_tempo_bpm", pa.float64()),
        ("duration_s", pa.float64()),
        ("sample_rate", pa.int32()),
        ("seed", pa.int64()),
        ("plan_digest", pa.string()),
        ("run_uri", pa.string()),
        ("stems", pa.list_(STEM_LINEAGE)),
        ("attempt", pa.string()),
    ]
)


class RemixError(ValueError):
    """The run cannot be remixed (no presence columns, nothing absent, no donor)."""


@dataclass(frozen=True)
class RemixConfig:
    """What the builder makes.

    Attributes:
        examples: number of examples.
        seed: seeds every random choice.
        seconds: length of each example; ``None`` keeps the recipient's whole length.
        gain_db: range of the random gain of every stem, in dB.
        split: MUSDB-layout folder the examples go to (``train`` by default).
        donor_candidates: donors considered per example (the tempo-closest is used).
        min_donor_active_s: a donor's stem must be active at least this long in total.
        peak: largest absolute sample of a mixture; louder mixtures are scaled down, stems alike.
    """

    examples: int
    seed: int = 0
    seconds: float | None = None
    gain_db: tuple[float, float] = (-3.0, 3.0)
    split: str = "train"
    donor_candidates: int = 4
    min_donor_active_s: float = 2.0
    peak: float = 0.95

    def __post_init__(self) -> None:
        if self.examples < 1:
            raise ValueError(f"examples must be >= 1. Found: {self.examples}")
        if self.seconds is not None and not self.seconds > 0:
            raise ValueError(f"seconds must be > 0. Found: {self.seconds}")
        lo, hi = self.gain_db
        if lo > hi:
            raise ValueError(f"gain_db must be (low, high) with low <= high. Found: {self.gain_db}")
        if self.donor_candidates < 1:
            raise ValueError(f"donor_candidates must be >= 1. Found: {self.donor_candidates}")
        if not 0 < self.peak <= 1:
            raise ValueError(f"peak must be in (0, 1]. Found: {self.peak}")
        if not self.split or "/" in self.split:
            raise ValueError(f"split must be a plain folder name. Found: {self.split!r}")


@dataclass(frozen=True)
class StemSource:
    """One committed stem of the run."""

    track_id: str
    stem: str
    uri: str
    duration_s: float
    sample_rate: int
    present: bool
    segments: tuple[tuple[float, float], ...]

    @property
    def active_s(self) -> float:
        return sum(e - s for s, e in self.segments)

    @staticmethod
    def from_dict(data: dict) -> StemSource:
        """Inverse of ``asdict`` (segments come back from JSON as lists)."""
        return StemSource(**{**data, "segments": tuple(tuple(x) for x in data["segments"])})


@dataclass(frozen=True)
class Recipe:
    """Everything :func:`build_example` needs for one example (plain data, JSON-able)."""

    example_id: str
    index: int
    target_stem: str
    stems: tuple[str, ...]
    recipient: dict  # stem -> asdict(StemSource) for every stem of the recipient track
    donors: tuple[dict, ...]  # asdict(StemSource) of each candidate's target stem, in preference order
    donor_beats: tuple[str | None, ...]  # a rhythm stem URI per candidate for its tempo (drums), or None
    offset_s: float
    seconds: float
    gains_db: dict  # stem -> dB drawn at plan time
    seed: int
    plan_digest: str
    run_uri: str
    split: str
    peak: float
    out: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str) -> Recipe:
        data = json.loads(text)
        return Recipe(**{**data, "stems": tuple(data["stems"]), "donors": tuple(data["donors"]), "donor_beats": tuple(data["donor_beats"])})


def stem_sources(stems_table: pa.Table, tracks_table: pa.Table | None = None) -> dict[str, dict[str, StemSource]]:
    """``{track_id: {stem: StemSource}}`` from a run's consolidated manifests (ok tracks only).

    Raises:
        RemixError: when the run has no presence columns filled.
    """
    ok = None
    if tracks_table is not None:
        ok = {r["track_id"] for r in tracks_table.select(["track_id", "status"]).to_pylist() if r["status"] == "ok"}
    out: dict[str, dict[str, StemSource]] = {}
    missing = 0
    for r in stems_table.to_pylist():
        if ok is not None and r["track_id"] not in ok:
            continue
        if r["present"] is None:
            missing += 1
            continue
        segs = tuple((float(s["start_s"]), float(s["end_s"])) for s in (r["active_segments"] or []))
        out.setdefault(r["track_id"], {})[r["stem"]] = StemSource(
            r["track_id"], r["stem"], r["uri"], float(r["duration_s"]), int(r["sample_rate"]), bool(r["present"]), segs
        )
    if missing and not out:
        raise RemixError(
            "the run's stems manifest has no presence columns (present/active_segments are null): rerun the "
            "separation with `demix run ... --presence classifier` (or energy) into a new output root"
        )
    return out


def _digest(sources: Mapping[str, Mapping[str, StemSource]], config: RemixConfig, run_uri: str) -> str:
    payload = {
        "stems": sorted((s.track_id, s.stem, s.uri, s.present, s.segments) for t in sources.values() for s in t.values()),
        "config": {k: v for k, v in asdict(config).items() if k != "examples"},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=list).encode()).hexdigest()[:10]


def plan_remixes(sources: Mapping[str, Mapping[str, StemSource]], config: RemixConfig, *, run_uri: str, out: str) -> list[Recipe]:
    """The recipes of ``config.examples`` examples (see the module docstring); deterministic.

    Raises:
        RemixError: no (track, absent stem) pair has a donor.
    """
    order = ("vocals", "drums", "bass", "other")
    names = sorted({s for t in sources.values() for s in t}, key=lambda s: (order.index(s) if s in order else 9, s))
    track_ids = sorted(sources)
    donors = {
        s: [t for t in track_ids if s in sources[t] and sources[t][s].present and sources[t][s].active_s >= config.min_donor_active_s]
        for s in names
    }
    pairs = [
        (t, s) for t in track_ids for s in names
        if s in sources[t] and not sources[t][s].present
        and any(o.present for k, o in sources[t].items() if k != s)
        and any(d != t for d in donors[s])
    ]
    if not pairs:
        absent = sum(1 for t in track_ids for s in sources[t].values() if not s.present)
        raise RemixError(
            f"nothing to remix: {len(track_ids)} tracks, {absent} absent stems, and no absent stem has a donor track "
            f"with that stem active for >= {config.min_donor_active_s:g} s"
        )
    digest = _digest(sources, config, run_uri)
    cover = np.random.default_rng([config.seed, 2**31]).permutation(len(pairs))  # every pair once before repeats
    recipes = []
    for k in range(config.examples):
        rng = np.random.default_rng([config.seed, k])
        track, stem = pairs[int(cover[k % len(pairs)])]
        pool = [d for d in donors[stem] if d != track]
        picks = rng.choice(len(pool), size=min(config.donor_candidates, len(pool)), replace=False)
        cands = [pool[int(i)] for i in picks]
        duration = min(s.duration_s for s in sources[track].values())
        seconds = duration if config.seconds is None or config.seconds >= duration else float(config.seconds)
        offset = float(rng.uniform(0.0, duration - seconds)) if seconds < duration else 0.0
        lo, hi = config.gain_db
        gains = {s: float(rng.uniform(lo, hi)) for s in names}
        beats = tuple(
            sources[c]["drums"].uri if "drums" in sources[c] and sources[c]["drums"].present and stem != "drums" else None
            for c in cands
        )
        recipes.append(
            Recipe(
                example_id=f"rmx-{digest}-{k:06d}", index=k, target_stem=stem, stems=tuple(names),
                recipient={s: asdict(v) for s, v in sources[track].items()},
                donors=tuple(asdict(sources[c][stem]) for c in cands), donor_beats=beats,
                offset_s=round(offset, 6), seconds=round(seconds, 6), gains_db=gains, seed=config.seed,
                plan_digest=digest, run_uri=run_uri, split=config.split, peak=config.peak, out=out,
            )
        )
    return recipes


# --------------------------------------------------------------------------------------------------
# Audio helpers
# --------------------------------------------------------------------------------------------------


def _read(uri: str, start: int = 0, frames: int = -1) -> tuple[np.ndarray, int]:
    """``(channels, time)`` float32 and the rate of ``uri`` from ``start`` (``frames`` or the rest)."""
    import soundfile as sf

    from demix.pipeline.io.audio import AudioError
    from demix.pipeline.io.storage import local_copy

    with local_copy(uri) as path:
        try:
            data, rate = sf.read(path, start=start, frames=frames, dtype="float32", always_2d=True)
        except Exception as err:  # noqa: BLE001 - libsndfile's errors come in several types
            raise AudioError(uri, f"cannot decode {uri!r}: {type(err).__name__}: {err}", stage="decode") from err
    return np.ascontiguousarray(data.T), int(rate)


def estimate_tempo(audio: np.ndarray, sample_rate: int, *, low_bpm: float = 70.0, high_bpm: float = 180.0) -> float | None:
    """Tempo in BPM of ``(channels, time)`` audio from the autocorrelation of its spectral-flux onset
    envelope (hop 512), weighted towards 120 BPM; ``None`` when the audio is silent or too short."""
    import torch

    mono = torch.from_numpy(np.asarray(audio, np.float32).mean(0))
    hop = 512
    if mono.numel() < 8 * 2048 or float(mono.abs().max()) == 0.0:
        return None
    spec = torch.stft(mono, 2048, hop, window=torch.hann_window(2048), return_complex=True).abs()
    logspec = torch.log1p(100.0 * spec)
    flux = torch.relu(logspec[:, 1:] - logspec[:, :-1]).sum(0).numpy().astype(np.float64)
    flux -= flux.mean()
    if not np.any(flux):
        return None
    n = len(flux)
    ac = np.fft.irfft(np.abs(np.fft.rfft(flux, 2 * n)) ** 2)[:n]
    frame_rate = sample_rate / hop
    lags = np.arange(max(1, int(frame_rate * 60 / high_bpm)), min(n - 1, int(frame_rate * 60 / low_bpm)) + 1)
    if len(lags) < 2:
        return None
    bpm = 60.0 * frame_rate / lags
    weight = np.exp(-0.5 * (np.log2(bpm / 120.0) / 1.0) ** 2)
    best = lags[int(np.argmax(ac[lags] * weight))]
    # parabolic refinement of the peak
    a, b, c = ac[best - 1], ac[best], ac[min(best + 1, n - 1)]
    shift = 0.5 * (a - c) / (a - 2 * b + c) if (a - 2 * b + c) != 0 else 0.0
    return float(60.0 * frame_rate / (best + float(np.clip(shift, -0.5, 0.5))))


def tempo_distance(a: float | None, b: float | None) -> float:
    """Distance in octaves between two tempi, octave errors folded (``inf`` when one is unknown)."""
    if not a or not b:
        return math.inf
    d = abs(math.log2(a / b)) % 1.0
    return min(d, 1.0 - d)


def loop_to_length(x: np.ndarray, length: int, sample_rate: int, fade_s: float = 0.01) -> np.ndarray:
    """Repeat ``x`` ``(channels, n)`` to ``length`` samples with ``fade_s`` crossfades at the seams."""
    n = x.shape[-1]
    if n >= length:
        return x[:, :length].copy()
    fade = min(int(fade_s * sample_rate), n // 4)
    out = np.zeros((x.shape[0], length), np.float32)
    out[:, :n] = x
    pos = n
    ramp = np.linspace(0.0, 1.0, fade, dtype=np.float32) if fade else np.zeros(0, np.float32)
    while pos < length:
        start = pos - fade  # overlap the seam by `fade` samples
        take = min(n, length - start)
        piece = x[:, :take].copy()
        if fade:
            k = min(fade, take)
            out[:, start : start + k] *= 1.0 - ramp[:k]
            piece[:, :k] *= ramp[:k]
        out[:, start : start + take] += piece
        pos = start + take
    return out


def example_uri(recipe: Recipe, name: str) -> str:
    return join(recipe.out, recipe.split, recipe.example_id, f"{name}.wav")


def build_example(recipe: Recipe) -> dict:
    """Read, mix and write one example; return its ``remixes`` row (see :data:`REMIXES_SCHEMA`).

    Raises:
        demix.pipeline.engine.separate.TrackError: naming the example and the stage (read, decode, remix, write).
    """
    from demix.pipeline.engine.separate import TrackError, _stage_of

    try:
        return _build(recipe)
    except TrackError:
        raise
    except Exception as err:  # noqa: BLE001 - one typed, staged error per example
        raise TrackError(recipe.example_id, _stage_of(err, "remix"), err) from err


def _build(recipe: Recipe) -> dict:
    from demix.pipeline.io.storage import AtomicOutput
    from demix.pipeline.io import write_float_wav

    rec = {s: StemSource.from_dict(v) for s, v in recipe.recipient.items()}
    rate = next(iter(rec.values())).sample_rate
    start = int(round(recipe.offset_s * rate))
    length = int(round(recipe.seconds * rate))
    stems: dict[str, np.ndarray] = {}
    lineage: dict[str, dict] = {}
    channels = 2
    for s in recipe.stems:
        src = rec.get(s)
        if s == recipe.target_stem or src is None or not src.present:
            continue
        audio, r = _read(src.uri, start, length)
        channels = audio.shape[0]
        stems[s] = np.pad(audio, ((0, 0), (0, length - audio.shape[-1])))
        window = (recipe.offset_s, recipe.offset_s + recipe.seconds)
        active = sum(max(0.0, min(b, window[1]) - max(a, window[0])) for a, b in src.segments)
        lineage[s] = {"role": "recipient", "source_track_id": src.track_id, "source_stem_uri": src.uri,
                      "offset_s": recipe.offset_s, "loop_s": None, "active_s": round(active, 4)}
    # tempo of the recipient: its drums when present, else the sum of what it has
    beat_ref = stems.get("drums")
    if beat_ref is None and stems:
        beat_ref = sum(stems.values())
    rec_tempo = estimate_tempo(beat_ref, rate) if beat_ref is not None else None
    best, best_d, donor_tempo = 0, math.inf, None
    for i, (d, beat_uri) in enumerate(zip(recipe.donors, recipe.donor_beats)):
        try:
            audio, r = _read(beat_uri or d["uri"], 0, min(int(60 * rate), int(d["duration_s"] * rate)))
            tempo = estimate_tempo(audio, r)
        except Exception:  # noqa: BLE001 - an unreadable candidate is just not preferred; the chosen donor is read below
            tempo = None
        dist = tempo_distance(rec_tempo, tempo)
        if i == 0 or dist < best_d:
            best, best_d, donor_tempo = i, dist, tempo
    donor = StemSource.from_dict(recipe.donors[best])
    seg = max(donor.segments, key=lambda ab: ab[1] - ab[0])
    seg_len = seg[1] - seg[0]
    bar = 4 * 60.0 / donor_tempo if donor_tempo else None
    loop_s = seg_len if not bar or seg_len < bar else math.floor(seg_len / bar) * bar
    audio, r = _read(donor.uri, int(round(seg[0] * rate)), max(1, int(round(loop_s * rate))))
    if audio.shape[0] != channels:
        audio = np.repeat(audio.mean(0, keepdims=True), channels, 0)
    stems[recipe.target_stem] = loop_to_length(audio, length, rate)
    lineage[recipe.target_stem] = {"role": "donor", "source_track_id": donor.track_id, "source_stem_uri": donor.uri,
                                   "offset_s": seg[0], "loop_s": loop_s if loop_s * rate < length else None,
                                   "active_s": round(length / rate, 4)}  # cut from one active segment
    gains = {s: 10 ** (recipe.gains_db[s] / 20) for s in stems}
    mix = np.zeros((channels, length), np.float32)
    for s in stems:
        stems[s] = (stems[s] * np.float32(gains[s])).astype(np.float32)
    peak = float(max((np.abs(sum(stems.values())).max() if stems else 0.0), 1e-12))
    scale = min(1.0, recipe.peak / peak)
    for s in list(stems):
        stems[s] = (stems[s] * np.float32(scale)).astype(np.float32)
    for s in recipe.stems:
        if s not in stems:
            stems[s] = np.zeros((channels, length), np.float32)
            lineage[s] = {"role": "silent", "source_track_id": None, "source_stem_uri": None, "offset_s": None, "loop_s": None,
                          "active_s": 0.0}
    for s in recipe.stems:
        mix += stems[s]
    with AtomicOutput() as staged:
        for name, audio in [("mixture", mix), *((s, stems[s]) for s in recipe.stems)]:
            write_float_wav(staged.path_for(example_uri(recipe, name)), audio, rate)  # fixed bytes: no PEAK time stamp
        staged.commit()
    scale_db = 20 * math.log10(scale)
    return {
        "example_id": recipe.example_id, "index": recipe.index, "split": recipe.split,
        "mixture_uri": example_uri(recipe, "mixture"), "target_stem": recipe.target_stem,
        "recipient_track_id": next(iter(rec.values())).track_id, "donor_track_id": donor.track_id,
        "recipient_tempo_bpm": rec_tempo, "donor_tempo_bpm": donor_tempo, "duration_s": length / rate,
        "sample_rate": rate, "seed": recipe.seed, "plan_digest": recipe.plan_digest, "run_uri": recipe.run_uri,
        "stems": [
            {"stem": s, "uri": example_uri(recipe, s), **lineage[s],
             "gain_db": (recipe.gains_db[s] + scale_db) if lineage[s]["role"] != "silent" else None}
            for s in recipe.stems
        ],
    }


TRUTH_MIN_ACTIVE_S = 0.25
"""A stem counts as present in an example's ``truth.json`` when it sounds at least this long in it."""


def truth_of(rows: Sequence[dict]) -> dict[str, dict[str, bool]]:
    """``truth.json`` content of a remix split: which stems sound in each example (a recipient stem
    that is silent over the example's window counts as absent)."""
    return {
        r["example_id"]: {s["stem"]: s["role"] != "silent" and (s["active_s"] or 0.0) >= TRUTH_MIN_ACTIVE_S for s in r["stems"]}
        for r in rows
    }


def consolidated(out: str) -> tuple[pa.Table, pa.Table]:
    """The committed view of a remix output root: ``(remixes, failures)``, one row per example.

    An example committed twice (two runs racing, a retried shard) keeps its latest ``ok`` row; its
    files are the same either way (deterministic keys and content). A failure row is kept only for
    examples that never succeeded.
    """
    from demix.pipeline.batch.manifest import FAILURES_SCHEMA, read_committed

    remixes, commits = read_committed(out, "remixes", REMIXES_SCHEMA)
    failures, _ = read_committed(out, "failures", FAILURES_SCHEMA)
    when = {c.attempt: c.committed_at for c in commits}
    best: dict[str, dict] = {}
    for r in remixes.to_pylist():
        if r["example_id"] not in best or when.get(r["attempt"], "") > when.get(best[r["example_id"]]["attempt"], ""):
            best[r["example_id"]] = r
    failed: dict[str, dict] = {}
    for r in failures.to_pylist():
        if r["track_id"] not in best:
            if r["track_id"] not in failed or when.get(r["attempt"], "") > when.get(failed[r["track_id"]]["attempt"], ""):
                failed[r["track_id"]] = r
    rows = sorted(best.values(), key=lambda r: r["example_id"])
    return (pa.Table.from_pylist(rows, schema=REMIXES_SCHEMA),
            pa.Table.from_pylist(sorted(failed.values(), key=lambda r: r["track_id"]), schema=FAILURES_SCHEMA))


def committed_examples(out: str) -> set[str]:
    """Example ids already committed ``ok`` under ``out`` (what a rerun skips)."""
    from demix.pipeline.batch.manifest import read_committed

    table, _ = read_committed(out, "remixes", REMIXES_SCHEMA)
    return set(table.column("example_id").to_pylist())
