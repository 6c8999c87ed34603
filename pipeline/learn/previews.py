"""The evaluation report's listening samples: a short clip of the best and the worst tracks (mean SDR
over their scored stems), estimate and reference side by side.

Which tracks are best and worst is known only once every track is scored, and estimates are not kept
on disk, so :class:`PreviewPicker` holds clips (``seconds`` long, never whole tracks) of the tracks
that are among the best or worst ``k`` so far, and drops the others as the evaluation goes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from demix.pipeline.io import join, safe_component
from demix.pipeline.io.pages import href, publish
from demix.pipeline.io.plots import preview_mp3, spectrogram_png
from demix.pipeline.learn.scores import TrackScores
from demix.pipeline.stems import MIXTURE

PREVIEW_S = 10.0
"""Seconds of each evaluation preview clip by default."""


@dataclass
class TrackClips:
    """A track's clips: the window's start, the mixture, and per scored stem reference and estimate
    (``(channels, time)`` at ``rate``), with the stem's SDR."""

    track: str
    mean_sdr: float
    start_s: float
    rate: int
    mixture: np.ndarray
    references: dict[str, np.ndarray]
    estimates: dict[str, np.ndarray]
    sdr: dict[str, float]


def loudest_window(mixture: np.ndarray, rate: int, seconds: float) -> int:
    """The first sample of the ``seconds`` window of ``mixture`` with the most energy (whole seconds)."""
    length, total = int(round(seconds * rate)), mixture.shape[-1]
    if total <= length:
        return 0
    energy = np.square(np.asarray(mixture, np.float64)).sum(0)
    per_s = np.add.reduceat(energy, np.arange(0, total, rate))
    span = max(1, int(seconds))
    sums = np.convolve(per_s, np.ones(span), mode="valid")
    start = int(np.argmax(sums)) * rate
    return min(start, total - length)


class PreviewPicker:
    """Keeps the clips of the ``k`` best and ``k`` worst tracks offered (by mean SDR, NaN stems left out)."""

    def __init__(self, k: int = 2, seconds: float = PREVIEW_S) -> None:
        if k < 0 or seconds <= 0:
            raise ValueError(f"PreviewPicker: k must be >= 0 and seconds > 0. Found: k={k}, seconds={seconds}")
        self.k, self.seconds = k, seconds
        self.means: dict[str, float] = {}
        self.kept: dict[str, TrackClips] = {}

    def _ranked(self) -> list[str]:
        return sorted(self.means, key=lambda t: (-self.means[t], t))

    def _wanted(self) -> set[str]:
        ranked = self._ranked()
        return set(ranked[: self.k]) | set(ranked[max(self.k, len(ranked) - self.k):])

    def offer(
        self, track: str, scores: Sequence[TrackScores], mixture: np.ndarray, references: Mapping[str, np.ndarray],
        estimates: Mapping[str, np.ndarray], rate: int,
    ) -> None:
        """Consider one scored track; its clips are kept while it ranks among the best or worst ``k``."""
        sdr = {s.stem: s.sdr for s in scores if math.isfinite(s.sdr)}
        if not sdr or not self.k:
            return
        self.means[track] = float(np.mean(list(sdr.values())))
        wanted = self._wanted()
        for name in [t for t in self.kept if t not in wanted]:
            del self.kept[name]
        if track not in wanted:
            return
        start = loudest_window(mixture, rate, self.seconds)
        cut = slice(start, start + int(round(self.seconds * rate)))
        self.kept[track] = TrackClips(
            track=track, mean_sdr=self.means[track], start_s=start / rate, rate=rate,
            mixture=np.array(mixture[:, cut], np.float32),
            references={s: np.array(references[s][:, cut], np.float32) for s in sdr},
            estimates={s: np.array(np.asarray(estimates[s])[:, cut], np.float32) for s in sdr},
            sdr=sdr,
        )

    def picked(self) -> tuple[list[TrackClips], list[TrackClips]]:
        """``(best, worst)``: best first, worst last; a track is in one list only (with fewer than ``2k``
        tracks the best take the upper half)."""
        ranked = [t for t in self._ranked() if t in self.kept]
        n_best = min(self.k, math.ceil(len(ranked) / 2))
        best = ranked[:n_best]
        worst = [t for t in ranked[n_best:]][-self.k:] if self.k else []
        return [self.kept[t] for t in best], [self.kept[t] for t in worst]


def write_previews(root: str, clips: TrackClips) -> dict[str, dict[str, str]]:
    """Write the MP3 and spectrogram PNG of each clip of ``clips`` under ``root/media/<track>/``; returns
    ``{name: {"mp3": link, "png": link}}`` (links relative to ``root``) for ``mixture`` and each
    ``<stem>-reference`` / ``<stem>-estimate``.

    Raises:
        StorageError: a file cannot be written. AudioError: a clip cannot be encoded.
    """
    folder = ("media", safe_component(clips.track))
    named = {MIXTURE: clips.mixture}
    for stem in clips.sdr:
        named[f"{stem}-reference"] = clips.references[stem]
        named[f"{stem}-estimate"] = clips.estimates[stem]
    links = {}
    for name, audio in named.items():
        publish(join(root, *folder, f"{name}.mp3"), preview_mp3(audio, clips.rate))
        publish(join(root, *folder, f"{name}.png"), spectrogram_png(audio, clips.rate))
        links[name] = {"mp3": href(*folder, f"{name}.mp3"), "png": href(*folder, f"{name}.png")}
    return links
