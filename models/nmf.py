"""Supervised NMF (the seed lecture's classic baseline) as a :class:`~demix.models.base.Separator`.

Training learns one non-negative spectral dictionary per source, ``W_s: (freq, components)``, from
that source's training stems (NMF with multiplicative updates for the KL divergence). At inference the
dictionaries are fixed, ``W = [W_1 ... W_S]``, and only the activations ``H >= 0`` of the mixture's
magnitude ``V ~ W H`` are solved, per channel. Each source is recovered by a Wiener-like soft mask
``(W_s H_s) / (W H)`` applied to the complex mixture STFT, so the estimates sum to the mixture.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from demix.models.base import Separator
from demix.pipeline.stems import STEMS

_EPS = 1e-10


def _kl_updates(v: Tensor, w: Tensor, h: Tensor, iters: int, *, update_w: bool) -> tuple[Tensor, Tensor]:
    """Multiplicative KL-NMF updates. ``v: (freq, frames)``, ``w: (freq, k)``, ``h: (k, frames)``."""
    ones = torch.ones_like(v)
    for _ in range(iters):
        wh = w @ h + _EPS
        h = h * (w.T @ (v / wh)) / (w.T @ ones + _EPS)
        if update_w:
            wh = w @ h + _EPS
            w = w * ((v / wh) @ h.T) / (ones @ h.T + _EPS)
            scale = w.sum(0, keepdim=True) + _EPS  # keep columns normalised, push scale into h
            w = w / scale
            h = h * scale.T
    return w, h


class SupervisedNMF(Separator):
    """``(batch, channels, time) -> (batch, sources, channels, time)``.

    Args:
        sources: output stems, one dictionary each.
        n_fft, hop_length: STFT of the mixture and of the training stems.
        components: dictionary atoms per source.
        iters: multiplicative updates of the activations at inference.
    """

    masks_sum_to_one = True

    def __init__(
        self,
        sources: Sequence[str] = STEMS,
        *,
        sample_rate: int = 44100,
        n_fft: int = 2048,
        hop_length: int = 512,
        components: int = 32,
        iters: int = 60,
        segment: float = 10.0,
    ) -> None:
        super().__init__()
        if components < 1 or iters < 1:
            raise ValueError(f"Expected components >= 1 and iters >= 1. Found: {components}, {iters}")
        self.sources = tuple(sources)
        self.sample_rate = sample_rate
        self.audio_channels = 2
        self.segment = float(segment)
        self.n_fft, self.hop_length, self.components, self.iters = n_fft, hop_length, components, iters
        freq = n_fft // 2 + 1
        # untrained: random positive dictionaries (deterministic under load_model's seed)
        self.register_buffer("dictionaries", torch.rand(len(self.sources), freq, components) + 0.1)
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)

    def _stft(self, x: Tensor) -> Tensor:
        return torch.stft(x, self.n_fft, self.hop_length, window=self.window, center=True, return_complex=True)

    def forward(self, mix: Tensor) -> Tensor:
        if mix.ndim != 3 or mix.shape[1] != self.audio_channels:
            raise ValueError(f"Expected (batch, {self.audio_channels}, time) input. Found: {tuple(mix.shape)}")
        batch, channels, length = mix.shape
        x = mix.reshape(batch * channels, length).float()
        spec = self._stft(x)  # (bc, freq, frames)
        v = spec.abs()
        s, f, k = self.dictionaries.shape
        w = self.dictionaries.permute(1, 0, 2).reshape(f, s * k)
        masks = []
        for i in range(v.shape[0]):
            h = torch.full((s * k, v.shape[-1]), float(v[i].mean()) / (s * k) + _EPS, device=v.device)
            _, h = _kl_updates(v[i], w, h, self.iters, update_w=False)
            parts = torch.einsum("fsk,skt->sft", w.reshape(f, s, k), h.reshape(s, k, -1))
            masks.append(parts / (parts.sum(0, keepdim=True) + _EPS))
        mask = torch.stack(masks, 1)  # (sources, bc, freq, frames)
        est = torch.istft(
            (mask * spec[None]).reshape(s * batch * channels, f, -1), self.n_fft, self.hop_length,
            window=self.window, center=True, length=length,
        )
        return est.reshape(s, batch, channels, length).permute(1, 0, 2, 3).to(mix.dtype)

    @torch.no_grad()
    def fit(
        self, examples: Iterable[Tensor], *, iters: int = 200, max_frames: int = 20000,
        frames_per_example: int = 400, seed: int = 0,
    ) -> None:
        """Learn the dictionaries from ``(sources, channels, time)`` stem examples (silent stems skipped).

        At most ``frames_per_example`` random frames of each stem are kept (memory stays bounded), then
        at most ``max_frames`` per source enter the KL-NMF fit.
        """
        gen = torch.Generator().manual_seed(seed)
        frames: list[list[Tensor]] = [[] for _ in self.sources]
        for stems in examples:
            for j, stem in enumerate(stems):
                mono = stem.float().mean(0)
                if mono.abs().max() < 1e-4:
                    continue
                mag = self._stft(mono[None])[0].abs()
                if mag.shape[-1] > frames_per_example:
                    mag = mag[:, torch.randperm(mag.shape[-1], generator=gen)[:frames_per_example]]
                frames[j].append(mag)
        for j, name in enumerate(self.sources):
            if not frames[j]:
                raise ValueError(f"no non-silent training audio for source {name!r}")
            v = torch.cat(frames[j], dim=-1)
            if v.shape[-1] > max_frames:
                v = v[:, torch.randperm(v.shape[-1], generator=gen)[:max_frames]]
            w = torch.rand(v.shape[0], self.components, generator=gen) + 0.1
            h = torch.rand(self.components, v.shape[-1], generator=gen) + 0.1
            w, _ = _kl_updates(v, w, h, iters, update_w=True)
            self.dictionaries[j] = w
