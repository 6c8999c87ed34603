"""Exports of a committed separation run for downstream MIR jobs, as plain Parquet (pandas, DuckDB
and Hugging Face ``datasets`` read it directly).

- ``lyrics``: every present vocal stem cut into clips along its active segments, roughly
  ``min_s``-``max_s`` seconds as speech-data pipelines want them: neighbouring segments closer than
  ``merge_gap_s`` are joined while the clip stays under ``max_s``, longer segments are split into
  equal parts under ``max_s``, clips shorter than ``min_s`` are dropped. Each clip is written as FLAC
  (16 bit) under ``OUT/clips/<track_id>/<stem>-<start_ms>-<end_ms>.flac``; ``OUT/lyrics.parquet``
  has one row per clip (:data:`LYRICS_SCHEMA`).
- ``transcription``: one row per present ``bass`` / ``other`` / ``vocals`` stem with its URI in the
  run and its active segments (:data:`TRANSCRIPTION_SCHEMA`), in ``OUT/transcription.parquet``; no
  audio is copied.

Clip keys are deterministic and every file is written atomically, so a rerun rewrites the same
files and the same manifest (exports are cheap to redo; they are not sharded). Every URI in both
manifests is absolute (a local ``OUT`` is made absolute as a run's output root is,
:func:`demix.pipeline.io.output_root`), so they read the same from any working directory.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pyarrow as pa
import soundfile as sf

from demix.pipeline.batch.manifest import SEGMENT, parquet_bytes, read_manifests
from demix.pipeline.io import (
    AtomicOutput, atomic_write, audio_info, join, local_copy, output_root, read_slice, safe_component,
)

LYRICS_SCHEMA = pa.schema(
    [
        ("clip_uri", pa.string()),
        ("track_id", pa.string()),
        ("source_uri", pa.string()),
        ("stem", pa.string()),
        ("stem_uri", pa.string()),
        ("start_s", pa.float64()),
        ("end_s", pa.float64()),
        ("duration_s", pa.float64()),
        ("sample_rate", pa.int32()),
        ("channels", pa.int32()),
    ]
)

TRANSCRIPTION_SCHEMA = pa.schema(
    [
        ("track_id", pa.string()),
        ("source_uri", pa.string()),
        ("stem", pa.string()),
        ("uri", pa.string()),
        ("format", pa.string()),
        ("sample_rate", pa.int32()),
        ("channels", pa.int32()),
        ("duration_s", pa.float64()),
        ("presence_score", pa.float64()),
        ("active_s", pa.float64()),
        ("active_segments", pa.list_(SEGMENT)),
    ]
)

TASKS = ("lyrics", "transcription")
TRANSCRIPTION_STEMS = ("bass", "other", "vocals")


class ExportError(ValueError):
    """The run cannot be exported (nothing committed, no presence columns)."""


@dataclass(frozen=True)
class ClipRule:
    min_s: float = 3.0
    max_s: float = 30.0
    merge_gap_s: float = 1.0
    pad_s: float = 0.1

    def __post_init__(self) -> None:
        if not 0 < self.min_s <= self.max_s:
            raise ValueError(f"clip lengths need 0 < min_s <= max_s. Found: {self.min_s}, {self.max_s}")


def clip_spans(segments: Sequence[tuple[float, float]], duration_s: float, rule: ClipRule = ClipRule()) -> list[tuple[float, float]]:
    """Clip ``(start, end)`` spans in seconds from active ``segments`` under ``rule`` (see module doc)."""
    segs = sorted((max(0.0, a - rule.pad_s), min(duration_s, b + rule.pad_s)) for a, b in segments if b > a)
    merged: list[list[float]] = []
    for a, b in segs:
        if merged and a - merged[-1][1] <= rule.merge_gap_s and b - merged[-1][0] <= rule.max_s:
            merged[-1][1] = max(merged[-1][1], b)
        elif merged and a <= merged[-1][1]:  # overlapping after padding but too long to merge: abut
            merged.append([merged[-1][1], b])
        else:
            merged.append([a, b])
    out = []
    for a, b in merged:
        n = max(1, math.ceil((b - a) / rule.max_s - 1e-9))
        step = (b - a) / n
        for i in range(n):
            s, e = a + i * step, a + (i + 1) * step
            if e - s >= rule.min_s - 1e-9:
                out.append((round(s, 3), round(e, 3)))
    return out


def _committed(run: str) -> tuple[list[dict], dict[str, str]]:
    tables = read_manifests(run)
    tracks = tables["tracks"].to_pylist()
    if not tracks:
        raise ExportError(f"nothing committed under {run!r}: run `demix run CATALOG -o {run}` first")
    ok = {t["track_id"]: t["source_uri"] for t in tracks if t["status"] == "ok"}
    stems = [r for r in tables["stems"].to_pylist() if r["track_id"] in ok]
    if stems and all(r["present"] is None for r in stems):
        raise ExportError(f"the stems of {run!r} have no presence columns: rerun the separation with --presence classifier")
    return stems, ok


def export_transcription(run: str, out: str, *, stems: Sequence[str] = TRANSCRIPTION_STEMS) -> tuple[str, int]:
    """Write ``OUT/transcription.parquet``; returns its URI and row count."""
    rows_in, sources = _committed(run)
    out = output_root(out)
    rows = []
    for r in rows_in:
        if r["stem"] in stems and r["present"]:
            segs = r["active_segments"] or []
            rows.append({
                "track_id": r["track_id"], "source_uri": sources[r["track_id"]], "stem": r["stem"], "uri": r["uri"],
                "format": r["format"], "sample_rate": r["sample_rate"], "channels": r["channels"],
                "duration_s": r["duration_s"], "presence_score": r["presence_score"],
                "active_s": float(sum(s["end_s"] - s["start_s"] for s in segs)), "active_segments": segs,
            })
    uri = join(out, "transcription.parquet")
    atomic_write(uri, parquet_bytes(pa.Table.from_pylist(rows, schema=TRANSCRIPTION_SCHEMA)))
    return uri, len(rows)


def export_lyrics(run: str, out: str, *, rule: ClipRule = ClipRule(), stem: str = "vocals",
                  progress: Callable[[int, int], None] | None = None) -> tuple[str, int]:
    """Cut every present ``stem`` into clips and write ``OUT/lyrics.parquet``; returns its URI and clip count."""
    rows_in, sources = _committed(run)
    out = output_root(out)
    chosen = [r for r in rows_in if r["stem"] == stem and r["present"]]
    rows = []
    for i, r in enumerate(chosen):
        spans = clip_spans([(s["start_s"], s["end_s"]) for s in r["active_segments"] or []], r["duration_s"], rule)
        if spans:
            rows += _write_clips(r, sources[r["track_id"]], spans, out, stem)
        if progress is not None:
            progress(i + 1, len(chosen))
    uri = join(out, "lyrics.parquet")
    atomic_write(uri, parquet_bytes(pa.Table.from_pylist(rows, schema=LYRICS_SCHEMA)))
    return uri, len(rows)


def _write_clips(r: dict, source_uri: str, spans: Sequence[tuple[float, float]], out: str, stem: str) -> list[dict]:
    """Write the ``spans`` of the stem of stems row ``r`` as FLAC clips (committed together); their rows."""
    rows = []
    with local_copy(r["uri"]) as path, AtomicOutput() as staged:
        samplerate = audio_info(path).sample_rate
        for a, b in spans:
            start, stop = int(round(a * samplerate)), int(round(b * samplerate))
            audio, rate = read_slice(path, start / samplerate, (stop - start) / samplerate)  # (channels, frames)
            name = f"{safe_component(stem)}-{int(round(a * 1000)):08d}-{int(round(b * 1000)):08d}.flac"
            clip = join(out, "clips", r["track_id"], name)
            sf.write(staged.path_for(clip), audio.T, rate, subtype="PCM_16", format="FLAC")
            frames = audio.shape[1]
            rows.append({
                "clip_uri": clip, "track_id": r["track_id"], "source_uri": source_uri, "stem": stem,
                "stem_uri": r["uri"], "start_s": start / rate, "end_s": (start + frames) / rate,
                "duration_s": frames / rate, "sample_rate": rate, "channels": audio.shape[0],
            })
        staged.commit()
    return rows
