"""Models with a known answer, for baselines and pipeline benchmarks."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from demix.models.base import Separator
from demix.pipeline.stems import STEMS


class MixtureCopy(Separator):
    """Every source is the mixture itself: the evaluation floor and a zero-cost model for benchmarks.

    ``(batch, channels, time) -> (batch, sources, channels, time)``.
    """

    def __init__(self, sources: Sequence[str] = STEMS, *, segment: float = 10.0) -> None:
        super().__init__()
        self.sources = tuple(sources)
        self.sample_rate = 44100
        self.audio_channels = 2
        self.segment = float(segment)

    def forward(self, mix: Tensor) -> Tensor:
        if mix.ndim != 3 or mix.shape[1] != self.audio_channels:
            raise ValueError(f"Expected (batch, {self.audio_channels}, time) input. Found: {tuple(mix.shape)}")
        return mix[:, None].expand(-1, len(self.sources), -1, -1)
