"""Training loop: a tiny U-Net learns, resumes bit for bit, refuses another run's folder, exports."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from demix.models import ModelLoadError, load_model
from demix.models.weights import sha256_file
from demix.pipeline.data import AugmentConfig
from demix.pipeline.learn.checkpoints import export_checkpoint
from demix.pipeline.learn.train import TrainConfig, read_log, train
from test_datasets import make_musdb

TINY = dict(depth=3, channels=4)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Four 1.5 s toy songs at the U-Net's 44.1 kHz."""
    return make_musdb(tmp_path_factory.mktemp("musdb"), ("a", "b", "c", "d"), seconds=1.5, rate=44100)


def tiny_config(data: Path, **overrides) -> TrainConfig:
    base = dict(
        dataset=str(data), model="unet", model_options=TINY, steps=30, batch_size=2, excerpt_seconds=0.5,
        lr=3e-3, valid_share=0.25, valid_every=15, checkpoint_every=10, log_every=1, seed=0, num_threads=1,
        device="cpu",
    )
    return TrainConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    records: list[dict] = []
    best = train(tiny_config(data), out, log=records.append)
    return out, best, records


def test_short_run_lowers_training_loss(trained):
    out, best, records = trained
    losses = [r["train_loss"] for r in records]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5
    assert records == list(read_log(out))
    validated = [r for r in records if "valid_sdr" in r]
    assert [r["step"] for r in validated] == [15, 30]
    assert set(validated[-1]["valid_sdr"]) == {"vocals", "drums", "bass", "other"}
    assert validated[0]["best"] is True


def test_best_checkpoint_and_metadata(trained):
    out, best, records = trained
    assert best == out / "best.safetensors"
    meta = json.loads((out / "best.json").read_text())
    assert meta["model"] == "unet" and meta["options"] == TINY and meta["sample_rate"] == 44100
    assert meta["sources"] == ["vocals", "drums", "bass", "other"]
    assert meta["sha256"] == sha256_file(best)
    means = {r["step"]: r["valid_sdr_mean"] for r in records if "valid_sdr" in r}
    assert meta["valid_sdr_mean"] == max(means.values()) and meta["step"] == max(means, key=means.get)
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["step"] == 30
    assert json.loads((out / "config.json").read_text())["steps"] == 30


def test_resume_matches_an_uninterrupted_run(data, tmp_path):
    class Killed(Exception):
        pass

    def kill_at(step):
        def log(record):
            if record["step"] == step:
                raise Killed

        return log

    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    train(tiny_config(data, steps=6, checkpoint_every=3, valid_every=6), resumed)
    assert torch.load(resumed / "state.pt", weights_only=True)["step"] == 6
    with pytest.raises(Killed):  # interrupted after step 10: the last checkpoint is step 9
        train(tiny_config(data, steps=12, checkpoint_every=3, valid_every=6), resumed, log=kill_at(10))
    assert torch.load(resumed / "state.pt", weights_only=True)["step"] == 9
    records: list[dict] = []
    train(tiny_config(data, steps=12, checkpoint_every=3, valid_every=6), resumed, log=records.append)
    assert [r["step"] for r in records] == [10, 11, 12]
    assert [r["step"] for r in read_log(resumed)] == list(range(1, 13))  # records past step 9 were dropped

    train(tiny_config(data, steps=12, checkpoint_every=3, valid_every=6), straight)
    a = torch.load(resumed / "state.pt", weights_only=True)
    b = torch.load(straight / "state.pt", weights_only=True)
    assert a["step"] == b["step"] == 12
    for key, value in b["model"].items():
        assert torch.equal(a["model"][key], value), key
    losses = {r["step"]: r["train_loss"] for r in read_log(straight)}
    assert all(losses[r["step"]] == r["train_loss"] for r in records)


def test_another_configuration_is_refused(trained, data):
    out, _, _ = trained
    with pytest.raises(ValueError, match=r"another configuration[\s\S]*lr: 0.003 .* 0.001 now"):
        train(tiny_config(data, lr=1e-3), out)
    with pytest.raises(ValueError, match="model_options"):
        train(tiny_config(data, model_options=dict(depth=3, channels=8)), out)
    with pytest.raises(ValueError, match="already trained to step 30"):
        train(tiny_config(data, steps=20), out)
    # a finished run called again with the same settings returns at once
    assert train(tiny_config(data), out) == out / "best.safetensors"


def test_export_loads_through_the_registry(trained, tmp_path):
    out, best, _ = trained
    path, digest = export_checkpoint(out, tmp_path / "export")
    assert path.name == f"unet-{digest[:8]}.safetensors" and digest == sha256_file(path)
    info = json.loads(path.with_suffix(".json").read_text())
    assert info["sha256"] == digest and info["dtype"] == "float32" and info["options"] == TINY
    model = load_model("unet", weights=str(path), **TINY)
    assert model.weights_sha256 == digest
    trained_state = load_file(str(best))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in trained_state.items())

    half, half_digest = export_checkpoint(out, tmp_path / "export", half=True)
    assert half != path and half.stat().st_size < 0.7 * path.stat().st_size
    model16 = load_model("unet", weights=str(half), **TINY)
    w = "encoder.0.0.weight"
    torch.testing.assert_close(model16.state_dict()[w], trained_state[w], rtol=1e-3, atol=1e-4)

    broken = tmp_path / "export" / f"unet-{'0' * 8}.safetensors"
    broken.write_bytes(path.read_bytes())
    with pytest.raises(ModelLoadError, match="sha256 mismatch"):
        load_model("unet", weights=str(broken), **TINY)
    with pytest.raises(ValueError, match="train first"):
        export_checkpoint(tmp_path, tmp_path / "x")


def test_config_checks_and_round_trip(data):
    config = tiny_config(data, augment=AugmentConfig(gain_db=(-3.0, 0.0)))
    assert config.augment.excerpt_seconds == 0.5  # TrainConfig.excerpt_seconds rules
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="loss"):
        replace(config, loss="l3")
    with pytest.raises(ValueError, match="set the example length"):
        tiny_config(data, augment=AugmentConfig(excerpt_seconds=2.0))
    with pytest.raises(ValueError, match="unknown TrainConfig fields: colour"):
        TrainConfig.from_dict({**config.to_dict(), "colour": "red"})
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            train(tiny_config(data, device="cuda"), data.parent / "never")
