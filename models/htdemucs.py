"""Hybrid Transformer Demucs (Rouard et al. 2023) and demucs' bags of models, as :class:`Separator` s.

The network is ``demucs.htdemucs.HTDemucs`` from the ``demucs`` package (4.1, by demucs' author; its
model code needs only torch, einops and julius, and installs beside torch 2.9.1, where 4.0.1 pinned
torchaudio < 2.2). demix builds it from the registry entry's config, never from the class a ``.th``
file names, and loads the file's state (see :mod:`demix.models.checkpoint_formats`).

A bag (``htdemucs_ft``) runs every member on the same chunk and combines their estimates with demucs'
per-source weights: ``out[s] = sum_i w[i][s] * est_i[s] / sum_i w[i][s]``. Overlap-add is linear, so
weighting each chunk gives what demucs' ``apply_model`` gives by weighting whole-track estimates.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction

import torch
from demucs.htdemucs import HTDemucs
from torch import Tensor, nn

from demix.models.base import Separator


class HTDemucsSeparator(Separator):
    """One HT Demucs: ``(batch, 2, time) -> (batch, sources, 2, time)`` at 44.1 kHz, chunks of up to its
    training segment (7.8 s for the published models), demucs' track-level normalisation.

    Args:
        sources: output stems, in the published order.
        config: ``HTDemucs`` keyword arguments (the published package's ``kwargs`` except sources).
    """

    normalize_input = True

    def __init__(self, sources: Sequence[str], config: dict) -> None:
        super().__init__()
        self.sources = tuple(sources)
        self.model = HTDemucs(list(self.sources), **config)
        self.sample_rate = int(self.model.samplerate)
        self.audio_channels = int(self.model.audio_channels)
        self.segment = float(Fraction(self.model.segment))
        self.overlap = 0.25  # demucs' default
        self.max_length = int(Fraction(self.model.segment) * self.sample_rate)

    def forward(self, mix: Tensor) -> Tensor:
        if mix.ndim != 3 or mix.shape[1] != self.audio_channels:
            raise ValueError(f"Expected (batch, {self.audio_channels}, time) input. Found: {tuple(mix.shape)}")
        if mix.shape[-1] > self.max_length:
            raise ValueError(
                f"HT Demucs takes chunks of at most {self.segment:g} s ({self.max_length} samples), its training "
                f"segment; got {mix.shape[-1]} samples: pass --segment {self.segment:g} or less"
            )
        return self.model(mix)

    def weights_module(self) -> nn.Module:
        return self.model


class BagSeparator(Separator):
    """demucs' ``BagOfModels``: members on the same chunk, estimates combined per source with ``weights``.

    Args:
        members: separators with the same sources, rate and channels.
        weights: one row per member, one weight per source (``None``: all ones, a plain average).
    """

    def __init__(self, members: Sequence[Separator], weights: Sequence[Sequence[float]] | None = None) -> None:
        super().__init__()
        first = members[0]
        if any(m.sources != first.sources or m.sample_rate != first.sample_rate for m in members):
            raise ValueError("every member of a bag must return the same sources at the same rate")
        self.members = nn.ModuleList(members)
        rows = weights or [[1.0] * len(first.sources) for _ in members]
        if len(rows) != len(members) or any(len(r) != len(first.sources) for r in rows):
            raise ValueError(f"a bag of {len(members)} models needs {len(members)} rows of {len(first.sources)} weights")
        self.register_buffer("weights", torch.tensor(rows, dtype=torch.float32), persistent=False)
        if bool((self.weights.sum(0) <= 0).any()):
            raise ValueError("every source needs a positive weight in some member of the bag")
        self.sources = first.sources
        self.sample_rate = first.sample_rate
        self.audio_channels = first.audio_channels
        self.segment = min(m.segment for m in members)
        self.overlap = getattr(first, "overlap", None)
        self.normalize_input = first.normalize_input

    def forward(self, mix: Tensor) -> Tensor:
        out = None
        for member, w in zip(self.members, self.weights):
            if not bool((w != 0).any()):
                continue  # a member no source uses is never run
            est = member(mix) * w.to(mix.dtype).view(1, -1, 1, 1)
            out = est if out is None else out + est
        return out / self.weights.sum(0).to(mix.dtype).view(1, -1, 1, 1)
