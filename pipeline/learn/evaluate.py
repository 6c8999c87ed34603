"""Scoring separations: one track (:func:`score_track`), a dataset (:func:`evaluate_dataset`) and a
model as an estimator (:func:`model_estimator`).

The metrics are in :mod:`demix.pipeline.learn.bss_eval`, the oracles in
:mod:`demix.pipeline.learn.oracles`, the report files in :mod:`demix.pipeline.learn.report`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torchaudio

from demix.pipeline.data import find_tracks, load_track
from demix.pipeline.engine import SeparationSettings, separate
from demix.pipeline.io import conform
from demix.pipeline.learn.bss_eval import bss_eval_frames, frame_slices, si_sdr
from demix.pipeline.learn.oracles import oracle_estimates
from demix.pipeline.learn.previews import PreviewPicker
from demix.pipeline.learn.report import EvalReport, write_report
from demix.pipeline.learn.scores import TrackScores, aggregate
from demix.pipeline.stems import STEMS, is_silent


def _fit_length(x: np.ndarray, length: int) -> np.ndarray:
    """Zero-pad or cut ``(channels, time)`` to ``length`` (museval's ``pad_or_truncate``)."""
    if x.shape[-1] >= length:
        return x[..., :length]
    return np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, length - x.shape[-1])])


def score_track(
    track: str,
    references: Mapping[str, np.ndarray],
    estimates: Mapping[str, np.ndarray],
    *,
    sample_rate: int,
    window: float = 1.0,
    hop: float = 1.0,
) -> tuple[list[TrackScores], list[str]]:
    """Score every stem of one track with BSS Eval v4 (all non-silent stems jointly) and SI-SDR.

    The silence rule (:func:`demix.pipeline.stems.is_silent`, below
    :data:`~demix.pipeline.stems.SILENCE_DBFS`) applies to the whole reference and to each of its
    windows: a window in which a stem's reference is silent is NaN for that stem and left out of its
    median (museval does the same for all-zero windows), and a stem with no window left is silent.

    Args:
        references: ``{stem: (channels, time)}``, all of one shape.
        estimates: ``{stem: (channels, time')}`` for at least the stems of ``references``; each is
            zero-padded or cut to the reference length, as museval does.
        sample_rate: Hz, for the 1 s windows.

    Returns:
        ``(scores, silent)``: one :class:`TrackScores` per non-silent stem, in ``references`` order,
        and the stems left out because their reference is silent
        (:func:`demix.pipeline.stems.is_silent`).

    Raises:
        ValueError: a missing estimate, mismatched shapes, NaN or Inf, naming the track and stem.
    """
    stems = list(references)
    if not stems:
        return [], []
    refs, ests = _checked(track, references, estimates)
    slices = frame_slices(refs[stems[0]].shape[-1], window * sample_rate, hop * sample_rate)
    quiet = {s: np.array([is_silent(refs[s][:, w]) for w in slices]) for s in stems}  # per window
    silent = [s for s in stems if is_silent(refs[s]) or quiet[s].all()]
    kept = [s for s in stems if s not in silent]
    if not kept:
        return [], silent
    r = np.stack([refs[s] for s in kept])  # (sources, channels, time)
    e = np.stack([ests[s] for s in kept])
    frames = bss_eval_frames(r, e, window * sample_rate, hop * sample_rate)
    scores = []
    for j, stem in enumerate(kept):
        for m in frames:
            frames[m][j][quiet[stem]] = np.nan  # silent reference windows are not scored
        ok = ~np.isnan(frames["sdr"][j])
        med = {m: float(np.median(frames[m][j][ok])) if ok.any() else math.nan for m in frames}
        scores.append(
            TrackScores(
                track=track, stem=stem, sdr=med["sdr"], sir=med["sir"], sar=med["sar"], isr=med["isr"],
                si_sdr=si_sdr(r[j], e[j]), frames=int(ok.sum()),
            )
        )
    return scores, silent


def _checked(
    track: str, references: Mapping[str, np.ndarray], estimates: Mapping[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The references and estimates of :func:`score_track` as arrays, estimates fitted to the reference
    length; a ``ValueError`` naming the track and stem for a missing estimate, a shape, NaN or Inf."""
    stems = list(references)
    missing = [s for s in stems if s not in estimates]
    if missing:
        raise ValueError(f"{track}: no estimate for stems {missing}; got {sorted(estimates)}")
    refs, ests = {}, {}
    shape = np.shape(references[stems[0]])
    for stem in stems:
        r = np.asarray(references[stem])
        e = np.asarray(estimates[stem])
        if r.ndim != 2 or r.shape != shape:
            raise ValueError(f"{track}/{stem}: Expected references (channels, time) of one shape {shape}. Found: {r.shape}")
        if e.ndim != 2 or e.shape[0] != r.shape[0]:
            raise ValueError(f"{track}/{stem}: Expected an estimate ({r.shape[0]}, time). Found: {e.shape}")
        for what, x in (("reference", r), ("estimate", e)):
            if not np.isfinite(x).all():
                raise ValueError(f"{track}/{stem}: {what} holds NaN or Inf")
        refs[stem], ests[stem] = r, _fit_length(e, r.shape[1])
    return refs, ests


Estimator = Callable[[str, np.ndarray], Mapping[str, np.ndarray]]


def model_estimator(model, settings=None, *, sample_rate: int = 44100) -> Estimator:
    """An estimator that runs a registered :class:`demix.models.base.Separator` through
    :func:`demix.pipeline.engine.separate`, resampling to and from ``model.sample_rate`` when the dataset
    rate ``sample_rate`` differs. Returns every model source by name."""
    settings = settings or SeparationSettings()

    def estimate(track: str, mixture: np.ndarray) -> dict[str, np.ndarray]:
        channels, length = mixture.shape
        x = conform(mixture, sample_rate, target_rate=model.sample_rate, target_channels=model.audio_channels, source=track)
        est = separate(model, x, settings)  # (sources, channels, time)
        if model.sample_rate != sample_rate:
            est = torchaudio.functional.resample(est, model.sample_rate, sample_rate)
        if est.shape[1] != channels:
            if channels != 1:
                raise ValueError(f"{track}: model gives {est.shape[1]} channels, the dataset has {channels}")
            est = est.mean(1, keepdim=True)
        est = torch.nn.functional.pad(est, (0, max(0, length - est.shape[-1])))[..., :length]
        return {name: est[i].numpy() for i, name in enumerate(model.sources)}

    return estimate


def evaluate_dataset(
    dataset: str | Path,
    estimator: Estimator | str,
    *,
    out: str | Path,
    stems: Sequence[str] = STEMS,
    progress: Callable[[str, int, int], None] | None = None,
    title: str | None = None,
    model: str | None = None,
    previews: int = 2,
) -> EvalReport:
    """Score an estimator on every track of a MUSDB-layout folder and write the report.

    Args:
        dataset: a folder that directly holds ``<track>/{mixture,vocals,drums,bass,other}.wav``
            (for MUSDB18-HQ pass its ``test/`` or ``train/`` folder).
        estimator: ``'mixture'`` or ``'irm'`` (see :func:`~demix.pipeline.learn.oracles.oracle_estimates`; the IRM uses the
            ``stems`` given, the residual counting as one more source), or a callable
            ``(track_name, mixture (channels, time)) -> {stem: (channels, time)}`` at the dataset rate
            (see :func:`model_estimator`).
        out: folder for ``scores.parquet``, ``summary.md`` and ``summary.html`` (and ``media/``: the previews).
        progress: called as ``progress(track, done, total)`` after each track.
        model: the estimator's name in the report (default: the oracle's, or the callable's ``__name__``).
        previews: clips of this many best and worst tracks in ``summary.html`` (0: none).

    Returns:
        An :class:`EvalReport` with the written paths.
    """
    tracks = find_tracks(dataset)
    if isinstance(estimator, str):
        if estimator not in ("mixture", "irm"):
            raise ValueError(f"estimator must be 'mixture', 'irm' or a callable. Found: {estimator!r}")
        mode = estimator

        def run(name: str, mix: np.ndarray, refs: dict[str, np.ndarray]) -> Mapping[str, np.ndarray]:
            return oracle_estimates(mode, refs, mix)

        label = f"oracle {mode}"
    else:

        def run(name: str, mix: np.ndarray, refs: dict[str, np.ndarray]) -> Mapping[str, np.ndarray]:
            return estimator(name, mix)

        label = getattr(estimator, "__name__", type(estimator).__name__)
    label = model or label
    picker = PreviewPicker(previews)
    scores: list[TrackScores] = []
    silent: list[tuple[str, str]] = []
    for i, folder in enumerate(tracks):
        mixture, refs, rate = load_track(folder, stems)
        estimates = {k: np.asarray(v, np.float32) for k, v in run(folder.name, mixture, refs).items()}
        got, quiet = score_track(folder.name, refs, estimates, sample_rate=rate)
        scores += got
        silent += [(folder.name, s) for s in quiet]
        picker.offer(folder.name, got, mixture, refs, estimates, rate)
        if progress is not None:
            progress(folder.name, i + 1, len(tracks))
    title = title or f"demix evaluate: {label} on {Path(dataset).name}"
    paths = write_report(scores, silent, out, title=title, model=label, previews=picker)
    return EvalReport(scores=scores, silent=silent, medians=aggregate(scores), paths=paths)
