"""Frame features: per 50 ms frame and named signal, the power in a few frequency bands.

A separation computes them on the fly, so presence (:mod:`demix.pipeline.engine.presence`) costs one
cheap pass over audio that is already in memory (long tracks stream; a frame is 50 ms, so an hour of
audio is 72,000 frames):

- :class:`FrameFeatures` takes blocks of named signals (each source estimate, any summed stem such as
  ``no_vocals``, and the mixture, which is the sum of the sources) and keeps, for every 50 ms frame
  and signal, the power in a few frequency bands (``BAND_EDGES_HZ``). Their sum over bands is the
  frame's mean square.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from demix.pipeline.stems import MIXTURE

FRAME_S = 0.05
"""Frame hop and length in seconds (non-overlapping frames)."""

BAND_EDGES_HZ = (0.0, 200.0, 500.0, 1200.0, 3000.0, 7000.0, math.inf)
"""Frequency bands of the frame features (the last band runs to Nyquist)."""


class PresenceError(ValueError):
    """Presence cannot be computed from what was given (unknown stems, mismatched features)."""


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
        if self._rest is not None and self._rest.shape[-1]:
            # complete the held partial frame from the block's head, instead of concatenating the
            # whole block behind it (a full copy of every pushed block)
            need = self.frame - self._rest.shape[-1]
            if block.shape[-1] < need:
                self._rest = torch.cat([self._rest, block], -1)
                return
            self._out.append(self._frames(torch.cat([self._rest, block[..., :need]], -1)))
            block = block[..., need:]
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
