"""The one-track job: decode a source, separate it, encode its stems, detect presence, write.

:func:`separate_track` is a sequence of stages (read, decode, separate, encode, presence, write); each
stage function wraps its own failures into a :class:`TrackError` naming the source and that stage (or
the stage an :class:`~demix.pipeline.io.AudioError` or :class:`~demix.pipeline.io.StorageError` names
itself). Decoding runs ahead of the model and encoding behind it, in threads
(:mod:`demix.pipeline.engine.threads`).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from demix.models.base import Separator
from demix.pipeline.engine.features import FrameFeatures
from demix.pipeline.engine.overlap_add import SeparationSettings, Stage, separate_stream, track_stats
from demix.pipeline.engine.presence import Detector
from demix.pipeline.engine.threads import Behind, Prefetch
from demix.pipeline.errors import StagedError, stage_of
from demix.pipeline.io import (
    AtomicOutput, AudioInfo, AudioStream, AudioWriter, Encoding, local_copy, open_audio, stream_conformed,
)
from demix.pipeline.stems import MIXTURE


@dataclass(frozen=True)
class StemPlan:
    """Which stems to write, each the sum of some model outputs.

    ``outputs`` is a tuple of ``(stem_name, source_indices)``.
    """

    outputs: tuple[tuple[str, tuple[int, ...]], ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.outputs)

    def apply(self, est: Tensor) -> dict[str, Tensor]:
        """``(sources, channels, n)`` -> ``{stem: (channels, n)}``."""
        # a stem of one source is a view of it (no gather copy and sum over one element)
        return {name: est[idx[0]] if len(idx) == 1 else est[list(idx)].sum(0) for name, idx in self.outputs}


def plan_stems(
    sources: Sequence[str], *, stems: Sequence[str] | None = None, two_stems: str | None = None
) -> StemPlan:
    """Build a :class:`StemPlan` from a model's sources and the user's choice.

    ``two_stems="vocals"`` gives ``vocals`` and ``no_vocals`` (the sum of every other source), as the
    demucs CLI does. ``stems`` keeps a subset, in the order given. Unknown names raise ``ValueError``.
    """
    sources = tuple(sources)
    if stems and two_stems:
        raise ValueError("choose either stems or two_stems, not both")
    if two_stems is not None:
        if two_stems not in sources:
            raise ValueError(f"two_stems={two_stems!r} is not a source of this model: {', '.join(sources)}")
        i = sources.index(two_stems)
        rest = tuple(j for j in range(len(sources)) if j != i)
        return StemPlan(((two_stems, (i,)), (f"no_{two_stems}", rest)))
    if stems:
        unknown = [s for s in stems if s not in sources]
        if unknown:
            raise ValueError(f"unknown stems {unknown}; this model returns: {', '.join(sources)}")
        return StemPlan(tuple((s, (sources.index(s),)) for s in dict.fromkeys(stems)))
    return StemPlan(tuple((s, (i,)) for i, s in enumerate(sources)))



def add_stem_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--two-stems`` or ``--stems``: the choice :func:`plan_stems` takes."""
    stems = parser.add_mutually_exclusive_group()
    stems.add_argument("--two-stems", metavar="STEM", help="write STEM and no_STEM (the sum of the others), e.g. vocals")
    stems.add_argument("--stems", type=_comma_list, metavar="A,B", help="write only these stems")


def _comma_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


class TrackError(StagedError, RuntimeError):
    """Separating one track failed; ``stage`` is read, decode, separate, encode, presence or write."""

    def __init__(self, source: str, stage: str, cause: BaseException) -> None:
        super().__init__(f"{source}: {stage} failed: {type(cause).__name__}: {cause}", source=source, stage=stage)
        self.cause = cause

    @property
    def error_type(self) -> str:
        return type(self.cause).__name__


class Cancelled(Exception):
    """:func:`separate_track` stopped because its ``cancel`` event was set; nothing was written."""

    def __init__(self, source: str) -> None:
        super().__init__(f"{source}: cancelled; its staged stems were discarded")
        self.source = source


@dataclass(frozen=True)
class TrackResult:
    """What :func:`separate_track` wrote for one source."""

    source: str
    stems: dict[str, str]  # stem name -> final URI
    duration_s: float  # at the model's rate
    source_sample_rate: int
    source_channels: int
    elapsed_s: float
    decoder: str = ""
    num_frames: int = 0  # output frames per stem, at the model's rate
    rms_dbfs: dict[str, float] = field(default_factory=dict)  # per stem, as written (before clip handling)
    presence: dict = field(default_factory=dict)  # stem -> demix.pipeline.engine.Presence (when a detector ran)



@dataclass(frozen=True)
class _Job:
    """One call of :func:`separate_track`: what every stage needs."""

    model: Separator
    source: str
    plan: StemPlan
    settings: SeparationSettings
    block_seconds: float
    progress: Callable[[float], None] | None
    cancel: threading.Event | None = None
    stage: Stage | None = None

    def conformed(self, stream: AudioStream) -> Iterator[Tensor]:
        """``(channels, n)`` blocks of ``stream`` at the model's rate and channel count."""
        return stream_conformed(
            stream, target_rate=self.model.sample_rate, target_channels=self.model.audio_channels,
            block_seconds=self.block_seconds, source=self.source,
        )


@dataclass
class _Separated:
    """What the decode, separate and encode stages leave for the others."""

    info: AudioInfo
    frames: int
    energy: dict[str, float]
    features: FrameFeatures | None


@contextlib.contextmanager
def _stage(source: str, stage: str) -> Iterator[None]:
    """Turn a failure in the block into a :class:`TrackError` of ``stage`` (or of the stage the error names)."""
    try:
        yield
    except (TrackError, Cancelled):
        raise
    except Exception as err:  # noqa: BLE001 - every failure becomes one typed, staged error
        raise TrackError(source, stage_of(err, stage), err) from err


def separate_track(
    model: Separator, source: str, outputs: dict[str, str], *, plan: StemPlan, encoding: Encoding,
    settings: SeparationSettings = SeparationSettings(), block_seconds: float = 30.0,
    progress: Callable[[float], None] | None = None, presence: Detector | None = None,
    cancel: threading.Event | None = None, stage: Stage | None = None,
) -> TrackResult:
    """Decode ``source``, separate it chunk by chunk and write each stem in ``plan`` to ``outputs[stem]``.

    Streams end to end: decoded audio, estimates and encoders see blocks of ``block_seconds``; a
    remote source is first copied to a local temp file. Each stem is staged and committed to its
    final URI only after the whole track succeeded, so a failure leaves no partial stem behind.

    Args:
        outputs: final URI for every stem name in ``plan``.
        encoding: how the stems are written.
        progress: called with seconds of input processed after each block.
        presence: a detector; frame features of every model source, every summed stem and the
            mixture (the sum of the sources) are gathered while encoding, and the detector's verdict
            per written stem lands in :attr:`TrackResult.presence`.
        cancel: when set (from another thread), the track stops before its next model chunk and
            its staged stems are discarded; a track whose model pass is done still commits.
        stage: a model stage shared with other tracks (:class:`~demix.pipeline.engine.batcher.ModelBatcher`
            or remote); ``None``: the model runs in this thread. Same stems either way.

    Raises:
        TrackError: naming the source and the stage (read, decode, separate, encode, presence, write).
        Cancelled: ``cancel`` was set; nothing was written at the final URIs.
    """
    missing = [s for s in plan.names if s not in outputs]
    if missing:
        raise ValueError(f"no output URI for stems {missing}")
    started = time.perf_counter()
    job = _Job(model, source, plan, settings, block_seconds, progress, cancel, stage)
    # leaving the staging area and the local copy, after the commit, is part of the write stage
    with _stage(source, "write"), contextlib.ExitStack() as held:
        held.enter_context(stage.producer() if stage is not None else contextlib.nullcontext())
        with _stage(source, "read"):
            path = held.enter_context(local_copy(source))
            staged = held.enter_context(AtomicOutput())
        stats = _read_stats(job, path) if model.normalize_input else None
        done = _separate_and_encode(job, path, staged, outputs, encoding, stats, features=presence is not None)
        verdict = _detect(job, presence, done.features)
        with _stage(source, "write"):
            committed = staged.commit()
    return TrackResult(
        source=source,
        stems=dict(zip(plan.names, committed)),
        duration_s=done.frames / model.sample_rate,
        source_sample_rate=done.info.sample_rate,
        source_channels=done.info.channels,
        elapsed_s=time.perf_counter() - started,
        decoder=done.info.decoder,
        num_frames=done.frames,
        rms_dbfs={stem: _dbfs(e, done.frames * model.audio_channels) for stem, e in done.energy.items()},
        presence=verdict,
    )


def _read_stats(job: _Job, path: str) -> tuple[float, float]:
    """Stage decode, first pass: the track statistics a ``normalize_input`` model needs."""
    with _stage(job.source, "decode"), open_audio(path, name=job.source) as stream:
        return track_stats(job.conformed(stream))


def _separate_and_encode(
    job: _Job, path: str, staged: AtomicOutput, outputs: dict[str, str], encoding: Encoding,
    stats: tuple[float, float] | None, *, features: bool,
) -> _Separated:
    """Stages decode, separate and encode: every stem of the plan encoded into ``staged``."""
    # closing the writers (on leaving the block) finishes encoding, so it is part of the encode stage
    with _stage(job.source, "encode"), contextlib.ExitStack() as held:
        with _stage(job.source, "decode"):
            stream = held.enter_context(open_audio(path, name=job.source))
            info = stream.info
        writers = _open_writers(job, held, staged, outputs, encoding)
        with _stage(job.source, "decode"):
            blocks = job.conformed(stream)
            sink = _StemSink(job, writers, features=features)
        frames = _run_model(job, blocks, sink, stats)
        _close_all(job, writers.values())
    return _Separated(info, frames, sink.energy, sink.features)


def _open_writers(
    job: _Job, held: contextlib.ExitStack, staged: AtomicOutput, outputs: dict[str, str], encoding: Encoding
) -> dict[str, AudioWriter]:
    """Stage encode: one writer per stem, writing into ``staged``, closed when ``held`` is."""
    model = job.model
    with _stage(job.source, "encode"):
        # a writer leaving its ``with`` by an exception discards its output instead of encoding it
        return {
            stem: held.enter_context(
                AudioWriter(
                    staged.path_for(outputs[stem]), sample_rate=model.sample_rate,
                    channels=model.audio_channels, encoding=encoding, source=outputs[stem],
                )
            )
            for stem in job.plan.names
        }


class _StemSink:
    """Takes each ``(sources, channels, n)`` estimate (in the encode thread): writes every stem of the
    plan, sums its energy, and feeds the presence features (sources, summed stems and the mixture)."""

    def __init__(self, job: _Job, writers: dict[str, AudioWriter], *, features: bool) -> None:
        model = job.model
        self.plan = job.plan
        self.writers = writers
        self.energy = dict.fromkeys(job.plan.names, 0.0)
        self.summed = tuple(n for n in job.plan.names if n not in model.sources)
        self.features = (
            FrameFeatures((*model.sources, *self.summed, MIXTURE), model.sample_rate) if features else None
        )

    def __call__(self, est: Tensor) -> None:
        stems = self.plan.apply(est)
        for stem, wav in stems.items():
            self.energy[stem] += _energy(wav)
            self.writers[stem].write(wav)
        if self.features is not None:
            self.features.push(torch.cat([est, torch.stack([stems[n] for n in self.summed] + [est.sum(0)])]))


_ENERGY_CHUNK = 1 << 16


def _energy(wav: Tensor) -> float:
    """Sum of squares of ``wav`` (on the CPU): float32 dot products of 64 k samples, summed in float64.
    Single-threaded numpy: ``wav.double().square().sum()`` made two float64 copies and ran torch's
    OpenMP team, whose spinning costs more than the sum itself on a busy machine."""
    v = wav.detach().reshape(-1).numpy()
    return math.fsum(
        float(np.einsum("i,i->", v[i : i + _ENERGY_CHUNK], v[i : i + _ENERGY_CHUNK])) for i in range(0, v.size, _ENERGY_CHUNK)
    )


def _close_all(job: _Job, writers: Iterable[AudioWriter]) -> None:
    """Stage encode: finish the stems' encoders at once, one thread each (libsndfile releases the GIL);
    with ``clip='rescale'`` each still has its whole track to encode. Closing twice is harmless."""
    writers = list(writers)
    with _stage(job.source, "encode"):
        if len(writers) < 2:
            for writer in writers:
                writer.close()
            return
        with ThreadPoolExecutor(len(writers), thread_name_prefix="demix-close") as pool:
            for done in [pool.submit(writer.close) for writer in writers]:
                done.result()


def _run_model(job: _Job, blocks: Iterable[Tensor], sink: _StemSink, stats: tuple[float, float] | None) -> int:
    """Stage separate: the model over every block, estimates handed to ``sink``; returns the frames out."""
    model = job.model
    frames = 0
    with _stage(job.source, "separate"):
        # decoding runs ahead and encoding runs behind in their own threads, so the model
        # is not kept waiting on I/O (all three release the GIL in their heavy parts)
        with Prefetch(_counting(blocks, job.progress, model.sample_rate), depth=2) as ahead, Behind(sink) as behind:
            for est in separate_stream(model, _until_cancelled(ahead, job), job.settings, stats=stats, stage=job.stage):
                frames += est.shape[-1]
                behind.submit(est)
    return frames


def _detect(job: _Job, presence: Detector | None, features: FrameFeatures | None) -> dict:
    """Stage presence: the detector's verdict per written stem (``{}`` without a detector)."""
    if features is None:
        return {}
    with _stage(job.source, "presence"):
        return presence(features.finish(), job.plan.names)


def _until_cancelled(blocks: Iterable[Tensor], job: _Job) -> Iterator[Tensor]:
    """``blocks`` cut into pieces of one model chunk, raising :class:`Cancelled` before a piece once
    ``job.cancel`` is set (overlap-add gives the same output for any block sizes)."""
    if job.cancel is None:
        yield from blocks
        return
    size = job.settings.segment_samples(job.model)
    for block in blocks:
        for piece in block.split(size, dim=-1):
            if job.cancel.is_set():
                raise Cancelled(job.source)
            yield piece


def _dbfs(energy: float, samples: int) -> float:
    """RMS level in dBFS of a signal with total ``energy`` over ``samples`` samples (-inf if silent)."""
    if samples == 0 or energy <= 0:
        return float("-inf")
    return 10.0 * math.log10(energy / samples)


def _counting(blocks: Iterable[Tensor], progress: Callable[[float], None] | None, rate: int) -> Iterator[Tensor]:
    for block in blocks:
        yield block
        if progress is not None:
            progress(block.shape[-1] / rate)
