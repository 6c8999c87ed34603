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
:func:`demix.pipeline.engine.track.separate_track` computes those statistics in a first streaming pass.
"""

from __future__ import annotations

import argparse
import math
import random
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from demix.models.base import Separator
from demix.pipeline.engine.batcher import DTYPES as _DTYPES, DirectRunner, ModelBatcher, Ticket, make_runner

Stage = DirectRunner | ModelBatcher
"""Where chunks are computed: at once in the caller's thread, or by a shared model stage."""


DEFAULT_OVERLAP = 0.25


@dataclass(frozen=True)
class SeparationSettings:
    """How a model is applied to long audio.

    Attributes:
        segment: chunk length in seconds; ``None`` uses the model's own ``segment``.
        overlap: fraction of a chunk shared with the next one, in ``[0, 1)``; ``None`` uses the model's
            own ``overlap`` (the publisher's: 0.5 for the RoFormers) or ``DEFAULT_OVERLAP``.
        shifts: number of randomly shifted passes averaged (0 or 1 = a single pass).
        batch_size: chunks per forward call.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; where chunks are computed. The long buffers
            stay on the host.
        dtype: compute dtype (``float32``, ``float16``, ``bfloat16``) used through autocast.
        transition_power: the triangular window is raised to this power (demucs' default is 1).
        seed: seeds the random shifts, so a run is reproducible.
    """

    segment: float | None = None
    overlap: float | None = None
    shifts: int = 0
    batch_size: int = 1
    device: str = "cpu"
    dtype: str = "float32"
    transition_power: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.segment is not None and not self.segment > 0:
            raise ValueError(f"segment must be > 0 seconds. Found: {self.segment}")
        if self.overlap is not None and not 0 <= self.overlap < 1:
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

    def overlap_for(self, model: Separator | None) -> float:
        """The overlap used for ``model``: this setting, else the model's own, else ``DEFAULT_OVERLAP``."""
        if self.overlap is not None:
            return self.overlap
        own = getattr(model, "overlap", None)
        return float(own) if own is not None else DEFAULT_OVERLAP

    def hash_fields(self, model: Separator | None = None) -> dict:
        """Settings that change the output (device excluded), for cache keys and manifests; the overlap
        as used for ``model`` (so the default hashes as before for models without their own)."""
        return {
            "segment": self.segment,
            "overlap": self.overlap_for(model),
            "shifts": self.shifts,
            "dtype": self.dtype,
            "transition_power": self.transition_power,
            "seed": self.seed,
        }


def add_separation_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The command-line options of :class:`SeparationSettings` (read back by :func:`settings_kwargs`)."""
    parser.add_argument("--segment", type=float, metavar="SECONDS", help="chunk length (default: the model's)")
    parser.add_argument(
        "--overlap", type=float, default=None,
        help=f"chunk overlap fraction in [0, 1) (default: the model's own, else {DEFAULT_OVERLAP})",
    )
    parser.add_argument("--shifts", type=int, default=0, help="random-shift passes to average (default: 0)")
    parser.add_argument("--batch-size", type=int, default=1, help="chunks per forward call (default: 1)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    parser.add_argument(
        "--dtype", choices=tuple(_DTYPES), default="float32", help="compute dtype (default: float32)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for --shifts (default: 0)")


def settings_kwargs(args: argparse.Namespace) -> dict:
    """Keyword arguments of :class:`SeparationSettings` from parsed :func:`add_separation_flags` options
    (``device`` excluded: the caller resolves ``auto``)."""
    return {
        "segment": args.segment, "overlap": args.overlap, "shifts": args.shifts,
        "batch_size": args.batch_size, "dtype": args.dtype, "seed": args.seed,
    }


def triangle_window(length: int, power: float = 1.0) -> Tensor:
    """Triangular weight of ``length`` samples, peak 1, strictly positive, raised to ``power``."""
    half = length // 2
    weight = torch.cat([torch.arange(1, half + 1), torch.arange(length - half, 0, -1)]).float()
    return (weight / weight.max()) ** power


class _OverlapAdd:
    """One overlap-add pass over a stream: push input blocks, receive finished output.

    Chunk groups go to ``stage``; up to ``depth`` groups stay in flight behind the one being waited
    for, so the next chunks are cut while the model computes. Holds at most
    ``segment + (depth + 1) * batch_size * stride`` input samples and as many output samples.
    """

    def __init__(self, model: Separator, settings: SeparationSettings, stage: Stage, depth: int = 0) -> None:
        self.length = settings.segment_samples(model)
        self.stride = max(1, int((1 - settings.overlap_for(model)) * self.length))
        self.batch_size = settings.batch_size
        self.window = triangle_window(self.length, settings.transition_power).numpy()
        self.stage = stage
        self.depth = depth
        self.sources = len(model.sources)
        self.channels = model.audio_channels
        self.inp = np.zeros((self.channels, 0), np.float32)
        self.inp_start = 0  # absolute index of inp[:, 0]
        self.total = 0  # samples pushed so far
        self.next_chunk = 0  # absolute start of the next chunk to cut
        self.inflight: deque[tuple[list[int], Ticket]] = deque()
        self.final_before = 0  # samples before this are final (every chunk covering them is added)
        self.out = np.zeros((self.sources, self.channels, 0), np.float32)
        self.wsum = np.zeros(0, np.float32)
        self.out_start = 0  # absolute index of out[..., 0]; everything before it was emitted
        self._weighted: np.ndarray | None = None  # scratch: one chunk's estimates times the window

    def push(self, block: Tensor) -> Tensor:
        x = block.numpy()
        self.inp = np.concatenate([self.inp, x], axis=-1) if self.inp.shape[-1] else x
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
            self._cut(starts)
            while len(self.inflight) > self.depth:
                self._add(*self.inflight.popleft())
        if final:
            while self.inflight:
                self._add(*self.inflight.popleft())
            return self._emit(self.total)
        return self._emit(self.final_before)

    def _cut(self, starts: list[int]) -> None:
        """Cut the chunks starting at ``starts`` (zero-padded at the end) and hand them to the stage."""
        chunks = np.zeros((len(starts), self.channels, self.length), np.float32)
        for i, s in enumerate(starts):
            piece = self.inp[:, s - self.inp_start : s - self.inp_start + self.length]
            chunks[i, :, : piece.shape[-1]] = piece
        self.inflight.append((starts, self.stage.submit(torch.from_numpy(chunks))))
        self.next_chunk = starts[-1] + self.stride
        # input before the next chunk is never read again
        drop = min(self.next_chunk, self.total) - self.inp_start
        if drop > 0:
            self.inp = self.inp[:, drop:]
            self.inp_start += drop

    def _add(self, starts: list[int], ticket: Ticket) -> None:
        """Weight the estimates of one group and add them to the output (in numpy: one thread, no
        OpenMP team woken per operation; the same IEEE products and sums as torch's)."""
        est = ticket.result()  # (batch, sources, channels, length)
        expected = (len(starts), self.sources, self.channels, self.length)
        if tuple(est.shape) != expected:
            raise RuntimeError(f"model returned shape {tuple(est.shape)} for a chunk batch; expected {expected}")
        est = est.detach().cpu().float().numpy()
        need = starts[-1] + self.length - self.out_start
        if self.out.shape[-1] < need:
            grow = need - self.out.shape[-1]
            self.out = np.concatenate([self.out, np.zeros((self.sources, self.channels, grow), np.float32)], axis=-1)
            self.wsum = np.concatenate([self.wsum, np.zeros(grow, np.float32)])
        if self._weighted is None:
            self._weighted = np.empty((self.sources, self.channels, self.length), np.float32)
        for i, s in enumerate(starts):
            a = s - self.out_start
            np.multiply(est[i], self.window, out=self._weighted)
            self.out[..., a : a + self.length] += self._weighted
            self.wsum[a : a + self.length] += self.window
        self.final_before = starts[-1] + self.stride

    def _emit(self, end: int) -> Tensor:
        n = min(end, self.total) - self.out_start
        if n <= 0:
            return torch.zeros(self.sources, self.channels, 0)
        done = self.out[..., :n] / self.wsum[:n]
        self.out = self.out[..., n:]
        self.wsum = self.wsum[n:]
        self.out_start += n
        return torch.from_numpy(done)


def stage_for(model: Separator, settings: SeparationSettings) -> DirectRunner:
    """The model stage of one track alone: the forward in the caller's thread, on ``settings.device``."""
    return DirectRunner(make_runner(model, settings.device, settings.dtype))


class _Passes:
    """Several overlap-add passes over one stream, each delayed by its own zero prefix; realigned."""

    def __init__(self, model: Separator, settings: SeparationSettings, stage: Stage | None) -> None:
        depth = 0 if stage is None else 1  # a shared stage: keep one more group in flight
        stage = stage or stage_for(model, settings)
        n = max(1, settings.shifts)
        if n > 1:
            max_shift = int(0.5 * model.sample_rate)
            rng = random.Random(settings.seed)
            self.pads = [max_shift - rng.randint(0, max_shift) for _ in range(n)]
        else:
            self.pads = [0]
        self.engines = [_OverlapAdd(model, settings, stage, depth) for _ in self.pads]
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
            pending = self.pending[i]
            # one pending block (a single pass, the default) goes on as it is: cat would copy it
            cat = pending[0] if len(pending) == 1 else torch.cat(pending, dim=-1)
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
    stage: Stage | None = None,
) -> Iterator[Tensor]:
    """Separate a stream of ``(channels, n)`` blocks into a stream of ``(sources, channels, m)`` blocks.

    The concatenated output has exactly the input's length. ``stats`` is ``(mean, std)`` of the
    whole track's mono mix, required when ``model.normalize_input`` (see :func:`track_stats`).
    ``stage``: a shared :class:`~demix.pipeline.engine.batcher.ModelBatcher` (cross-track batches;
    ``settings.device`` and ``dtype`` are then the batcher's business), or ``None``: the forward runs
    in this thread. Same output either way.
    """
    if model.normalize_input and stats is None:
        raise ValueError(f"model {type(model).__name__} needs track statistics: pass stats=track_stats(...)")
    mean, std = stats if (model.normalize_input and stats is not None) else (0.0, 1.0)
    std = std if std > 1e-8 else 1.0
    passes = _Passes(model, settings, stage)
    # without normalisation (mean 0, std 1) the affine maps are the identity: skip two full passes
    # over the input and two over every (sources, channels, n) output block
    normalize = mean != 0.0 or std != 1.0
    for block in blocks:
        if block.ndim != 2 or block.shape[0] != model.audio_channels:
            raise ValueError(f"Expected ({model.audio_channels}, time) blocks. Found: {tuple(block.shape)}")
        if block.shape[-1] == 0:
            continue
        out = passes.push((block.float() - mean) / std if normalize else block.float())
        if out is not None:
            yield out * std + mean if normalize else out
    out = passes.finish()
    if out is not None:
        yield out * std + mean if normalize else out


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
