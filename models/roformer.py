"""BS-RoFormer (Lu et al. 2023) and Mel-Band RoFormer (Wang et al. 2023), written for demix.

Module and parameter names follow the code the published checkpoints were trained with (ZFTurbo's
Music-Source-Separation-Training, ``models/bs_roformer/``, derived from lucidrains' BS-RoFormer 0.3),
so a published ``.ckpt`` state dict loads strictly: ``layers.{i}.{0|1}.layers.{j}.{0|1}...``,
``rotary_embed.freqs`` (stored once per attention block, as rotary-embedding-torch does), BS-RoFormer's
``final_norm`` and two-layer mask MLPs, Mel-Band RoFormer's per-transformer output norms and
``depth + 1``-layer mask MLPs. Why not the pip packages: ``BS-RoFormer`` 1.x renamed and added modules
(value-residual mixing, hyper-connections), so its keys no longer match; MSST itself is not a package.
Only inference is written (no training losses); dropout is a no-op in eval mode.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from demix.models.base import Separator

BS_FREQS_PER_BANDS = (2,) * 24 + (4,) * 12 + (12,) * 8 + (24,) * 8 + (48,) * 8 + (128, 129)
"""BS-RoFormer's 62 bands over the 1025 bins of a 2048-point STFT (the paper's split)."""


class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=-1) * self.scale * self.gamma


class RotaryEmbedding(nn.Module):
    """Rotary position embedding, interleaved pairs (rotary-embedding-torch's default), theta 10000."""

    def __init__(self, dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
        self.freqs = nn.Parameter(freqs, requires_grad=False)

    def rotate(self, t: Tensor) -> Tensor:
        """Rotate ``t`` ``(..., seq, dim)`` by its positions along ``seq``."""
        pos = torch.arange(t.shape[-2], device=t.device, dtype=self.freqs.dtype)
        angles = torch.repeat_interleave(pos[:, None] * self.freqs[None, :], 2, dim=-1).to(t.dtype)
        pairs = t.unflatten(-1, (-1, 2))
        rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
        return t * angles.cos() + rotated * angles.sin()


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        inner = int(dim * mult)
        self.net = nn.Sequential(
            RMSNorm(dim), nn.Linear(dim, inner), nn.GELU(), nn.Dropout(dropout), nn.Linear(inner, dim), nn.Dropout(dropout)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Attention(nn.Module):
    """Pre-norm multi-head attention with rotary positions and a sigmoid gate per head."""

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float, rotary_embed: RotaryEmbedding) -> None:
        super().__init__()
        self.heads = heads
        inner = heads * dim_head
        self.rotary_embed = rotary_embed
        self.norm = RMSNorm(dim)
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_gates = nn.Linear(dim, heads)
        self.to_out = nn.Sequential(nn.Linear(inner, dim, bias=False), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(x)
        b, n, _ = x.shape
        q, k, v = self.to_qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # each (b, h, n, d)
        q, k = self.rotary_embed.rotate(q), self.rotary_embed.rotate(k)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out * self.to_gates(x).transpose(1, 2).unsqueeze(-1).sigmoid()
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class Transformer(nn.Module):
    def __init__(self, *, dim, depth, dim_head, heads, attn_dropout, ff_dropout, rotary_embed, norm_output) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList([Attention(dim, heads, dim_head, attn_dropout, rotary_embed), FeedForward(dim, dropout=ff_dropout)])
            for _ in range(depth)
        )
        self.norm = RMSNorm(dim) if norm_output else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return self.norm(x)


class BandSplit(nn.Module):
    def __init__(self, dim: int, dim_inputs: tuple[int, ...]) -> None:
        super().__init__()
        self.dim_inputs = dim_inputs
        self.to_features = nn.ModuleList(nn.Sequential(RMSNorm(d), nn.Linear(d, dim)) for d in dim_inputs)

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([f(part) for part, f in zip(x.split(self.dim_inputs, dim=-1), self.to_features)], dim=-2)


def _mlp(dim_in: int, dim_out: int, hidden: int, linears: int) -> nn.Sequential:
    dims = (dim_in, *((hidden,) * (linears - 1)), dim_out)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


class MaskEstimator(nn.Module):
    def __init__(self, dim: int, dim_inputs: tuple[int, ...], linears: int, expansion: int) -> None:
        super().__init__()
        self.to_freqs = nn.ModuleList(
            nn.Sequential(_mlp(dim, d * 2, dim * expansion, linears), nn.GLU(dim=-1)) for d in dim_inputs
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([mlp(band) for band, mlp in zip(x.unbind(dim=-2), self.to_freqs)], dim=-1)


def librosa_mel(sr: int, n_fft: int, n_mels: int) -> np.ndarray:
    """``librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels)`` (Slaney scale and norm, float32), the
    same arithmetic in numpy: Mel-Band RoFormer's band layout is the filters' non-zero pattern."""

    def hz_to_mel(f):
        f = np.asanyarray(f, dtype=np.float64)
        mels = f / (200.0 / 3)
        log = f >= 1000.0
        mels = np.where(log, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / (np.log(6.4) / 27.0), mels)
        return mels

    def mel_to_hz(m):
        freqs = (200.0 / 3) * m
        log = m >= 15.0
        return np.where(log, 1000.0 * np.exp((np.log(6.4) / 27.0) * (m - 15.0)), freqs)

    fftfreqs = np.fft.rfftfreq(n=n_fft, d=1.0 / sr)
    mel_f = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(sr / 2.0), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = np.subtract.outer(mel_f, fftfreqs)
    weights = np.zeros((n_mels, 1 + n_fft // 2), dtype=np.float32)
    for i in range(n_mels):
        weights[i] = np.maximum(0, np.minimum(-ramps[i] / fdiff[i], ramps[i + 2] / fdiff[i + 1]))
    weights *= (2.0 / (mel_f[2 : n_mels + 2] - mel_f[:n_mels]))[:, None]
    return weights


class _RoFormerBase(nn.Module):
    """What both RoFormers share: STFT front end, axial transformer stack, complex masks, iSTFT."""

    def _init_common(self, dim, depth, *, stereo, num_stems, time_transformer_depth, freq_transformer_depth,
                     dim_head, heads, attn_dropout, ff_dropout, stft_n_fft, stft_hop_length, stft_win_length,
                     stft_normalized, norm_output) -> None:  # noqa: PLR0913
        self.audio_channels = 2 if stereo else 1
        self.num_stems = num_stems
        kw = dict(dim=dim, heads=heads, dim_head=dim_head, attn_dropout=attn_dropout, ff_dropout=ff_dropout, norm_output=norm_output)
        time_rot, freq_rot = RotaryEmbedding(dim_head), RotaryEmbedding(dim_head)
        self.layers = nn.ModuleList(
            nn.ModuleList([
                Transformer(depth=time_transformer_depth, rotary_embed=time_rot, **kw),
                Transformer(depth=freq_transformer_depth, rotary_embed=freq_rot, **kw),
            ])
            for _ in range(depth)
        )
        self.stft_kwargs = dict(n_fft=stft_n_fft, hop_length=stft_hop_length, win_length=stft_win_length, normalized=stft_normalized)
        self.register_buffer("window", torch.hann_window(stft_win_length), persistent=False)

    def _stft(self, audio: Tensor) -> Tensor:
        """``(b, s, t)`` -> ``(b, f*s, frames, 2)``: stereo interleaved into the frequency axis."""
        b, s, t = audio.shape
        spec = torch.stft(audio.reshape(b * s, t), **self.stft_kwargs, window=self.window, return_complex=True)
        spec = torch.view_as_real(spec).reshape(b, s, *spec.shape[-2:], 2)
        return spec.permute(0, 2, 1, 3, 4).reshape(b, -1, spec.shape[-2], 2)

    def _axial(self, x: Tensor) -> Tensor:
        """``x`` ``(b, frames, bands, d)`` through each (time, frequency) transformer pair."""
        for time_transformer, freq_transformer in self.layers:
            b, t, f, d = x.shape
            x = time_transformer(x.transpose(1, 2).reshape(b * f, t, d)).reshape(b, f, t, d).transpose(1, 2)
            x = freq_transformer(x.reshape(b * t, f, d)).reshape(b, t, f, d)
        return x

    def _istft(self, spec: Tensor, length: int) -> Tensor:
        """``(b, n, f*s, frames)`` complex -> ``(b, n, s, length)``."""
        b, n, fs, frames = spec.shape
        s = self.audio_channels
        spec = spec.reshape(b, n, fs // s, s, frames).permute(0, 1, 3, 2, 4).reshape(b * n * s, fs // s, frames)
        audio = torch.istft(spec, **self.stft_kwargs, window=self.window, return_complex=False, length=length)
        return audio.reshape(b, n, s, length)


class BSRoformer(_RoFormerBase):
    """Band-Split RoPE Transformer: fixed bands (``freqs_per_bands``), one mask per stem."""

    def __init__(self, dim: int, *, depth: int, stereo: bool = False, num_stems: int = 1, time_transformer_depth: int = 2,
                 freq_transformer_depth: int = 2, freqs_per_bands: tuple[int, ...] = BS_FREQS_PER_BANDS, dim_head: int = 64,
                 heads: int = 8, attn_dropout: float = 0.0, ff_dropout: float = 0.0, stft_n_fft: int = 2048,
                 stft_hop_length: int = 512, stft_win_length: int = 2048, stft_normalized: bool = False,
                 mask_estimator_depth: int = 2, mlp_expansion_factor: int = 4) -> None:  # noqa: PLR0913
        super().__init__()
        self._init_common(dim, depth, stereo=stereo, num_stems=num_stems, time_transformer_depth=time_transformer_depth,
                          freq_transformer_depth=freq_transformer_depth, dim_head=dim_head, heads=heads,
                          attn_dropout=attn_dropout, ff_dropout=ff_dropout, stft_n_fft=stft_n_fft,
                          stft_hop_length=stft_hop_length, stft_win_length=stft_win_length,
                          stft_normalized=stft_normalized, norm_output=False)
        if sum(freqs_per_bands) != stft_n_fft // 2 + 1:
            raise ValueError(f"freqs_per_bands must sum to {stft_n_fft // 2 + 1}, found {sum(freqs_per_bands)}")
        self.final_norm = RMSNorm(dim)
        dims = tuple(2 * f * self.audio_channels for f in freqs_per_bands)
        self.band_split = BandSplit(dim, dims)
        self.mask_estimators = nn.ModuleList(MaskEstimator(dim, dims, mask_estimator_depth, mlp_expansion_factor) for _ in range(num_stems))

    def forward(self, audio: Tensor) -> Tensor:
        """``(b, s, t)`` -> ``(b, stems, s, t)``."""
        spec = self._stft(audio)  # (b, f*s, frames, 2)
        x = self.final_norm(self._axial(self.band_split(spec.transpose(1, 2).flatten(2))))
        mask = torch.stack([m(x) for m in self.mask_estimators], dim=1)  # (b, n, frames, f*s*2)
        mask = torch.view_as_complex(mask.unflatten(-1, (-1, 2)).transpose(2, 3).contiguous())
        return self._istft(torch.view_as_complex(spec.contiguous()).unsqueeze(1) * mask, audio.shape[-1])


class MelBandRoformer(_RoFormerBase):
    """Mel-Band RoPE Transformer: overlapping mel bands (``num_bands``), masks averaged where bands overlap."""

    def __init__(self, dim: int, *, depth: int, stereo: bool = False, num_stems: int = 1, time_transformer_depth: int = 2,
                 freq_transformer_depth: int = 2, num_bands: int = 60, dim_head: int = 64, heads: int = 8,
                 attn_dropout: float = 0.1, ff_dropout: float = 0.1, sample_rate: int = 44100, stft_n_fft: int = 2048,
                 stft_hop_length: int = 512, stft_win_length: int = 2048, stft_normalized: bool = False,
                 mask_estimator_depth: int = 1, mlp_expansion_factor: int = 4) -> None:  # noqa: PLR0913
        super().__init__()
        self._init_common(dim, depth, stereo=stereo, num_stems=num_stems, time_transformer_depth=time_transformer_depth,
                          freq_transformer_depth=freq_transformer_depth, dim_head=dim_head, heads=heads,
                          attn_dropout=attn_dropout, ff_dropout=ff_dropout, stft_n_fft=stft_n_fft,
                          stft_hop_length=stft_hop_length, stft_win_length=stft_win_length,
                          stft_normalized=stft_normalized, norm_output=True)
        bank = torch.from_numpy(librosa_mel(sample_rate, stft_n_fft, num_bands))
        bank[0][0] = 1.0  # as the reference code: the first and last bins belong to a band
        bank[-1, -1] = 1.0
        in_band = bank > 0
        freq_indices = torch.arange(bank.shape[1]).expand(num_bands, -1)[in_band]
        if stereo:
            freq_indices = (freq_indices[:, None] * 2 + torch.arange(2)).flatten()
        self.register_buffer("freq_indices", freq_indices, persistent=False)
        self.register_buffer("num_bands_per_freq", in_band.sum(0), persistent=False)
        dims = tuple(2 * int(f) * self.audio_channels for f in in_band.sum(1))
        self.band_split = BandSplit(dim, dims)
        self.mask_estimators = nn.ModuleList(
            MaskEstimator(dim, dims, mask_estimator_depth + 1, mlp_expansion_factor) for _ in range(num_stems)
        )

    def forward(self, audio: Tensor) -> Tensor:
        """``(b, s, t)`` -> ``(b, stems, s, t)``."""
        b, s, _ = audio.shape
        spec = self._stft(audio)  # (b, f*s, frames, 2)
        x = self._axial(self.band_split(spec[:, self.freq_indices].transpose(1, 2).flatten(2)))
        masks = torch.stack([m(x) for m in self.mask_estimators], dim=1)  # (b, n, frames, sel*2)
        masks = torch.view_as_complex(masks.unflatten(-1, (-1, 2)).transpose(2, 3).contiguous())  # (b, n, sel, frames)
        spec = torch.view_as_complex(spec.contiguous())
        index = self.freq_indices.view(1, 1, -1, 1).expand(b, self.num_stems, -1, spec.shape[-1])
        summed = torch.zeros(b, self.num_stems, *spec.shape[1:], dtype=spec.dtype, device=spec.device).scatter_add_(2, index, masks)
        denom = self.num_bands_per_freq.repeat_interleave(s).clamp(min=1e-8).view(-1, 1)
        return self._istft(spec.unsqueeze(1) * (summed / denom), audio.shape[-1])


class RoFormerSeparator(Separator):
    """A vocals RoFormer (``num_stems=1``, target vocals) as a two-stem :class:`Separator`: ``vocals`` is the
    network's estimate and ``instrumental`` the mixture minus it, as MSST and python-audio-separator write them.

    Args:
        arch: ``"bs"`` or ``"mel"``.
        config: the published ``model:`` section of the checkpoint's YAML (keyword arguments of the network).
        chunk_size: the published ``audio.chunk_size`` in samples (the segment).
        overlap: the publisher's overlap fraction (``1 - 1/num_overlap``).
    """

    masks_sum_to_one = True

    def __init__(self, arch: str, config: dict, *, chunk_size: int, overlap: float, sources=("vocals", "instrumental")) -> None:
        super().__init__()
        self.net = (BSRoformer if arch == "bs" else MelBandRoformer)(**config)
        if self.net.num_stems != 1:
            raise ValueError("RoFormerSeparator wraps single-target (vocals) models")
        self.sources = tuple(sources)
        self.sample_rate = 44100
        self.audio_channels = self.net.audio_channels
        self.segment = chunk_size / self.sample_rate
        self.overlap = overlap

    def forward(self, mix: Tensor) -> Tensor:
        if mix.ndim != 3 or mix.shape[1] != self.audio_channels:
            raise ValueError(f"Expected (batch, {self.audio_channels}, time) input. Found: {tuple(mix.shape)}")
        vocals = self.net(mix)[:, 0]
        return torch.stack([vocals, mix - vocals], dim=1)

    def weights_module(self) -> nn.Module:
        return self.net
