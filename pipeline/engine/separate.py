"""Chunked overlap-add inference for any registered model, streaming.

The network never sees more than ``batch_size`` chunks of ``segment`` seconds. Chunks start every
``stride = (1 - overlap) * segment`` samples; each chunk's estimate is weighted by a triangular window
(raised to ``transition_power``, as demucs ``apply_model``), summed, and divided by the summed
weights, so an identity model returns its input exactly. The engine is a rolling buffer: samples
before the next chunk's start are final and are handed out at once, so memory is O(segment x batch),
not O(track length). Shapes: a track is ``(channels, time)``, a batch ``(batch, channels, time)``,
estimates ``(sources, channels, time)`` or ``(batch, sources, channels, time)``.

The shift trick (demucs ``shifts``): each of ``shifts`` passes delays the input by a random offset of
up to half a second, the estimates are realigned and averaged.

Models with ``normalize_input`` get demucs' track-level normalisation: subtract the mean and divide
by the standard deviation of the mono mix of the *whole track*, undo it on the estimates. For files,
:func:`separate_track` computes those statistics in a first streaming pass.
"""

from __future__ import annotations

import contextlib
import math
import queue
import random
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from demix.models.base import Separator

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class SeparationSettings:
    """How a model is applied to long audio.

    Attributes:
        segment: chunk length in seconds; ``None`` uses the model's own ``segment``.
        overlap: fraction of a chunk shared with the next one, in ``[0, 1)``.
        shifts: number of randomly shifted passes averaged (0 or 1 = a single pass).
        batch_size: chunks per forward call.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; where chunks are computed. The long buffers
            stay on the host.
        dtype: compute dtype (``float32``, ``float16``, ``bfloat16``) used through autocast.
        transition_power: the triangular window is raised to this power (demucs' default is 1).
        seed: seeds the random shifts, so a run is reproducible.
    """

    segment: float | None = None
    overlap: float = 0.25
    shifts: int = 0
    batch_size: int = 1
    device: str = "cpu"
    dtype: str = "float32"
    transition_power: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.segment is not None and not self.segment > 0:
            raise ValueError(f"segment must be > 0 seconds. Found: {self.segment}")
        if not 0 <= self.overlap < 1:
            raise ValueError(f"overlap must be in [0, 1). Found: {self.overlap}")
        if self.shifts < 0:
            raise ValueError(f"shifts must be >= 0. Found: {self.shifts}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1. Found: {self.batch_size}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}. Found: {self.dtype!r}")
        if self.transition_power <= 0:
            raise ValueError(f"transition_power must be > 0. Found: {self.transition_power}")

    def segment_samples(self, model: Separator) -> int:
        """Chunk length in samples at the model's rate."""
        return max(1, round((self.segment or model.segment) * model.sample_rate))

    def hash_fields(self) -> dict:
        """Settings that change the output (device excluded), for cache keys and manifests."""
        return {
            "segment": self.segment,
            "overlap": self.overlap,
            "shifts": self.shifts,
            "dtype": self.dtype,
            "transition_power": self.transition_power,
            "seed": self.seed,
        }


def triangle_window(length: int, power: float = 1.0) -> Tensor:
    """Triangular weight of ``length`` samples, peak 1, strictly positive, raised to ``power``."""
    half = length // 2
    weight = torch.cat([torch.arange(1, half + 1), torch.arange(length - half, 0, -1)]).float()
    return (weight / weight.max()) ** power


@dataclass
class _Stats:
    mean: float = 0.0
    std: float = 1.0


class _OverlapAdd:
    """One overlap-add pass over a stream: push input blocks, receive finished output.

    Holds at most ``segment + batch_size * stride`` input samples and as many output samples.
    """

    def __init__(self, model: Separator, settings: SeparationSettings, run: Callable[[Tensor], Tensor]) -> None:
        self.length = settings.segment_samples(model)
        self.stride = max(1, int((1 - settings.overlap) * self.length))
        self.batch_size = settings.batch_size
        self.window = triangle_window(self.length, settings.transition_power)
        self.run = run
        self.sources = len(model.sources)
        self.channels = model.audio_channels
        self.inp = torch.zeros(self.channels, 0)
        self.inp_start = 0  # absolute index of inp[:, 0]
        self.total = 0  # samples pushed so far
        self.next_chunk = 0  # absolute start of the next chunk to compute
        self.out = torch.zeros(self.sources, self.channels, 0)
        self.wsum = torch.zeros(0)
        self.out_start = 0  # absolute index of out[..., 0]; everything before it was emitted

    def push(self, block: Tensor) -> Tensor:
        self.inp = torch.cat([self.inp, block], dim=-1)
        self.total += block.shape[-1]
        return self._drain(final=False)

    def finish(self) -> Tensor:
        return self._drain(final=True)

    def _ready_chunks(self, final: bool) -> list[int]:
        starts = []
        start = self.next_chunk
        while len(starts) < self.batch_size and start < self.total:
            if not final and start + self.length > self.total:
                break
            starts.append(start)
            start += self.stride
        return starts

    def _drain(self, final: bool) -> Tensor:
        while True:
            starts = self._ready_chunks(final)
            if not starts or (not final and len(starts) < self.batch_size):
                break
            self._compute(starts)
        end = self.total if final else self.next_chunk
        return self._emit(end)

    def _compute(self, starts: list[int]) -> None:
        chunks = []
        for s in starts:
            piece = self.inp[:, s - self.inp_start : s - self.inp_start + self.length]
            if piece.shape[-1] < self.length:
                piece = torch.nn.functional.pad(piece, (0, self.length - piece.shape[-1]))
            chunks.append(piece)
        est = self.run(torch.stack(chunks))  # (batch, sources, channels, length)
        expected = (len(starts), self.sources, self.channels, self.length)
        if tuple(est.shape) != expected:
            raise RuntimeError(f"model returned shape {tuple(est.shape)} for a chunk batch; expected {expected}")
        need = starts[-1] + self.length - self.out_start
        if self.out.shape[-1] < need:
            grow = need - self.out.shape[-1]
            self.out = torch.nn.functional.pad(self.out, (0, grow))
            self.wsum = torch.nn.functional.pad(self.wsum, (0, grow))
        for i, s in enumerate(starts):
            a = s - self.out_start
            self.out[..., a : a + self.length] += est[i] * self.window
            self.wsum[a : a + self.length] += self.window
        self.next_chunk = starts[-1] + self.stride
        # input before the next chunk is never read again
        drop = min(self.next_chunk, self.total) - self.inp_start
        if drop > 0:
            self.inp = self.inp[:, drop:]
            self.inp_start += drop

    def _emit(self, end: int) -> Tensor:
        n = min(end, self.total) - self.out_start
        if n <= 0:
            return torch.zeros(self.sources, self.channels, 0)
        done = self.out[..., :n] / self.wsum[:n]
        self.out = self.out[..., n:]
        self.wsum = self.wsum[n:]
        self.out_start += n
        return done


def _runner(model: Separator, settings: SeparationSettings) -> Callable[[Tensor], Tensor]:
    device = torch.device(settings.device)
    dtype = _DTYPES[settings.dtype]

    def run(chunks: Tensor) -> Tensor:
        x = chunks.to(device, non_blocking=True)
        ctx = (
            torch.autocast(device_type=device.type, dtype=dtype)
            if dtype is not torch.float32
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), ctx:
            y = model(x)
        return y.float().cpu()

    return run


class _Passes:
    """Several overlap-add passes over one stream, each delayed by its own zero prefix; realigned."""

    def __init__(self, model: Separator, settings: SeparationSettings) -> None:
        run = _runner(model, settings)
        n = max(1, settings.shifts)
        if n > 1:
            max_shift = int(0.5 * model.sample_rate)
            rng = random.Random(settings.seed)
            self.pads = [max_shift - rng.randint(0, max_shift) for _ in range(n)]
        else:
            self.pads = [0]
        self.engines = [_OverlapAdd(model, settings, run) for _ in self.pads]
        self.skip = list(self.pads)
        self.pending: list[list[Tensor]] = [[] for _ in self.pads]
        self.pending_len = [0] * n
        self.channels = model.audio_channels

    def _collect(self, i: int, block: Tensor) -> None:
        if self.skip[i]:
            cut = min(self.skip[i], block.shape[-1])
            block = block[..., cut:]
            self.skip[i] -= cut
        if block.shape[-1]:
            self.pending[i].append(block)
            self.pending_len[i] += block.shape[-1]

    def _combine(self) -> Tensor | None:
        ready = min(self.pending_len)
        if ready == 0:
            return None
        parts = []
        for i in range(len(self.engines)):
            cat = torch.cat(self.pending[i], dim=-1)
            parts.append(cat[..., :ready])
            rest = cat[..., ready:]
            self.pending[i] = [rest] if rest.shape[-1] else []
            self.pending_len[i] = rest.shape[-1]
        return parts[0] if len(parts) == 1 else torch.stack(parts).mean(0)

    def push(self, x: Tensor) -> Tensor | None:
        for i, engine in enumerate(self.engines):
            if engine.total == 0 and self.pads[i]:
                self._collect(i, engine.push(torch.zeros(self.channels, self.pads[i])))
            self._collect(i, engine.push(x))
        return self._combine()

    def finish(self) -> Tensor | None:
        for i, engine in enumerate(self.engines):
            self._collect(i, engine.finish())
        return self._combine()


def separate_stream(
    model: Separator,
    blocks: Iterable[Tensor],
    settings: SeparationSettings = SeparationSettings(),
    *,
    stats: tuple[float, float] | None = None,
) -> Iterator[Tensor]:
    """Separate a stream of ``(channels, n)`` blocks into a stream of ``(sources, channels, m)`` blocks.

    The concatenated output has exactly the input's length. ``stats`` is ``(mean, std)`` of the
    whole track's mono mix, required when ``model.normalize_input`` (see :func:`track_stats`).
    """
    if model.normalize_input and stats is None:
        raise ValueError(f"model {type(model).__name__} needs track statistics: pass stats=track_stats(...)")
    mean, std = stats if (model.normalize_input and stats is not None) else (0.0, 1.0)
    std = std if std > 1e-8 else 1.0
    passes = _Passes(model, settings)
    for block in blocks:
        if block.ndim != 2 or block.shape[0] != model.audio_channels:
            raise ValueError(f"Expected ({model.audio_channels}, time) blocks. Found: {tuple(block.shape)}")
        if block.shape[-1] == 0:
            continue
        out = passes.push((block.float() - mean) / std)
        if out is not None:
            yield out * std + mean
    out = passes.finish()
    if out is not None:
        yield out * std + mean


def track_stats(blocks: Iterable[Tensor]) -> tuple[float, float]:
    """``(mean, std)`` of the mono mix of ``(channels, n)`` blocks, in one pass (float64 sums)."""
    n, s, s2 = 0, 0.0, 0.0
    for block in blocks:
        mono = block.double().mean(0)
        n += mono.numel()
        s += float(mono.sum())
        s2 += float((mono * mono).sum())
    if n == 0:
        return 0.0, 1.0
    mean = s / n
    var = max(s2 / n - mean * mean, 0.0) * n / max(n - 1, 1)  # unbiased, like torch.std
    return mean, math.sqrt(var)


def separate(model: Separator, mix: Tensor, settings: SeparationSettings = SeparationSettings()) -> Tensor:
    """Separate audio held in memory.

    Args:
        mix: ``(channels, time)`` or ``(batch, channels, time)`` at ``model.sample_rate``.

    Returns:
        ``(sources, channels, time)`` or ``(batch, sources, channels, time)``.
    """
    if mix.ndim == 2:
        stats = track_stats([mix]) if model.normalize_input else None
        parts = list(separate_stream(model, [mix], settings, stats=stats))
        if not parts:
            return torch.zeros(len(model.sources), mix.shape[0], 0)
        return torch.cat(parts, dim=-1)
    if mix.ndim == 3:
        return torch.stack([separate(model, m, settings) for m in mix])
    raise ValueError(f"Expected (channels, time) or (batch, channels, time). Found: {tuple(mix.shape)}")


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
        return {name: est[list(idx)].sum(0) for name, idx in self.outputs}


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


class TrackError(RuntimeError):
    """Separating one track failed; ``stage`` is read, decode, separate, encode, presence or write."""

    def __init__(self, source: str, stage: str, cause: BaseException) -> None:
        super().__init__(f"{source}: {stage} failed: {type(cause).__name__}: {cause}")
        self.source = source
        self.stage = stage
        self.cause = cause

    def __reduce__(self):  # picklable across Ray processes despite the custom __init__
        return (type(self), (self.source, self.stage, self.cause))

    @property
    def error_type(self) -> str:
        return type(self.cause).__name__


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
    presence: dict = field(default_factory=dict)  # stem -> demix.pipeline.engine.presence.Presence (when a detector ran)


def _stage_of(err: BaseException, default: str) -> str:
    from demix.pipeline.io.audio import AudioError
    from demix.pipeline.io.storage import StorageError

    if isinstance(err, (AudioError, StorageError)):
        return err.stage
    return default


def separate_track(
    model: Separator,
    source: str,
    outputs: dict[str, str],
    *,
    plan: StemPlan,
    encoding,
    settings: SeparationSettings = SeparationSettings(),
    block_seconds: float = 30.0,
    progress: Callable[[float], None] | None = None,
    presence=None,
) -> TrackResult:
    """Decode ``source``, separate it chunk by chunk and write each stem in ``plan`` to ``outputs[stem]``.

    Streams end to end: decoded audio, estimates and encoders see blocks of ``block_seconds``; a
    remote source is first copied to a local temp file. Each stem is staged and committed to its
    final URI only after the whole track succeeded, so a failure leaves no partial stem behind.

    Args:
        outputs: final URI for every stem name in ``plan``.
        encoding: a :class:`demix.pipeline.io.audio.Encoding`.
        progress: called with seconds of input processed after each block.
        presence: a :class:`demix.pipeline.engine.presence.Detector`; frame features of every model source, every
            summed stem and the mixture (the sum of the sources) are gathered while encoding, and
            the detector's verdict per written stem lands in :attr:`TrackResult.presence`.

    Raises:
        TrackError: naming the source and the stage (read, decode, separate, encode, presence, write).
    """
    import time

    from demix.pipeline.io.audio import AudioWriter, open_audio, stream_conformed
    from demix.pipeline.io.storage import AtomicOutput, local_copy

    missing = [s for s in plan.names if s not in outputs]
    if missing:
        raise ValueError(f"no output URI for stems {missing}")
    started = time.perf_counter()
    stage = "read"
    try:
        with local_copy(source) as path, AtomicOutput() as staged:
            stage = "decode"
            stats = None
            if model.normalize_input:
                with open_audio(path, name=source) as stream:
                    stats = track_stats(
                        stream_conformed(
                            stream, target_rate=model.sample_rate, target_channels=model.audio_channels,
                            block_seconds=block_seconds, source=source,
                        )
                    )
            with open_audio(path, name=source) as stream, contextlib.ExitStack() as writers_open:
                info = stream.info
                stage = "encode"
                # a writer leaving its ``with`` by an exception discards its output instead of encoding it
                writers = {
                    stem: writers_open.enter_context(
                        AudioWriter(
                            staged.path_for(outputs[stem]), sample_rate=model.sample_rate,
                            channels=model.audio_channels, encoding=encoding, source=outputs[stem],
                        )
                    )
                    for stem in plan.names
                }
                stage = "decode"
                blocks = stream_conformed(
                    stream, target_rate=model.sample_rate, target_channels=model.audio_channels,
                    block_seconds=block_seconds, source=source,
                )
                frames = 0

                energy = dict.fromkeys(plan.names, 0.0)
                features = None
                if presence is not None:
                    from demix.pipeline.engine.presence import MIXTURE, FrameFeatures

                    summed = tuple(n for n in plan.names if n not in model.sources)
                    features = FrameFeatures((*model.sources, *summed, MIXTURE), model.sample_rate)

                def encode(est: Tensor) -> None:
                    stems = plan.apply(est)
                    for stem, wav in stems.items():
                        energy[stem] += float(wav.double().square().sum())
                        writers[stem].write(wav)
                    if features is not None:
                        features.push(torch.cat([est, torch.stack([stems[n] for n in summed] + [est.sum(0)])]))

                stage = "separate"
                # decoding runs ahead and encoding runs behind in their own threads, so the model
                # is not kept waiting on I/O (all three release the GIL in their heavy parts)
                with _Prefetch(_counting(blocks, progress, model.sample_rate), depth=2) as ahead, _Behind(encode) as behind:
                    for est in separate_stream(model, ahead, settings, stats=stats):
                        frames += est.shape[-1]
                        behind.submit(est)
                stage = "encode"
            verdict = {}
            if features is not None:
                stage = "presence"
                verdict = presence(features.finish(), plan.names)
            stage = "write"
            committed = staged.commit()
    except TrackError:
        raise
    except Exception as err:  # noqa: BLE001 - every failure becomes one typed, staged error
        raise TrackError(source, _stage_of(err, stage), err) from err
    return TrackResult(
        source=source,
        stems=dict(zip(plan.names, committed)),
        duration_s=frames / model.sample_rate,
        source_sample_rate=info.sample_rate,
        source_channels=info.channels,
        elapsed_s=time.perf_counter() - started,
        decoder=info.decoder,
        num_frames=frames,
        rms_dbfs={stem: _dbfs(e, frames * model.audio_channels) for stem, e in energy.items()},
        presence=verdict,
    )


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


class _Raised:
    def __init__(self, err: BaseException) -> None:
        self.err = err


_DONE = object()


class _Prefetch:
    """Iterate ``items`` in a worker thread, up to ``depth`` items ahead of the consumer.

    An exception in the worker is re-raised in the consumer at the same position. Leaving the
    ``with`` block stops the worker and waits for it, so the source can be closed safely after.
    """

    def __init__(self, items: Iterable, depth: int = 2) -> None:
        self._items = items
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="demix-prefetch", daemon=True)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _work(self) -> None:
        try:
            for item in self._items:
                if not self._put(item):
                    return
            self._put(_DONE)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            self._put(_Raised(err))

    def __iter__(self) -> Iterator:
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if isinstance(item, _Raised):
                raise item.err
            yield item

    def __enter__(self) -> _Prefetch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self._queue.get(timeout=0.05)
        self._thread.join()


class _Behind:
    """Apply ``fn`` to submitted items in order, in a worker thread, at most ``depth`` behind.

    The first exception in ``fn`` is re-raised by the next :meth:`submit` or on leaving the block.
    """

    def __init__(self, fn: Callable, depth: int = 2) -> None:
        self._fn = fn
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="demix-encode", daemon=True)

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if self._error is None:
                try:
                    self._fn(item)
                except BaseException as err:  # noqa: BLE001 - re-raised by the producer
                    self._error = err

    def submit(self, item) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(item)

    def __enter__(self) -> _Behind:
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._queue.put(_DONE)
        self._thread.join()
        if exc_type is None and self._error is not None:
            raise self._error
