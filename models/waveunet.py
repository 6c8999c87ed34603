"""Wave-U-Net (Stoller, Ewert and Dixon 2018, "Wave-U-Net: a multi-scale neural network for end-to-end
audio source separation", ISMIR), as a :class:`~demix.models.base.Separator`.

Per chunk, on the waveform (no spectrogram)::

    mix (batch, channels, time) at 44.1 kHz
      -> resampled to the network's rate (22.05 kHz, as in the paper), padded to a multiple of 2**depth
      -> `depth` downsampling blocks: 1-D conv (kernel 15, growth * (i + 1) filters, LeakyReLU),
         then decimation by 2 (every other sample, as in the paper)
      -> bottleneck conv (growth * (depth + 1) filters)
      -> `depth` upsampling blocks: linear interpolation x2, concatenation with the block's skip
         features, 1-D conv (kernel 5, LeakyReLU)
      -> concatenation with the (resampled) mixture, 1x1 conv -> (sources - 1) * channels, tanh
      -> back to the input rate: sources[:-1] estimates
    and the last source is the *difference output* (paper, section 3.2.2): mixture minus the sum of
    the others at the input rate, so the estimates sum to the mixture exactly and the band above the
    network's Nyquist frequency goes to the last source ("other").

Convolutions are zero-padded ("same") rather than the paper's context-valid variant: the engine's
overlap-add already gives every chunk context and cross-fades its edges.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torchaudio.functional as AF
from torch import Tensor, nn

from demix.models.base import Separator


def _check(sources: Sequence[str], depth: int, growth: int, kernel_down: int, kernel_up: int, net_rate: int,
           sample_rate: int, segment: float) -> None:
    if isinstance(sources, str) or len(sources) < 2 or len(set(sources)) != len(sources):
        raise ValueError(f"Expected at least two unique source names. Found: {sources!r}")
    if depth < 1:
        raise ValueError(f"Expected depth >= 1. Found: {depth}")
    if growth < 1:
        raise ValueError(f"Expected growth >= 1. Found: {growth}")
    for name, k in (("kernel_down", kernel_down), ("kernel_up", kernel_up)):
        if k < 1 or k % 2 == 0:
            raise ValueError(f"Expected {name} to be odd and >= 1. Found: {k}")
    if not 0 < net_rate <= sample_rate:
        raise ValueError(f"Expected 0 < net_rate <= sample_rate = {sample_rate}. Found: {net_rate}")
    if segment <= 0:
        raise ValueError(f"Expected segment > 0 seconds. Found: {segment}")


class WaveUNet(Separator):
    """Wave-U-Net over stereo (or any channel count) waveforms; see the module docstring.

    Args:
        sources: stem names; the last one is the difference output.
        sample_rate: rate of the audio the model takes and returns.
        net_rate: rate the network runs at (the mixture is resampled to it and back).
        audio_channels: channels in and out.
        depth: downsampling blocks (the paper's L; 12 in the paper).
        growth: filters added per block (the paper's F_c; 24 in the paper).
        kernel_down, kernel_up: kernel sizes of the down and up blocks (15 and 5 in the paper).
        segment: preferred chunk length in seconds for overlap-add.
    """

    masks_sum_to_one = True

    def __init__(
        self, sources: Sequence[str], *, sample_rate: int = 44100, net_rate: int = 22050, audio_channels: int = 2,
        depth: int = 10, growth: int = 24, kernel_down: int = 15, kernel_up: int = 5, segment: float = 6.0,
    ) -> None:
        super().__init__()
        _check(sources, depth, growth, kernel_down, kernel_up, net_rate, sample_rate, segment)
        self.sources = tuple(sources)
        self.sample_rate, self.net_rate = int(sample_rate), int(net_rate)
        self.audio_channels, self.depth, self.segment = int(audio_channels), int(depth), float(segment)
        width = [growth * (i + 1) for i in range(depth + 1)]
        self.down = nn.ModuleList(
            nn.Conv1d(audio_channels if i == 0 else width[i - 1], width[i], kernel_down, padding=kernel_down // 2)
            for i in range(depth)
        )
        self.bottleneck = nn.Conv1d(width[depth - 1], width[depth], kernel_down, padding=kernel_down // 2)
        self.up = nn.ModuleList(
            nn.Conv1d(width[i + 1] + width[i], width[i], kernel_up, padding=kernel_up // 2) for i in reversed(range(depth))
        )
        self.out = nn.Conv1d(width[0] + audio_channels, (len(self.sources) - 1) * audio_channels, 1)

    def forward(self, mix: Tensor) -> Tensor:
        if mix.dim() != 3 or mix.shape[1] != self.audio_channels:
            raise ValueError(f"Expected mix of shape (batch, {self.audio_channels}, time). Found: {tuple(mix.shape)}")
        batch, channels, length = mix.shape
        x = self._to_net(mix)
        n = x.shape[-1]
        block = 2**self.depth
        x = F.pad(x, (0, (-n) % block))
        est = torch.tanh(self.out(torch.cat([self._unet(x), x], 1)))[..., :n]
        est = self._from_net(est, length).view(batch, len(self.sources) - 1, channels, length)
        rest = mix - est.sum(1)
        return torch.cat([est, rest[:, None]], 1)

    def _unet(self, x: Tensor) -> Tensor:
        skips = []
        for conv in self.down:
            x = F.leaky_relu(conv(x), 0.2)
            skips.append(x)
            x = x[..., ::2]  # decimation, as in the paper
        x = F.leaky_relu(self.bottleneck(x), 0.2)
        for conv, skip in zip(self.up, reversed(skips)):
            x = F.interpolate(x, size=skip.shape[-1], mode="linear", align_corners=False)
            x = F.leaky_relu(conv(torch.cat([x, skip], 1)), 0.2)
        return x

    def _to_net(self, mix: Tensor) -> Tensor:
        if self.net_rate == self.sample_rate:
            return mix
        return AF.resample(mix, self.sample_rate, self.net_rate)

    def _from_net(self, est: Tensor, length: int) -> Tensor:
        if self.net_rate != self.sample_rate:
            est = AF.resample(est, self.net_rate, self.sample_rate)
        return F.pad(est, (0, max(0, length - est.shape[-1])))[..., :length]
