"""Spectrogram U-Net (Jansson et al. 2017, "Singing voice separation with deep U-Net convolutional
networks", ISMIR), extended to several stems and multichannel audio, as a :class:`~demix.models.base.Separator`.

Pipeline, per chunk::

    mix (batch, channels, time)
      -> STFT (hann, center=True)                         (batch, channels, n_fft/2 + 1, frames) complex
      -> magnitude, Nyquist bin dropped, frames padded    (batch, channels, n_fft/2, frames')
      -> U-Net: `depth` strided 5x5 conv blocks down, `depth` 5x5 transposed conv blocks up,
         skip connections by concatenation                (batch, sources * channels, n_fft/2, frames')
      -> masks (sigmoid per stem, or softmax across stems), Nyquist bin given a uniform 1/sources mask
                                                          (batch, sources, channels, n_fft/2 + 1, frames)
      -> estimate = mask * mixture magnitude, with the mixture phase or Griffin-Lim phase
      -> iSTFT (length = input length)                    (batch, sources, channels, time)

The network sees the raw (unnormalised) magnitude, as Spleeter's U-Net does; the first BatchNorm
absorbs the scale during training.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from demix.models.base import Separator
from demix.pipeline.stems import STEMS

MASKS = ("sigmoid", "softmax")
PHASES = ("mixture", "griffinlim")

GRIFFIN_LIM_MOMENTUM = 0.99
"""Momentum of the fast Griffin-Lim update (Perraudin et al. 2013), torchaudio's default."""

_DECODER_DROPOUT_BLOCKS = 3
"""Jansson et al. apply dropout in the first three decoder blocks."""


def _is_power_of_two(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def _check_options(
    sources: Sequence[str], *, sample_rate: int, audio_channels: int, n_fft: int, hop_length: int, depth: int,
    channels: int, dropout: float, mask: str, phase: str, griffin_lim_iters: int, segment: float,
) -> None:
    """``ValueError`` naming the first of :class:`SpectrogramUNet`'s arguments that is out of range."""
    if isinstance(sources, str) or len(sources) == 0 or not all(isinstance(s, str) for s in sources):
        raise ValueError(f"Expected sources to be a non-empty sequence of names. Found: {sources!r}")
    if len(set(sources)) != len(sources):
        raise ValueError(f"Expected unique source names. Found: {tuple(sources)}")
    if sample_rate <= 0:
        raise ValueError(f"Expected sample_rate > 0. Found: {sample_rate}")
    if audio_channels < 1:
        raise ValueError(f"Expected audio_channels >= 1. Found: {audio_channels}")
    if depth < 1:
        raise ValueError(f"Expected depth >= 1. Found: {depth}")
    if not _is_power_of_two(n_fft) or n_fft // 2 < 2**depth:
        raise ValueError(
            f"Expected n_fft to be a power of two with n_fft / 2 >= 2 ** depth = {2**depth}. Found: n_fft={n_fft}"
        )
    if not 0 < hop_length < n_fft:
        raise ValueError(f"Expected 0 < hop_length < n_fft = {n_fft}. Found: {hop_length}")
    if channels < 1:
        raise ValueError(f"Expected channels >= 1. Found: {channels}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"Expected 0 <= dropout < 1. Found: {dropout}")
    if mask not in MASKS:
        raise ValueError(f"Expected mask to be one of {MASKS}. Found: {mask!r}")
    if phase not in PHASES:
        raise ValueError(f"Expected phase to be one of {PHASES}. Found: {phase!r}")
    if griffin_lim_iters < 1:
        raise ValueError(f"Expected griffin_lim_iters >= 1. Found: {griffin_lim_iters}")
    if segment <= 0:
        raise ValueError(f"Expected segment > 0 seconds. Found: {segment}")


def _encoder(in_channels: int, widths: list[int]) -> nn.ModuleList:
    """Encoder blocks: 5x5 stride-2 conv, BatchNorm, LeakyReLU(0.2); block ``i`` has ``widths[i]`` maps."""
    encoder = nn.ModuleList()
    in_ch = in_channels
    for width in widths:
        encoder.append(
            nn.Sequential(
                nn.Conv2d(in_ch, width, kernel_size=5, stride=2, padding=2),
                nn.BatchNorm2d(width),
                nn.LeakyReLU(0.2),
            )
        )
        in_ch = width
    return encoder


def _decoder(widths: list[int], out_channels: int, dropout: float) -> nn.ModuleList:
    """Decoder blocks mirroring :func:`_encoder`'s ``widths``, then the ``out_channels`` mask-logit layer.

    Decoder block j upsamples to the resolution of encoder block depth-2-j and is concatenated with its
    output; the last block maps to one mask logit per stem and channel.
    """
    depth = len(widths)
    decoder = nn.ModuleList()
    in_ch = widths[-1]
    for j in range(depth - 1):
        width = widths[depth - 2 - j]
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(in_ch, width, kernel_size=5, stride=2, padding=2, output_padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        ]
        if j < _DECODER_DROPOUT_BLOCKS:
            layers.append(nn.Dropout(dropout))
        decoder.append(nn.Sequential(*layers))
        in_ch = 2 * width
    decoder.append(
        nn.ConvTranspose2d(in_ch, out_channels, kernel_size=5, stride=2, padding=2, output_padding=1)
    )
    return decoder


class SpectrogramUNet(Separator):
    """Magnitude-masking U-Net: ``(batch, channels, time) -> (batch, sources, channels, time)``.

    Args:
        sources: names of the stems, in output order.
        sample_rate: rate the model is built for, in Hz (the STFT does not depend on it).
        audio_channels: channels of the input; they are the input feature maps of the first
            convolution, so the network sees the channels jointly and outputs one mask per stem
            and channel.
        n_fft: FFT size; a power of two with ``n_fft / 2`` divisible by ``2 ** depth``.
        hop_length: STFT hop in samples, ``0 < hop_length < n_fft``.
        depth: number of encoder (and decoder) blocks; Jansson uses 6.
        channels: feature maps of the first encoder block; block ``i`` has ``channels * 2 ** i``.
        dropout: dropout probability in the first three decoder blocks (Jansson: 0.5).
        mask: ``"sigmoid"`` (Jansson, one independent mask per stem) or ``"softmax"`` (masks
            normalised across stems so that they sum to one in every bin).
        phase: ``"mixture"`` (estimates reuse the mixture phase) or ``"griffinlim"`` (phase
            re-estimated by Griffin-Lim, initialised from the mixture phase).
        griffin_lim_iters: Griffin-Lim iterations when ``phase="griffinlim"``.
        segment: preferred chunk length in seconds for overlap-add.

    With ``mask="softmax"`` and ``phase="mixture"`` the estimates sum to the input (up to float
    rounding): :attr:`masks_sum_to_one` is then ``True``.
    """

    def __init__(
        self,
        sources: Sequence[str] = STEMS,
        *,
        sample_rate: int = 44100,
        audio_channels: int = 2,
        n_fft: int = 1024,
        hop_length: int = 256,
        depth: int = 6,
        channels: int = 16,
        dropout: float = 0.5,
        mask: str = "sigmoid",
        phase: str = "mixture",
        griffin_lim_iters: int = 32,
        segment: float = 6.0,
    ) -> None:
        super().__init__()
        _check_options(
            sources, sample_rate=sample_rate, audio_channels=audio_channels, n_fft=n_fft, hop_length=hop_length,
            depth=depth, channels=channels, dropout=dropout, mask=mask, phase=phase,
            griffin_lim_iters=griffin_lim_iters, segment=segment,
        )
        self.sources = tuple(sources)
        self.sample_rate = int(sample_rate)
        self.audio_channels = int(audio_channels)
        self.segment = float(segment)
        self.normalize_input = False
        self.masks_sum_to_one = mask == "softmax" and phase == "mixture"

        self.n_fft = int(n_fft)
        self.hop_length = int(hop_length)
        self.depth = int(depth)
        self.channels = int(channels)
        self.mask = mask
        self.phase = phase
        self.griffin_lim_iters = int(griffin_lim_iters)

        # Derived from n_fft, so not part of the weights; moves with .to() all the same.
        self.register_buffer("window", torch.hann_window(self.n_fft), persistent=False)

        widths = [self.channels * 2**i for i in range(self.depth)]
        self.encoder = _encoder(self.audio_channels, widths)
        self.decoder = _decoder(widths, len(self.sources) * self.audio_channels, dropout)

    def weights_module(self) -> nn.Module:
        """The module whose state dict is the published weights (the whole model)."""
        return self

    # ----------------------------------------------------------------------------------------- API

    def forward(self, mix: Tensor) -> Tensor:
        """Separate ``mix``.

        Args:
            mix: ``(batch, audio_channels, time)``, any ``time >= 1``.

        Returns:
            ``(batch, sources, audio_channels, time)``.
        """
        self._check_input(mix)
        length = mix.shape[-1]
        padded = self._pad_short(mix)
        spec = self._stft(padded)  # (batch, channels, freq, frames)
        masks = self._masks(spec)  # (batch, sources, channels, freq, frames)
        if self.phase == "mixture":
            estimates = self._istft(masks * spec.unsqueeze(1), padded.shape[-1])
        else:
            magnitude = masks * spec.abs().unsqueeze(1)
            estimates = self._griffin_lim(magnitude, spec.unsqueeze(1).expand_as(magnitude), padded.shape[-1])
        return estimates[..., :length]

    def masks(self, mix: Tensor) -> Tensor:
        """Masks the model applies to the STFT of ``mix`` (what :meth:`forward` multiplies with).

        Args:
            mix: ``(batch, audio_channels, time)``.

        Returns:
            ``(batch, sources, audio_channels, n_fft // 2 + 1, frames)`` in ``[0, 1]``, with
            ``frames = 1 + max(time, n_fft) // hop_length`` (inputs shorter than ``n_fft`` are
            zero-padded to ``n_fft``). The Nyquist bin, which the network does not see, gets
            ``1 / len(sources)``.
        """
        self._check_input(mix)
        return self._masks(self._stft(self._pad_short(mix)))

    # ------------------------------------------------------------------------------------- helpers

    def _check_input(self, mix: Tensor) -> None:
        if mix.ndim != 3 or mix.shape[1] != self.audio_channels or mix.shape[-1] < 1:
            raise ValueError(
                f"Expected a 3D tensor (batch, {self.audio_channels}, time) with time >= 1. Found: {tuple(mix.shape)}"
            )

    def _pad_short(self, mix: Tensor) -> Tensor:
        """``(..., time) -> (..., max(time, n_fft))``, zero-padded on the right."""
        short = self.n_fft - mix.shape[-1]
        return F.pad(mix, (0, short)) if short > 0 else mix

    def _stft(self, x: Tensor) -> Tensor:
        """``(..., time) -> (..., n_fft // 2 + 1, frames)`` complex."""
        lead = x.shape[:-1]
        spec = torch.stft(
            x.reshape(-1, x.shape[-1]),
            n_fft=self.n_fft,
            hop_length=self.hop_length,
            window=self.window,
            center=True,
            pad_mode="reflect",
            return_complex=True,
        )
        return spec.reshape(*lead, *spec.shape[-2:])

    def _istft(self, spec: Tensor, length: int) -> Tensor:
        """``(..., n_fft // 2 + 1, frames)`` complex ``-> (..., length)``."""
        lead = spec.shape[:-2]
        wave = torch.istft(
            spec.reshape(-1, *spec.shape[-2:]),
            n_fft=self.n_fft,
            hop_length=self.hop_length,
            window=self.window,
            center=True,
            length=length,
        )
        return wave.reshape(*lead, length)

    def _masks(self, spec: Tensor) -> Tensor:
        """``(batch, channels, freq, frames)`` complex ``-> (batch, sources, channels, freq, frames)``."""
        batch, chans, freq, frames = spec.shape
        magnitude = spec.abs()[:, :, : freq - 1]  # drop Nyquist: n_fft / 2 bins, divisible by 2 ** depth
        stride = 2**self.depth
        pad = -frames % stride
        logits = self._unet(F.pad(magnitude, (0, pad)))[..., :frames]
        logits = logits.reshape(batch, len(self.sources), chans, freq - 1, frames)
        masks = torch.sigmoid(logits) if self.mask == "sigmoid" else torch.softmax(logits, dim=1)
        nyquist = masks.new_full((batch, len(self.sources), chans, 1, frames), 1.0 / len(self.sources))
        return torch.cat([masks, nyquist], dim=3)

    def _unet(self, x: Tensor) -> Tensor:
        """``(batch, audio_channels, freq, frames) -> (batch, sources * audio_channels, freq, frames)``,
        with ``freq`` and ``frames`` multiples of ``2 ** depth``."""
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
        skips.pop()  # the bottleneck is the decoder's input, not a skip
        for block in self.decoder[:-1]:
            x = torch.cat([block(x), skips.pop()], dim=1)
        return self.decoder[-1](x)

    def _griffin_lim(self, magnitude: Tensor, init: Tensor, length: int) -> Tensor:
        """Fast Griffin-Lim (torchaudio's update) started from the phase of ``init``.

        Args:
            magnitude: ``(..., n_fft // 2 + 1, frames)`` target magnitudes.
            init: complex, same shape; its phase starts the iterations (the mixture phase).
            length: samples of the output.

        Returns:
            ``(..., length)``.
        """
        tiny = torch.finfo(magnitude.dtype).tiny
        angles = init / (init.abs() + tiny)
        previous = None
        for _ in range(self.griffin_lim_iters):
            rebuilt = self._stft(self._istft(magnitude * angles, length))
            angles = rebuilt
            if previous is not None:
                angles = angles - previous * (GRIFFIN_LIM_MOMENTUM / (1 + GRIFFIN_LIM_MOMENTUM))
            angles = angles / (angles.abs() + tiny)
            previous = rebuilt
        return self._istft(magnitude * angles, length)
