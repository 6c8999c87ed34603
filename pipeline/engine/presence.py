"""Stem presence: is a stem in a track at all, and where (active segments, in seconds).

Everything works on *frame features* that a separation computes on the fly, so presence costs one
cheap pass over audio that is already in memory (long tracks stream; a frame is 50 ms, so an hour of
audio is 72,000 frames):

- :class:`FrameFeatures` takes blocks of named signals (each source estimate, any summed stem such as
  ``no_vocals``, and the mixture, which is the sum of the sources) and keeps, for every 50 ms frame
  and signal, the power in a few frequency bands (``BAND_EDGES_HZ``). Their sum over bands is the
  frame's mean square.

Two detectors turn features into a :class:`Presence` (decision, score, segments) per stem:

- :func:`detect_energy`: the stem's level relative to the mixture over time (and above an absolute
  floor), smoothed, with hysteresis (switch on above ``on_db``, off below ``off_db``) and minimum
  durations (segments shorter than ``min_active_s`` dropped, gaps shorter than ``min_gap_s`` closed).
- :func:`detect_classifier`: a learned frame classifier (:class:`demix.models.presence.PresenceNet`, a
  registered model with shipped weights, trained by :func:`train_classifier` on separated synthetic
  songs whose true stems give the labels). Its per-frame probabilities go through the same hysteresis
  and minimum durations.

The decision rule is shared: a stem is present when its segments total at least ``min_present_s``.
``score`` is ``active / (active + min_present_s)``, in [0, 1), monotone in the active time, so
``score >= 0.5`` exactly when the stem is present. ``DETECTORS`` names the choices; which one the
catalog flow uses by default was chosen on evidence (``demix evaluate --presence``, see
docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

FRAME_S = 0.05
"""Frame hop and length in seconds (non-overlapping frames)."""

BAND_EDGES_HZ = (0.0, 200.0, 500.0, 1200.0, 3000.0, 7000.0, math.inf)
"""Frequency bands of the frame features (the last band runs to Nyquist)."""

MIXTURE = "mixture"
DETECTORS = ("combined", "classifier", "energy", "none")
DEFAULT_DETECTOR = "combined"
DEFAULT_CLASSIFIER = "presence"
_TINY = 1e-12


class PresenceError(ValueError):
    """Presence cannot be computed from what was given (unknown stems, mismatched features)."""


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


@dataclass(frozen=True)
class Features:
    """Band powers per frame: ``bands[frame, signal, band]`` (mean-square units), ``names[signal]``.

    ``duration_s`` is the exact length of the audio (the last frame may be partial).
    """

    names: tuple[str, ...]
    bands: np.ndarray
    frame_s: float
    duration_s: float

    def power(self, name: str) -> np.ndarray:
        """Mean square of ``name`` per frame."""
        return self.bands[:, self._index(name)].sum(-1)

    def _index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise PresenceError(f"no features for {name!r}; have {', '.join(self.names)}") from None


class FrameFeatures:
    """Streaming accumulator of :class:`Features`.

    Args:
        names: signal names in the order :meth:`push` receives them.
        sample_rate: rate of the pushed audio.
        frame_s: frame length in seconds.

    :meth:`push` takes ``(signals, channels, time)`` blocks of any length; :meth:`finish` pads the
    last partial frame (its power is averaged over the samples it really has) and returns the
    features. Memory is ``frames x signals x bands`` floats plus less than one frame of audio.
    """

    def __init__(self, names: Sequence[str], sample_rate: int, frame_s: float = FRAME_S) -> None:
        if not names:
            raise PresenceError("FrameFeatures needs at least one signal name")
        self.names = tuple(names)
        self.sample_rate = int(sample_rate)
        self.frame_s = float(frame_s)
        self.frame = max(1, round(self.frame_s * self.sample_rate))
        freqs = np.fft.rfftfreq(self.frame, 1.0 / self.sample_rate)
        weight = np.full(freqs.shape, 2.0)  # one-sided spectrum: every bin but DC (and Nyquist) counts twice
        weight[0] = 1.0
        if self.frame % 2 == 0:
            weight[-1] = 1.0
        edges = BAND_EDGES_HZ
        # (bins, bands) matrix: power spectrum @ it = band powers, scaled so bands sum to the mean square
        self._bands = torch.from_numpy(
            np.stack([weight * ((freqs >= lo) & (freqs < hi)) for lo, hi in zip(edges[:-1], edges[1:])], -1)
            / float(self.frame) ** 2
        ).float()
        self._rest: Tensor | None = None
        self._out: list[np.ndarray] = []
        self._samples = 0

    def push(self, block: Tensor) -> None:
        """Add ``(signals, channels, time)`` audio."""
        if block.dim() != 3 or block.shape[0] != len(self.names):
            raise PresenceError(f"Expected ({len(self.names)}, channels, time) blocks. Found: {tuple(block.shape)}")
        block = block.detach().float().cpu()
        self._samples += block.shape[-1]
        if self._rest is not None:
            block = torch.cat([self._rest, block], -1)
        full = block.shape[-1] // self.frame
        if full:
            self._out.append(self._frames(block[..., : full * self.frame]))
        self._rest = block[..., full * self.frame :]

    def _frames(self, x: Tensor, valid: int | None = None) -> np.ndarray:
        k, c, n = x.shape
        spec = torch.fft.rfft(x.reshape(k, c, n // self.frame, self.frame), dim=-1)
        power = (spec.real.square() + spec.imag.square()).mean(1)  # (signals, frames, bins), channel mean
        bands = power @ self._bands  # (signals, frames, bands)
        if valid is not None:
            bands = bands * (self.frame / max(1, valid))
        return bands.permute(1, 0, 2).numpy().astype(np.float32)

    def finish(self) -> Features:
        if self._rest is not None and self._rest.shape[-1] > 0:
            valid = self._rest.shape[-1]
            padded = torch.nn.functional.pad(self._rest, (0, self.frame - valid))
            self._out.append(self._frames(padded, valid=valid))
            self._rest = None
        bands = np.concatenate(self._out) if self._out else np.zeros((0, len(self.names), len(BAND_EDGES_HZ) - 1), np.float32)
        return Features(self.names, bands, self.frame_s, self._samples / self.sample_rate)


def features_of(signals: Mapping[str, Tensor | np.ndarray], sample_rate: int, frame_s: float = FRAME_S) -> Features:
    """Features of whole in-memory signals ``{name: (channels, time)}`` (all the same shape).

    A ``"mixture"`` entry is added as the sum of the others when it is missing.
    """
    signals = {k: torch.as_tensor(np.asarray(v, np.float32)) for k, v in signals.items()}
    if MIXTURE not in signals:
        signals[MIXTURE] = torch.stack(list(signals.values())).sum(0)
    acc = FrameFeatures(tuple(signals), sample_rate, frame_s)
    acc.push(torch.stack(list(signals.values())))
    return acc.finish()


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
    runs = _runs(on)
    merged: list[list[int]] = []
    for start, end in runs:
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


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
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


def _db(x: np.ndarray) -> np.ndarray:
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
    rel = _db(stem_p) - _db(np.maximum(mix_p, stem_p))
    rel[_db(stem_p) < config.floor_dbfs] = -200.0
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
    mix_db = _db(mix)
    rows = [np.clip(_db(features.bands[:, features._index(s)].astype(np.float64)) - mix_db, -60.0, 10.0) for s in sources]
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
            from demix.models.registry import load_model

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
