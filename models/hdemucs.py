"""Hybrid Demucs (Défossez 2021) through torchaudio, as a :class:`~demix.models.base.Separator`.

The network is ``torchaudio.models.hdemucs_high``; the published ``HDEMUCS_HIGH_MUSDB_PLUS`` weights
are the state dict of that module, so :meth:`HDemucsSeparator.weights_module` returns the inner
network and keys match one to one (strict load).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn
from torchaudio.models import hdemucs_high

from demix.models.base import Separator

MUSDB_SOURCES = ("drums", "bass", "other", "vocals")


class HDemucsSeparator(Separator):
    """torchaudio's ``hdemucs_high``: ``(batch, 2, time) -> (batch, sources, 2, time)`` at 44.1 kHz.

    Args:
        sources: output stems, in the order the weights were trained with.
        segment: chunk length in seconds used by overlap-add (torchaudio's tutorial uses 10 s).
    """

    normalize_input = True

    def __init__(self, sources: Sequence[str] = MUSDB_SOURCES, *, segment: float = 10.0) -> None:
        super().__init__()
        self.sources = tuple(sources)
        self.sample_rate = 44100
        self.audio_channels = 2
        self.segment = float(segment)
        self.model: nn.Module = hdemucs_high(sources=list(self.sources))

    def forward(self, mix: Tensor) -> Tensor:
        if mix.ndim != 3 or mix.shape[1] != self.audio_channels:
            raise ValueError(f"Expected (batch, {self.audio_channels}, time) input. Found: {tuple(mix.shape)}")
        return self.model(mix)

    def weights_module(self) -> nn.Module:
        return self.model
