"""Shape, mask and training tests for the spectrogram U-Net on tiny configs and random audio."""

from __future__ import annotations

import pytest
import torch

from demix.models.base import Separator
from demix.models.unet import SpectrogramUNet

SOURCES = ("vocals", "drums", "bass", "other")
TINY = dict(depth=3, channels=4, n_fft=256, hop_length=64)


def tiny(sources=SOURCES, **overrides) -> SpectrogramUNet:
    torch.manual_seed(0)
    return SpectrogramUNet(sources, **{**TINY, **overrides})


def noise(batch: int = 2, channels: int = 2, time: int = 4000, seed: int = 1) -> torch.Tensor:
    """``(batch, channels, time)`` white noise."""
    gen = torch.Generator().manual_seed(seed)
    return 0.5 * torch.randn(batch, channels, time, generator=gen)


def test_attributes():
    model = tiny(segment=3.0)
    assert isinstance(model, Separator)
    assert model.sources == SOURCES
    assert model.sample_rate == 44100
    assert model.audio_channels == 2
    assert model.segment == 3.0
    assert model.normalize_input is False
    assert model.masks_sum_to_one is False
    assert tiny(mask="softmax").masks_sum_to_one is True
    assert tiny(mask="softmax", phase="griffinlim").masks_sum_to_one is False


@pytest.mark.parametrize("time", [1, 100, 255, 256, 257, 1001, 4000, 4097])
def test_output_shape_and_length(time):
    model = tiny().eval()
    with torch.inference_mode():
        out = model(noise(batch=2, time=time))
    assert out.shape == (2, len(SOURCES), 2, time)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("audio_channels", [1, 3])
def test_other_channel_counts(audio_channels):
    model = tiny(audio_channels=audio_channels, sources=("a", "b")).eval()
    with torch.inference_mode():
        out = model(noise(batch=1, channels=audio_channels, time=999))
    assert out.shape == (1, 2, audio_channels, 999)


def test_masks_shape():
    model = tiny().eval()
    with torch.inference_mode():
        masks = model.masks(noise(time=1000))
    assert masks.shape == (2, len(SOURCES), 2, 256 // 2 + 1, 1 + 1000 // 64)


def test_softmax_mixture_sums_to_input():
    model = tiny(mask="softmax").eval()
    mix = noise(time=3001)
    with torch.inference_mode():
        masks = model.masks(mix)
        out = model(mix)
    torch.testing.assert_close(masks.sum(dim=1), torch.ones_like(masks[:, 0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.sum(dim=1), mix, atol=1e-4, rtol=0)


def test_sigmoid_masks_in_unit_interval():
    model = tiny().eval()
    with torch.inference_mode():
        masks = model.masks(10 * noise(time=2000))
    assert masks.min() >= 0.0 and masks.max() <= 1.0


def test_griffinlim_phase():
    mix = noise(time=2500)
    mixture = tiny().eval()
    griffin = tiny(phase="griffinlim", griffin_lim_iters=4).eval()
    griffin.load_state_dict(mixture.state_dict(), strict=True)
    with torch.inference_mode():
        out_mixture = mixture(mix)
        out_griffin = griffin(mix)
    assert out_griffin.shape == (2, len(SOURCES), 2, 2500)
    assert torch.isfinite(out_griffin).all()
    assert not torch.allclose(out_griffin, out_mixture, atol=1e-3)


@pytest.mark.parametrize("shape", [(2, 4000), (2, 1, 4000), (1, 3, 4000), (1, 2, 2, 4000), (1, 2, 0)])
def test_bad_input_shape(shape):
    model = tiny()
    with pytest.raises(ValueError, match="Expected a 3D tensor"):
        model(torch.zeros(shape))
    with pytest.raises(ValueError, match="Expected a 3D tensor"):
        model.masks(torch.zeros(shape))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mask="relu"), "Expected mask"),
        (dict(phase="random"), "Expected phase"),
        (dict(n_fft=250), "Expected n_fft"),
        (dict(n_fft=8), "Expected n_fft"),
        (dict(hop_length=256), "Expected 0 < hop_length"),
        (dict(depth=0), "Expected depth"),
        (dict(dropout=1.0), "Expected 0 <= dropout"),
        (dict(griffin_lim_iters=0), "Expected griffin_lim_iters"),
        (dict(sources=()), "Expected sources"),
        (dict(sources="vocals"), "Expected sources"),
        (dict(sources=("a", "a")), "Expected unique"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kwargs)


def test_training_lowers_loss():
    torch.manual_seed(0)
    model = tiny(dropout=0.0).train()
    gen = torch.Generator().manual_seed(2)
    targets = 0.3 * torch.randn(4, len(SOURCES), 2, 2048, generator=gen)
    mix = targets.sum(dim=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(mix), targets)
        loss.backward()
        if not losses:
            for name, param in model.named_parameters():
                assert param.grad is not None and torch.isfinite(param.grad).all(), name
            assert any(param.grad.abs().sum() > 0 for param in model.parameters())
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_state_dict_round_trip():
    model = tiny()
    # A few training-mode forwards so the BatchNorm running statistics are not the defaults.
    with torch.no_grad():
        for seed in range(3):
            model(noise(time=2000, seed=seed))
    model.eval()
    other = SpectrogramUNet(SOURCES, **TINY)
    other.load_state_dict(model.state_dict(), strict=True)
    other.eval()
    assert "window" not in model.state_dict()
    mix = noise(time=3000, seed=7)
    with torch.inference_mode():
        torch.testing.assert_close(other(mix), model(mix), atol=0, rtol=0)


def test_dtype_and_window_follow_to():
    model = tiny().to(torch.float64).eval()
    assert model.window.dtype == torch.float64
    with torch.inference_mode():
        out = model(noise(time=1500).double())
    assert out.dtype == torch.float64
