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
- :func:`detect_classifier`: a learned frame classifier (:class:`models.presence.PresenceNet`, a
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
            from models.registry import load_model

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


# --------------------------------------------------------------------------------------------------
# Reference activity (for training and scoring on data with true stems)
# --------------------------------------------------------------------------------------------------

REFERENCE_FLOOR_DBFS = -50.0
"""A true stem is active in a frame when its power (smoothed over 0.15 s) is above this."""


def reference_activity(stem: np.ndarray, sample_rate: int, frame_s: float = FRAME_S) -> np.ndarray:
    """Boolean per frame: where a *true* stem ``(channels, time)`` sounds (for labels and scores)."""
    acc = FrameFeatures(("stem",), sample_rate, frame_s)
    acc.push(torch.as_tensor(np.asarray(stem, np.float32))[None])
    p = smooth(acc.finish().power("stem").astype(np.float64), max(1, round(0.15 / frame_s)))
    return _db(p) > REFERENCE_FLOOR_DBFS


def reference_segments(stem: np.ndarray, sample_rate: int, frame_s: float = FRAME_S) -> tuple[Segment, ...]:
    """Segments of a true stem (no minimum durations)."""
    act = reference_activity(stem, sample_rate, frame_s)
    return tuple(Segment(a * frame_s, min(b * frame_s, stem.shape[-1] / sample_rate)) for a, b in _runs(act))


# --------------------------------------------------------------------------------------------------
# Labelled data, training and scoring (synthetic multitrack songs with true stems)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelledExample:
    """Features of one separated song (or of a variant with stems left out) and its truth.

    ``labels[stem]`` is the per-frame reference activity of the true stem (all False when absent).
    """

    name: str
    features: Features
    present: dict[str, bool]
    labels: dict[str, np.ndarray]


def separated_features(separator, mixture: np.ndarray, sample_rate: int, settings=None) -> Features:
    """Separate ``mixture`` ``(channels, time)`` with ``separator`` and return the frame features of
    its sources and of their sum (the ``mixture`` signal, as the catalog run computes it)."""
    from pipeline.audio import conform
    from pipeline.separate import SeparationSettings, separate

    x = conform(mixture, sample_rate, target_rate=separator.sample_rate, target_channels=separator.audio_channels)
    est = separate(separator, x, settings or SeparationSettings())
    signals = {s: est[i] for i, s in enumerate(separator.sources)}
    signals[MIXTURE] = est.sum(0)
    return features_of(signals, separator.sample_rate)


def labelled_examples(dataset, separator, *, dropped_variants: int = 0, seed: int = 0, settings=None,
                      progress=None) -> list[LabelledExample]:
    """Separate every song of a MUSDB-layout ``dataset`` and label its frames from the true stems.

    ``dropped_variants`` more examples per song leave one or two of its present stems out of the
    mixture (the mixture is rebuilt as the sum of the stems kept), so absent stems are common.
    """
    from pipeline.datasets import STEMS, MusdbDataset

    data = MusdbDataset(dataset)
    rng = np.random.default_rng(seed)
    out: list[LabelledExample] = []
    for i, track in enumerate(data.tracks):
        audio = data.load(i)
        truth = {s: bool(track.present.get(s, True)) if track.present else True for s in STEMS}
        labels = {s: reference_activity(audio[s], track.sample_rate) & truth[s] for s in STEMS}
        truth = {s: truth[s] and bool(labels[s].any()) for s in STEMS}
        variants = [(track.name, truth)]
        for k in range(dropped_variants):
            present = [s for s in STEMS if truth[s]]
            if len(present) < 2:
                break
            drop = set(rng.choice(present, size=int(rng.integers(1, min(2, len(present) - 1) + 1)), replace=False).tolist())
            variants.append((f"{track.name}~drop{k}", {s: truth[s] and s not in drop for s in STEMS}))
        for name, keep in variants:
            if keep == truth:
                mix = audio["mixture"]
            else:  # the stems kept, summed
                mix = sum((audio[s] for s in STEMS if keep[s]), np.zeros_like(audio["mixture"]))
            feats = separated_features(separator, mix, track.sample_rate, settings)
            lab = {s: _fit(labels[s] & keep[s], len(feats.bands)) for s in STEMS}
            out.append(LabelledExample(name, feats, dict(keep), lab))
        if progress is not None:
            progress(i + 1, len(data.tracks))
    return out


def _fit(x: np.ndarray, n: int) -> np.ndarray:
    return np.pad(x, (0, max(0, n - len(x))))[:n]


def train_classifier(examples: Sequence[LabelledExample], *, steps: int = 1500, batch_size: int = 16, crop_frames: int = 200,
                     lr: float = 3e-3, seed: int = 0, hidden: int = 64, layers: int = 4, log=None):
    """Train a :class:`models.presence.PresenceNet` on frame labels (BCE), deterministic per seed."""
    from models.presence import PresenceNet

    if not examples:
        raise PresenceError("no labelled examples to train on")
    sources = ("vocals", "drums", "bass", "other")
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = PresenceNet(sources, hidden=hidden, layers=layers)
    inputs = [classifier_inputs(e.features, sources)[0] for e in examples]
    targets = [torch.from_numpy(np.stack([e.labels[s] for s in sources]).astype(np.float32)) for e in examples]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for step in range(steps):
        xs, ys = [], []
        for _ in range(batch_size):
            j = int(torch.randint(len(inputs), (1,), generator=gen))
            n = inputs[j].shape[-1]
            a = int(torch.randint(max(1, n - crop_frames + 1), (1,), generator=gen))
            x, y = inputs[j][:, a : a + crop_frames], targets[j][:, a : a + crop_frames]
            pad = crop_frames - x.shape[-1]
            xs.append(torch.nn.functional.pad(x, (0, pad)))
            ys.append(torch.nn.functional.pad(y, (0, pad)))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(torch.stack(xs)), torch.stack(ys))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if log is not None and (step % 100 == 0 or step == steps - 1):
            log({"step": step, "loss": float(loss.detach())})
    return model.eval()


@dataclass(frozen=True)
class PresenceScores:
    """Per stem: track-level precision/recall/F1 of *present* and of *absent*, and frame-level F1 of
    the active segments (over tracks where the stem is present)."""

    per_stem: dict[str, dict[str, float]]


def _prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    p = tp / (tp + fp) if tp + fp else 1.0
    r = tp / (tp + fn) if tp + fn else 1.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return p, r, f


def segments_to_frames(segments: Sequence[Segment], frames: int, frame_s: float) -> np.ndarray:
    out = np.zeros(frames, bool)
    for s in segments:
        out[int(round(s.start_s / frame_s)) : int(round(s.end_s / frame_s))] = True
    return out


def score_presence(predicted: Sequence[tuple[str, str, Presence]], truth: Mapping[tuple[str, str], bool],
                   reference_frames: Mapping[tuple[str, str], np.ndarray], frame_s: float = FRAME_S) -> PresenceScores:
    """Score ``(track, stem, Presence)`` predictions against ``truth[(track, stem)]`` and frame references."""
    per: dict[str, dict[str, float]] = {}
    stems = sorted({s for _, s, _ in predicted})
    for stem in stems:
        rows = [(t, p) for t, s, p in predicted if s == stem]
        tp = sum(p.present and truth[(t, stem)] for t, p in rows)
        fp = sum(p.present and not truth[(t, stem)] for t, p in rows)
        fn = sum((not p.present) and truth[(t, stem)] for t, p in rows)
        tn = len(rows) - tp - fp - fn
        precision, recall, f1 = _prf(tp, fp, fn)
        a_p, a_r, a_f1 = _prf(tn, fn, fp)
        ftp = ffp = ffn = 0
        for t, p in rows:
            ref = reference_frames.get((t, stem))
            if ref is None or not truth[(t, stem)]:
                continue
            est = segments_to_frames(p.segments, len(ref), frame_s)
            ftp += int((est & ref).sum())
            ffp += int((est & ~ref).sum())
            ffn += int((~est & ref).sum())
        per[stem] = {
            "tracks": len(rows), "present": tp + fn, "absent": tn + fp, "tp": tp, "fp": fp, "fn": fn, "tn": tn,
            "precision": precision, "recall": recall, "f1": f1,
            "absent_precision": a_p, "absent_recall": a_r, "absent_f1": a_f1,
            "frame_f1": _prf(ftp, ffp, ffn)[2],
        }
    return PresenceScores(per)


@dataclass
class PresenceReport:
    """What :func:`evaluate_presence` found: scores per detector and stem, and the files written."""

    scores: dict[str, PresenceScores]
    paths: dict[str, str]


def evaluate_presence(dataset, separator, detectors: Mapping[str, Detector], *, out, settings=None, progress=None) -> PresenceReport:
    """Score presence detectors on a MUSDB-layout ``dataset`` whose ``truth.json`` says which stems
    each song has (without one, a stem counts as present when its file is not silent).

    Every song is separated once with ``separator``; each detector then judges the same features.
    Writes ``OUT/presence_scores.parquet`` (detector x stem), ``OUT/presence_predictions.parquet``
    (detector x track x stem, with segments) and ``OUT/presence.md``.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pathlib import Path

    examples = labelled_examples(dataset, separator, settings=settings, progress=progress)
    truth = {(e.name, s): e.present[s] for e in examples for s in e.present}
    refs = {(e.name, s): e.labels[s] for e in examples for s in e.labels}
    scores, rows = {}, []
    for name, detector in detectors.items():
        predicted = []
        for e in examples:
            for stem, p in detector(e.features, tuple(e.present)).items():
                predicted.append((e.name, stem, p))
                rows.append({"detector": name, "track": e.name, "stem": stem, "truth": truth[(e.name, stem)],
                             "present": p.present, "presence_score": p.score, "active_segments": p.segment_dicts()})
        scores[name] = score_presence(predicted, truth, refs)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"scores": str(folder / "presence_scores.parquet"), "predictions": str(folder / "presence_predictions.parquet"),
             "markdown": str(folder / "presence.md")}
    flat = [{"detector": d, "stem": s, **m} for d, sc in scores.items() for s, m in sc.per_stem.items()]
    pq.write_table(pa.Table.from_pylist(flat), paths["scores"])
    pq.write_table(pa.Table.from_pylist(rows), paths["predictions"])
    lines = [f"# demix evaluate --presence: {getattr(separator, 'registry_name', type(separator).__name__)} on {dataset}", "",
             f"{len(examples)} songs. Track level: precision / recall / F1 of *present* (and F1 of *absent*); "
             "frame F1: active segments against the true stem's activity (50 ms frames, present stems only).", "",
             "| detector | stem | present / absent | precision | recall | F1 | absent F1 | frame F1 |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in flat:
        lines.append(f"| {r['detector']} | {r['stem']} | {r['present']} / {r['absent']} | {r['precision']:.3f} | "
                     f"{r['recall']:.3f} | {r['f1']:.3f} | {r['absent_f1']:.3f} | {r['frame_f1']:.3f} |")
    Path(paths["markdown"]).write_text("\n".join(lines) + "\n")
    return PresenceReport(scores, paths)


def save_classifier(model, folder) -> tuple[str, str]:
    """Write ``folder/presence-<sha8>.safetensors`` (float32; 0.2 MB); returns ``(path, sha256)``."""
    import hashlib
    import os
    from pathlib import Path

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".presence.safetensors.part"
    save_file({k: v.detach().contiguous().float() for k, v in model.state_dict().items()}, str(tmp))
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    final = folder / f"presence-{digest[:8]}.safetensors"
    os.replace(tmp, final)
    return str(final), digest
