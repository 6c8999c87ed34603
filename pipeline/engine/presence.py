"""Stem presence: is a stem in a track at all, and where (active segments, in seconds).

Everything works on the *frame features* of :mod:`demix.pipeline.engine.features`, which a separation
computes on the fly, so presence costs one cheap pass over audio that is already in memory.

Two detectors turn features into a :class:`Presence` (decision, score, segments) per stem:

- :func:`detect_energy`: the stem's level relative to the mixture over time (and above an absolute
  floor), smoothed, with hysteresis (switch on above ``on_db``, off below ``off_db``) and minimum
  durations (segments shorter than ``min_active_s`` dropped, gaps shorter than ``min_gap_s`` closed).
- :func:`detect_classifier`: a learned frame classifier (:class:`demix.models.presence.PresenceNet`, a
  registered model with shipped weights, trained by :func:`demix.pipeline.learn.presence.train_classifier`
  on separated synthetic songs whose true stems give the labels). Its per-frame probabilities go through the same hysteresis
  and minimum durations.

The decision rule is shared: a stem is present when its segments total at least ``min_present_s``.
``score`` is ``active / (active + min_present_s)``, in [0, 1), monotone in the active time, so
``score >= 0.5`` exactly when the stem is present. ``DETECTORS`` names the choices; which one the
catalog flow uses by default was chosen on evidence (``demix evaluate --presence``, see
docs/ARCHITECTURE.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from demix.models.registry import load_model
from demix.pipeline.engine.features import Features, PresenceError
from demix.pipeline.stems import MIXTURE

DETECTORS = ("combined", "classifier", "energy", "none")
DEFAULT_DETECTOR = "combined"
DEFAULT_CLASSIFIER = "presence"
_TINY = 1e-12


@dataclass(frozen=True)
class Segment:
    start_s: float
    end_s: float

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


@dataclass(frozen=True)
class Presence:
    """One stem's presence in one track: ``present`` is ``score >= 0.5``."""

    present: bool
    score: float
    segments: tuple[Segment, ...]

    def segment_dicts(self) -> list[dict]:
        """Segments as the manifests store them: ``[{"start_s", "end_s"}, ...]``."""
        return [{"start_s": s.start_s, "end_s": s.end_s} for s in self.segments]


# --------------------------------------------------------------------------------------------------
# Post-processing shared by both detectors
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hysteresis:
    """Turn an activation curve into segments.

    Attributes:
        on, off: switch on when the activation rises above ``on``, off when it falls below ``off``.
        min_active_s: drop segments shorter than this.
        min_gap_s: close gaps shorter than this (before dropping short segments).
        min_present_s: a stem is present when its segments total at least this.
    """

    on: float
    off: float
    min_active_s: float = 0.25
    min_gap_s: float = 0.3
    min_present_s: float = 1.0

    def __post_init__(self) -> None:
        if self.off > self.on:
            raise ValueError(f"hysteresis needs off <= on. Found: on={self.on}, off={self.off}")
        if min(self.min_active_s, self.min_gap_s) < 0 or self.min_present_s <= 0:
            raise ValueError("minimum durations must be >= 0 (min_present_s > 0)")


def segments_from_activation(act: np.ndarray, frame_s: float, duration_s: float, rule: Hysteresis) -> tuple[Segment, ...]:
    """Segments (seconds) where ``act`` (one value per frame) is on, under ``rule``."""
    on = np.zeros(len(act), bool)
    state = False
    for i, a in enumerate(act):  # hysteresis is sequential; frames are few (72,000 per hour)
        state = a > rule.on if not state else a >= rule.off
        on[i] = state
    spans = runs(on)
    merged: list[list[int]] = []
    for start, end in spans:
        if merged and (start - merged[-1][1]) * frame_s < rule.min_gap_s:
            merged[-1][1] = end
        else:
            merged.append([start, end])
    out = []
    for start, end in merged:
        seg = Segment(round(start * frame_s, 4), round(min(end * frame_s, duration_s), 4))
        if seg.duration_s >= rule.min_active_s:
            out.append(seg)
    return tuple(out)


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """``[start, end)`` index pairs of the True runs of ``mask``."""
    if not len(mask):
        return []
    padded = np.concatenate([[False], mask, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist()))


def decide(segments: Sequence[Segment], rule: Hysteresis) -> Presence:
    """The shared decision: present when the segments total at least ``rule.min_present_s``."""
    active = float(sum(s.duration_s for s in segments))
    score = active / (active + rule.min_present_s)
    return Presence(present=score >= 0.5, score=round(score, 6), segments=tuple(segments))


def smooth(x: np.ndarray, frames: int) -> np.ndarray:
    """Centred moving average over ``frames`` frames (edges averaged over what exists)."""
    if frames <= 1 or not len(x):
        return x
    kernel = np.ones(frames)
    num = np.convolve(x, kernel, mode="same")
    den = np.convolve(np.ones_like(x), kernel, mode="same")
    return num / den


def to_db(x: np.ndarray) -> np.ndarray:
    """Power ``x`` in dB (floored at 1e-12, so -120 dB at most below 1)."""
    return 10.0 * np.log10(np.maximum(x, _TINY))


# --------------------------------------------------------------------------------------------------
# Detector (a): energy of the stem relative to the mixture
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EnergyConfig:
    """Energy detector settings (dB are power ratios; chosen on separated synthetic training songs).

    A frame is a candidate when the stem, smoothed over ``smooth_s``, is above ``floor_dbfs`` and its
    level relative to the (smoothed) mixture is above ``on_db``; it stays on while that level is
    above ``off_db``. Segment edges are then pulled in to the unsmoothed level (:func:`refine_edges`).
    """

    on_db: float = -9.0
    off_db: float = -13.0
    floor_dbfs: float = -45.0
    smooth_s: float = 0.25
    min_active_s: float = 0.25
    min_gap_s: float = 0.3
    min_present_s: float = 2.0

    def rule(self) -> Hysteresis:
        return Hysteresis(self.on_db, self.off_db, self.min_active_s, self.min_gap_s, self.min_present_s)


def energy_activation(features: Features, stem: str, config: EnergyConfig = EnergyConfig(), *, smoothed: bool = True) -> np.ndarray:
    """Per frame: the stem's level relative to the mixture in dB (-200 below the absolute floor);
    powers averaged over ``smooth_s`` first unless ``smoothed=False``."""
    n = max(1, round(config.smooth_s / features.frame_s)) if smoothed else 1
    stem_p = smooth(features.power(stem).astype(np.float64), n)
    mix_p = smooth(features.power(MIXTURE).astype(np.float64), n)
    rel = to_db(stem_p) - to_db(np.maximum(mix_p, stem_p))
    rel[to_db(stem_p) < config.floor_dbfs] = -200.0
    return rel


def refine_edges(segments: Sequence[Segment], raw: np.ndarray, threshold: float, frame_s: float) -> tuple[Segment, ...]:
    """Pull each segment's edges in to the first / last frame whose *unsmoothed* activation is above
    ``threshold`` (smoothing spreads an onset over neighbouring frames; this undoes that spread)."""
    out = []
    for seg in segments:
        a, b = int(round(seg.start_s / frame_s)), int(round(seg.end_s / frame_s))
        on = np.flatnonzero(raw[a:b] > threshold)
        if len(on):
            start, end = a + int(on[0]), a + int(on[-1]) + 1
            out.append(Segment(round(start * frame_s, 4), round(min(end * frame_s, seg.end_s), 4)))
        else:
            out.append(seg)
    return tuple(out)


def detect_energy(features: Features, stems: Sequence[str], config: EnergyConfig = EnergyConfig()) -> dict[str, Presence]:
    """Detector (a) for each of ``stems`` (names in ``features``)."""
    rule = config.rule()
    out = {}
    for s in stems:
        segs = segments_from_activation(energy_activation(features, s, config), features.frame_s, features.duration_s, rule)
        raw = energy_activation(features, s, config, smoothed=False)
        out[s] = decide(refine_edges(segs, raw, config.off_db, features.frame_s), rule)
    return out


# --------------------------------------------------------------------------------------------------
# Detector (b): learned frame classifier
# --------------------------------------------------------------------------------------------------

CLASSIFIER_RULE = Hysteresis(on=0.5, off=0.35, min_active_s=0.25, min_gap_s=0.3, min_present_s=2.0)


def classifier_inputs(features: Features, sources: Sequence[str]) -> Tensor:
    """``(1, inputs, frames)`` network input: each source's band levels relative to the mixture's, and
    the mixture's own band levels, in dB / 20 (clipped), for the classifier's ``sources`` in order."""
    mix = features.bands[:, features._index(MIXTURE)].astype(np.float64)
    mix_db = to_db(mix)
    rows = [np.clip(to_db(features.bands[:, features._index(s)].astype(np.float64)) - mix_db, -60.0, 10.0) for s in sources]
    rows.append(np.clip(mix_db, -100.0, 0.0))
    x = np.concatenate(rows, -1).T / 20.0  # (inputs, frames)
    return torch.from_numpy(x.astype(np.float32))[None]


def classifier_activation(model, features: Features) -> dict[str, np.ndarray]:
    """Per-frame presence probability of each of the classifier's sources."""
    if not len(features.bands):
        return {s: np.zeros(0) for s in model.sources}
    with torch.inference_mode():
        logits = model(classifier_inputs(features, model.sources).to(next(model.parameters()).device))
    probs = torch.sigmoid(logits[0].float()).cpu().numpy().astype(np.float64)
    return {s: probs[i] for i, s in enumerate(model.sources)}


def detect_classifier(model, features: Features, stems: Sequence[str], rule: Hysteresis = CLASSIFIER_RULE) -> dict[str, Presence]:
    """Detector (b) for each of ``stems`` that the classifier knows; others get detector (a)."""
    missing = [s for s in model.sources if s not in features.names]
    if missing:
        raise PresenceError(f"the presence classifier needs features of {', '.join(missing)}")
    acts = classifier_activation(model, features)
    out = {}
    for s in stems:
        if s in acts:
            out[s] = decide(segments_from_activation(acts[s], features.frame_s, features.duration_s, rule), rule)
        else:  # a summed stem (no_vocals): the energy detector
            out.update(detect_energy(features, [s]))
    return out


def detect_combined(model, features: Features, stems: Sequence[str]) -> dict[str, Presence]:
    """Both detectors must agree that a stem is present; segments (and the score's time scale) come
    from the classifier, whose frame F1 is the better one; the score is the smaller of the two."""
    a = detect_classifier(model, features, stems)
    b = detect_energy(features, stems)
    out = {}
    for s in stems:
        score = min(a[s].score, b[s].score)
        out[s] = Presence(present=a[s].present and b[s].present, score=score, segments=a[s].segments)
    return out


class Detector:
    """What the catalog run uses per track: ``detector(features, stems) -> {stem: Presence}``.

    ``kind`` is one of ``DETECTORS`` (``combined``: classifier and energy must agree, the default,
    chosen on evidence; see docs/ARCHITECTURE.md). The classifier is loaded once from the registry,
    like a separation model (``classifier`` names the entry, ``weights`` overrides its file). With a
    separator whose sources are not the classifier's, the classifier kinds fall back to ``energy``.
    """

    def __init__(self, kind: str = DEFAULT_DETECTOR, *, classifier: str = DEFAULT_CLASSIFIER, weights: str | None = None,
                 sources: Sequence[str] | None = None) -> None:
        if kind not in DETECTORS:
            raise PresenceError(f"presence detector must be one of {', '.join(DETECTORS)}. Found: {kind!r}")
        self.kind = kind
        self.model = None
        if kind in ("classifier", "combined"):
            self.model = load_model(classifier, weights=weights, kind="presence")
            if sources is not None and not set(self.model.sources) <= set(sources):
                # a separator without vocals/drums/bass/other (a plug-in model): fall back to energy
                self.kind, self.model = "energy", None

    @property
    def weights_sha256(self) -> str | None:
        return getattr(self.model, "weights_sha256", None)

    def __call__(self, features: Features, stems: Sequence[str]) -> dict[str, Presence]:
        if self.kind == "none":
            return {}
        if self.kind == "classifier":
            return detect_classifier(self.model, features, stems)
        if self.kind == "combined":
            return detect_combined(self.model, features, stems)
        return detect_energy(features, stems)
