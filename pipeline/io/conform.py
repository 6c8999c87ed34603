"""Conform audio to a model's rate and channel count: :func:`conform`, :func:`stream_conformed`, :func:`load_audio`.

Shapes: a track is a float32 array or tensor shaped ``(channels, time)``.

Channel policy (what every track becomes before separation)
    - as many channels as the target: kept unchanged;
    - mono: duplicated to every target channel (mono -> identical left and right);
    - any other count (stereo to mono, 5.1 or 8 channels to stereo, ...): the plain mean over all
      channels, duplicated to every target channel. This is deliberately not an ITU 5.1 downmix: the
      LFE and surround channels weigh as much as the front ones, and the result is mono-compatible.

Rate policy
    Any rate is resampled to the target rate with :func:`torchaudio.functional.resample` (default
    windowed-sinc interpolation, no-op when the rates are equal). The streaming path
    (:func:`stream_conformed`) reproduces the whole-track resample block by block, to within float
    rounding, and with exactly the same output length. That length follows torchaudio, which computes
    ``ceil(n_in * target_rate / rate)`` in float32: for tracks longer than about six minutes it can be
    one sample shorter than the exact integer ceiling.

Non-finite samples (NaN, Inf) raise :class:`~demix.pipeline.io.stream.AudioError` naming the source and the
time of the first bad sample.
"""

from __future__ import annotations

import math
import numbers
import os
from functools import lru_cache
from typing import BinaryIO, Iterator

import numpy as np
import torch
import torchaudio

from demix.pipeline.io.decode import open_audio
from demix.pipeline.io.stream import AudioStream, _check_finite, _no_frames, _positive_int

__all__ = ["conform", "load_audio", "stream_conformed"]


def _check_target(target_rate: int, target_channels: int) -> tuple[int, int]:
    return _positive_int(target_rate, "target_rate"), _positive_int(target_channels, "target_channels")


def _as_tensor(wav: np.ndarray | torch.Tensor, what: str = "audio") -> torch.Tensor:
    """A float32 tensor shaped ``(channels, time)`` sharing memory with ``wav`` where possible."""
    if isinstance(wav, np.ndarray):
        if not np.issubdtype(wav.dtype, np.floating):
            raise TypeError(f"Expected floating point {what}. Found dtype: {wav.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32))
    elif isinstance(wav, torch.Tensor):
        if not wav.is_floating_point():
            raise TypeError(f"Expected floating point {what}. Found dtype: {wav.dtype}")
        x = wav.detach().to(torch.float32)
    else:
        raise TypeError(f"Expected a numpy array or torch tensor for {what}. Found: {type(wav).__name__}")
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"Expected {what} shaped (channels, time). Found: {tuple(x.shape)}")
    return x


def _mix(x: torch.Tensor, target_channels: int) -> torch.Tensor:
    """Channel policy, first half: ``(c, n) -> (target_channels or 1, n)``; 1 means 'spread later'."""
    if x.shape[0] == target_channels or x.shape[0] == 1:
        return x
    return x.mean(dim=0, keepdim=True)


def _spread(x: torch.Tensor, target_channels: int) -> torch.Tensor:
    """Channel policy, second half: duplicate a single channel to ``target_channels``."""
    if x.shape[0] == target_channels:
        return x.contiguous()
    return x.expand(target_channels, -1).contiguous()


def conform(
    wav: np.ndarray | torch.Tensor,
    sample_rate: int,
    *,
    target_rate: int,
    target_channels: int = 2,
    source: str = "<memory>",
) -> torch.Tensor:
    """Apply the channel and rate policy (module docstring) to a whole track.

    Args:
        wav: ``(channels, time)`` floating point samples.
        sample_rate: rate of ``wav`` in Hz.
        source: how errors name the audio.

    Returns:
        float32 tensor ``(target_channels, ceil(time * target_rate / sample_rate))``, on ``wav``'s device.

    Raises:
        AudioError: ``stage='decode'`` when ``wav`` holds NaN or Inf.
    """
    target_rate, target_channels = _check_target(target_rate, target_channels)
    sample_rate = _positive_int(sample_rate, "sample_rate")
    x = _as_tensor(wav)
    _check_finite(x, 0, sample_rate, source)
    x = _mix(x, target_channels)
    if sample_rate != target_rate:
        x = torchaudio.functional.resample(x, sample_rate, target_rate)
    return _spread(x, target_channels)


@lru_cache(maxsize=16)
def _resampler(orig: int, new: int) -> torchaudio.transforms.Resample:
    # Same defaults as torchaudio.functional.resample; the kernel is computed once per rate pair.
    return torchaudio.transforms.Resample(orig, new)


def _resampled_length(frames: int, orig: int, new: int) -> int:
    """Samples torchaudio's resample returns for ``frames`` input samples, reproduced exactly.

    torchaudio evaluates ``ceil(new * frames / orig)`` (rates divided by their gcd) through a float32
    tensor, so beyond about 2**24 output samples it can differ by one from the exact integer ceiling.
    """
    if orig == new:
        return frames
    g = math.gcd(orig, new)
    return int(torch.ceil(torch.as_tensor(new // g * frames / (orig // g))).long())


class _StreamResampler:
    """Resample a signal fed in blocks exactly like one torchaudio resample of the whole signal.

    torchaudio's resampler is a strided convolution: output frame ``j`` (``new`` samples after the
    rates are divided by their gcd) reads input ``[j * orig - width, (j + 1) * orig + width)``, with
    zeros outside the signal. Each call resamples a segment that starts ``ctx`` samples (a multiple of
    ``orig``) before the first pending frame and ends ``ctx`` after the last frame it can finish, and
    keeps only the frames whose whole window lies inside the segment. The first segment is preceded
    by ``ctx`` explicit zeros, which is exactly torchaudio's left padding.
    """

    def __init__(self, orig_rate: int, new_rate: int) -> None:
        self.identity = orig_rate == new_rate
        self.orig_rate, self.new_rate = orig_rate, new_rate
        g = math.gcd(orig_rate, new_rate)
        self.orig, self.new = orig_rate // g, new_rate // g
        self.n_in = 0
        if self.identity:
            return
        self._t = _resampler(orig_rate, new_rate)
        self.k = max(1, math.ceil(self._t.width / self.orig))
        self.ctx = self.k * self.orig
        self._buf: torch.Tensor | None = None  # input from global index _buf_start on
        self._buf_start = -self.ctx
        self._next = 0  # next output frame

    def feed(self, x: torch.Tensor) -> torch.Tensor | None:
        """Add ``(c, n)`` input; return the output samples that are now final, if any."""
        self.n_in += x.shape[1]
        if self.identity:
            return x
        if self._buf is None:
            self._buf = torch.cat([x.new_zeros(x.shape[0], self.ctx), x], dim=1)
        else:
            self._buf = torch.cat([self._buf, x], dim=1)
        last = self.n_in // self.orig - self.k  # frames < last have their whole window available
        if last <= self._next:
            return None
        seg = self._buf[:, self._next * self.orig - self.ctx - self._buf_start : last * self.orig + self.ctx - self._buf_start]
        out = self._t(seg)[:, self.k * self.new : (self.k + last - self._next) * self.new]
        keep = last * self.orig - self.ctx
        self._buf = self._buf[:, keep - self._buf_start :].clone()
        self._buf_start, self._next = keep, last
        return out

    def finish(self) -> torch.Tensor | None:
        """Return the remaining output; the total length equals torchaudio's for the whole signal."""
        if self.identity or self._buf is None:
            return None
        remaining = _resampled_length(self.n_in, self.orig_rate, self.new_rate) - self._next * self.new
        if remaining <= 0:
            return None
        seg = self._buf[:, self._next * self.orig - self.ctx - self._buf_start :]
        # Trailing zeros beyond torchaudio's own right padding only add frames that are cut off below.
        seg = torch.cat([seg, seg.new_zeros(seg.shape[0], self.ctx)], dim=1)
        self._buf = None
        return self._t(seg)[:, self.k * self.new : self.k * self.new + remaining]


def stream_conformed(
    stream: AudioStream,
    *,
    target_rate: int,
    target_channels: int = 2,
    block_seconds: float = 30.0,
    source: str | None = None,
) -> Iterator[torch.Tensor]:
    """Decode ``stream`` and apply the channel and rate policy block by block, in bounded memory.

    The concatenated output equals :func:`conform` of the whole track (within 1e-4, same length).

    Args:
        stream: an unread :class:`AudioStream` (its :meth:`~AudioStream.blocks` is consumed).
        block_seconds: input seconds decoded per block.
        source: how errors name the audio (default: ``stream.name``).

    Yields:
        float32 tensors ``(target_channels, n)`` at ``target_rate``, in order.

    Raises:
        AudioError: when decoding fails, a sample is NaN or Inf, or the stream holds no frames.
    """
    target_rate, target_channels = _check_target(target_rate, target_channels)
    if isinstance(block_seconds, bool) or not isinstance(block_seconds, numbers.Real) or not 0 < block_seconds < math.inf:
        raise ValueError(f"block_seconds must be a positive number, got {block_seconds!r}")
    label = source or stream.name
    frames = max(1, int(round(block_seconds * stream.info.sample_rate)))
    return _stream_conformed(stream, frames, target_rate, target_channels, label)


def _stream_conformed(
    stream: AudioStream, frames: int, target_rate: int, target_channels: int, label: str
) -> Iterator[torch.Tensor]:
    rate, channels = stream.info.sample_rate, stream.info.channels
    resampler = _StreamResampler(rate, target_rate)
    offset = 0
    for block in stream.blocks(frames):
        x = _as_tensor(block, "decoded block")
        if x.shape[0] != channels:
            raise ValueError(f"Expected decoded blocks with {channels} channels. Found: {tuple(x.shape)}")
        _check_finite(x, offset, rate, label)
        offset += x.shape[1]
        out = resampler.feed(_mix(x, target_channels))
        if out is not None and out.shape[1]:
            yield _spread(out, target_channels)
    if offset == 0:
        raise _no_frames(label)
    out = resampler.finish()
    if out is not None and out.shape[1]:
        yield _spread(out, target_channels)


def load_audio(
    source: str | os.PathLike | BinaryIO | bytes,
    *,
    target_rate: int,
    target_channels: int = 2,
    name: str | None = None,
) -> torch.Tensor:
    """Decode a whole track and conform it: float32 ``(target_channels, time)`` at ``target_rate``.

    Raises:
        AudioError: see :func:`open_audio` and :func:`stream_conformed`.
    """
    _check_target(target_rate, target_channels)
    with open_audio(source, name=name) as stream:
        parts = list(stream_conformed(stream, target_rate=target_rate, target_channels=target_channels))
    return torch.cat(parts, dim=1)
