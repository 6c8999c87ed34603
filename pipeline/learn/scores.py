"""Per-track scores of one stem and their aggregation over tracks.

Aggregation follows the MUSDB / SiSEC convention: per track and stem the median over its scored
(non-NaN) windows, then per stem the median over tracks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

METRICS = ("sdr", "sir", "sar", "isr", "si_sdr")


@dataclass(frozen=True)
class TrackScores:
    """One stem of one track: medians over its scored windows (``frames`` of them), in dB.

    ``si_sdr`` is computed over the whole track. With ``frames == 0`` (every window NaN) the BSS Eval
    values are NaN.
    """

    track: str
    stem: str
    sdr: float
    sir: float
    sar: float
    isr: float
    si_sdr: float
    frames: int



def aggregate(scores: Iterable[TrackScores]) -> dict[str, dict[str, float]]:
    """Per stem, the median over tracks of each per-track median (the MUSDB convention).

    Returns:
        ``{stem: {"sdr", "sir", "sar", "isr", "si_sdr", "tracks", "scored", "frames"}}`` in the order
        stems first appear; ``tracks`` counts rows, ``scored`` the rows with at least one scored
        window (only they enter the BSS Eval medians), ``frames`` the scored windows. NaN when no track
        has a value.
    """
    by_stem: dict[str, list[TrackScores]] = {}
    for s in scores:
        by_stem.setdefault(s.stem, []).append(s)
    out: dict[str, dict[str, float]] = {}
    for stem, rows in by_stem.items():
        entry: dict[str, float] = {}
        for m in METRICS:
            values = np.array([getattr(r, m) for r in rows], np.float64)
            values = values[~np.isnan(values)]
            entry[m] = float(np.median(values)) if values.size else math.nan
        entry["tracks"] = len(rows)
        entry["scored"] = sum(1 for r in rows if r.frames > 0)
        entry["frames"] = sum(r.frames for r in rows)
        out[stem] = entry
    return out
