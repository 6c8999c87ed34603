"""Wave-U-Net (issue 12.5): shapes, the difference output, argument checks, it learns, and it goes
through `demix train --model waveunet`, export and `demix separate --weights` like the other models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from demix.models import load_model
from demix.models.waveunet import WaveUNet
from demix.pipeline.cli.main import main
from test_datasets import make_musdb

SOURCES = ("vocals", "drums", "bass", "other")


def tiny(**kwargs) -> WaveUNet:
    return WaveUNet(SOURCES, **{"depth": 3, "growth": 4, **kwargs})


@pytest.mark.parametrize("time", [1, 777, 4410, 44100])
def test_shape_and_difference_output(time):
    torch.manual_seed(0)
    mix = torch.randn(2, 2, time)
    with torch.no_grad():
        est = tiny()(mix)
    assert est.shape == (2, 4, 2, time)
    torch.testing.assert_close(est.sum(1), mix, atol=1e-5, rtol=0)


def test_same_rate_and_mono():
    model = tiny(net_rate=8000, sample_rate=8000, audio_channels=1)
    with torch.no_grad():
        est = model(torch.randn(1, 1, 1000))
    assert est.shape == (1, 4, 1, 1000)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"depth": 0}, "depth"), ({"growth": 0}, "growth"), ({"kernel_down": 4}, "kernel_down"),
     ({"net_rate": 48000}, "net_rate"), ({"segment": 0}, "segment")],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kwargs)


def test_bad_input_shape():
    with pytest.raises(ValueError, match="batch, 2, time"):
        tiny()(torch.zeros(2, 3, 100))


def test_training_lowers_loss():
    torch.manual_seed(0)
    model = tiny().train()
    gen = torch.Generator().manual_seed(1)
    t = torch.arange(8192) / 44100
    tones = torch.stack([torch.sin(2 * torch.pi * f * t) for f in (200.0, 60.0, 1000.0, 3000.0)])
    amps = torch.rand(4, 4, 1, 1, generator=gen)
    targets = 0.2 * amps * tones[None, :, None, :].expand(4, 4, 2, -1)
    mix = targets.sum(1)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = torch.nn.functional.l1_loss(model(mix), targets)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]


def test_train_export_and_separate_through_the_cli(tmp_path, capsys):
    data = make_musdb(tmp_path / "musdb", ("a", "b", "c"), seconds=1.0, rate=44100)
    run = tmp_path / "run"
    # the shipped architecture (separate has no --option); a few steps on 0.5 s excerpts are cheap
    assert main(["train", str(data), "-o", str(run), "--model", "waveunet", "--steps", "3", "--batch-size", "2",
                 "--excerpt", "0.5", "--valid-every", "3", "--threads", "2", "--export", str(tmp_path / "export")]) == 0
    exported = sorted((tmp_path / "export").glob("waveunet-*.safetensors"))
    assert len(exported) == 1
    info = json.loads(exported[0].with_suffix(".json").read_text())
    assert info["model"] == "waveunet" and info["options"] == {}
    model = load_model("waveunet", weights=str(exported[0]))
    assert model.weights_sha256 == info["sha256"]

    song = tmp_path / "song.wav"
    sf.write(song, (0.2 * np.random.default_rng(0).standard_normal((22050, 2))).astype(np.float32), 44100)
    out = tmp_path / "out"
    assert main(["separate", str(song), "-o", str(out), "--model", "waveunet", "--weights", str(exported[0]),
                 "--no-progress"]) == 0
    stems = sorted(p.name for p in Path(out).rglob("*.wav"))
    assert stems == ["bass.wav", "drums.wav", "other.wav", "vocals.wav"]
