"""Supervised NMF baseline: contract, exact mixture consistency, and fitting helps."""

from __future__ import annotations

import pytest
import torch

from demix.models.nmf import SupervisedNMF
from demix.models.registry import get_entry, load_model
from demix.pipeline.data.synth import toy_song

SOURCES = ("vocals", "drums", "bass", "other")


def _stems(seed: int, seconds: float = 3.0) -> torch.Tensor:
    song = toy_song(seconds, 44100, seed)
    return torch.stack([torch.from_numpy(song[s]) for s in SOURCES])


def _sdr(ref: torch.Tensor, est: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.square().sum() / (ref - est).square().sum().clamp_min(1e-12)))


def test_shape_and_estimates_sum_to_mixture():
    model = SupervisedNMF(components=4, iters=5)
    assert model.masks_sum_to_one
    x = 0.1 * torch.randn(2, 2, 10001)
    y = model(x)
    assert y.shape == (2, 4, 2, 10001)
    assert torch.allclose(y.sum(1), x, atol=1e-5)
    with pytest.raises(ValueError, match="Expected"):
        model(torch.randn(1, 3, 100))


def test_fitted_dictionaries_separate_better_than_the_mixture():
    model = SupervisedNMF(components=8, iters=40)
    model.fit([_stems(s) for s in range(3)], iters=60)
    test = _stems(7)
    mix = test.sum(0)
    est = model(mix[None])[0]
    gains = [_sdr(test[i], est[i]) - _sdr(test[i], mix) for i in range(4)]
    assert sum(gains) / 4 > 3.0, gains


def test_fit_refuses_a_source_with_no_audio():
    model = SupervisedNMF(components=2)
    stems = _stems(0)
    stems[2] = 0
    with pytest.raises(ValueError, match="bass"):
        model.fit([stems], iters=2)


def test_shipped_nmf_dictionaries_load_verified():
    entry = get_entry("nmf")
    model = load_model("nmf")
    assert model.weights_sha256 == entry.sha256
    assert float(model.dictionaries.min()) >= 0 and model.dictionaries.shape == (4, 1025, 32)
