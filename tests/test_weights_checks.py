"""``--weights`` needs a checksum (the registry's, ``--weights-sha256`` or a sha8 in the name) or an
explicit ``--trust-weights``; refused pickles get demix's own message, never PyTorch's advice."""

from __future__ import annotations

import hashlib
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file, save_file

from demix.models import ModelLoadError, load_model
from demix.models.registry import WEIGHTS_DIR, ModelEntry, get_entry, list_models, register
from demix.pipeline.cli import main
from demix.pipeline.stems import STEMS

TINY = {"depth": 3, "channels": 4}
UNPUBLISHED = "unet-unpublished-test"
if UNPUBLISHED not in {e.name for e in list_models()}:  # an entry without published weights or sha256
    register(ModelEntry(name=UNPUBLISHED, factory=get_entry("unet").factory, sample_rate=44100, sources=STEMS))


def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def tiny_weights(tmp_path) -> Path:
    """Tiny U-Net weights in a file whose name carries no checksum."""
    state = load_model("unet", pretrained=False, **TINY).state_dict()
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


class _Canary:
    """Unpickling this would create ``target``: proof that no code from a weights file ran."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


def test_refused_pickle_gets_our_message_without_torch_advice(tmp_path, capfd):
    canary = tmp_path / "CANARY"
    evil = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "payload": _Canary(canary)}, evil)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ModelLoadError) as info:
            load_model(UNPUBLISHED, weights=str(evil), trust=True, **TINY)
    message = str(info.value)
    assert not canary.exists(), "code from the weights file ran"
    assert "weights_only" not in message and "arbitrary code" not in message and "add_safe_globals" not in message
    assert "other than tensors" in message and "safetensors" in message and str(evil) in message
    assert info.value.__cause__ is None and info.value.__suppress_context__, "torch's advice would show in a traceback"
    assert not caught, [str(w.message) for w in caught]
    assert capfd.readouterr().err == ""


def test_weights_without_a_checksum_are_refused_unless_trusted(tiny_weights):
    with pytest.raises(ModelLoadError, match=r"no checksum[\s\S]*--weights-sha256[\s\S]*--trust-weights"):
        load_model(UNPUBLISHED, weights=str(tiny_weights), **TINY)
    # refused before any download when nothing could verify it (port 9: nothing listens)
    with pytest.raises(ModelLoadError, match="no checksum"):
        load_model(UNPUBLISHED, weights="http://127.0.0.1:9/tiny.safetensors", **TINY)
    trusted = load_model(UNPUBLISHED, weights=str(tiny_weights), trust=True, **TINY)
    assert trusted.weights_verified_by == "trusted (unverified)" and trusted.weights_sha256 == _sha(tiny_weights)
    given = load_model(UNPUBLISHED, weights=str(tiny_weights), sha256=_sha(tiny_weights), **TINY)
    assert given.weights_verified_by == "--weights-sha256"
    named = tiny_weights.with_name(f"tiny-{_sha(tiny_weights)[:8]}.safetensors")
    shutil.copy(tiny_weights, named)
    assert load_model(UNPUBLISHED, weights=str(named), **TINY).weights_verified_by == "sha8 in name"


def test_registry_sha256_is_checked_for_weights_given_by_the_user(tmp_path):
    wrong = tmp_path / "hdemucs_high_trained.pt"
    torch.save({"a": torch.zeros(1)}, wrong)
    with pytest.raises(ModelLoadError, match=r"registry's sha256 for 'hdemucs-musdb'[\s\S]*--weights-sha256"):
        load_model("hdemucs-musdb", weights=str(wrong))
    # an explicit checksum or --trust-weights gets past the check (and this file then fails the architecture)
    for kw in ({"sha256": _sha(wrong)}, {"trust": True}):
        with pytest.raises(ModelLoadError, match="do not match the architecture"):
            load_model("hdemucs-musdb", weights=str(wrong), **kw)
    copy = tmp_path / "unet.safetensors"
    shutil.copy(Path(get_entry("unet").weights_uri), copy)
    assert load_model("unet", weights=str(copy)).weights_verified_by == "registry sha256"
    assert load_model("unet").weights_verified_by == "registry sha256"


@pytest.fixture
def song(tmp_path) -> str:
    t = np.arange(44100, dtype=np.float32) / 44100
    path = tmp_path / "song.wav"
    sf.write(path, 0.3 * np.stack([np.sin(2 * np.pi * 220 * t)] * 2, axis=1), 44100)
    return str(path)


def test_cli_requires_a_checksum_or_trust_and_says_which_matched(tmp_path, song, capsys):
    retrained = tmp_path / "unet-float32.safetensors"  # another file than the registry's
    save_file({k: v.float() for k, v in load_file(str(Path(get_entry("unet").weights_uri))).items()}, str(retrained))
    base = ["separate", song, "-o", str(tmp_path / "out"), "--no-progress", "--weights", str(retrained)]
    assert main(base) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--trust-weights" in err and "registry" in err
    assert main([*base, "--trust-weights"]) == 0
    assert "verified by: trusted (unverified)" in capsys.readouterr().err
    assert main([*base, "--weights-sha256", _sha(retrained)]) == 0
    assert "verified by: --weights-sha256" in capsys.readouterr().err


def test_run_checks_weights_before_prefect_and_threads_trust(tmp_path, song, capfd):
    retrained = tmp_path / "unet-float32.safetensors"
    save_file({k: v.float() for k, v in load_file(str(Path(get_entry("unet").weights_uri))).items()}, str(retrained))
    base = ["run", str(Path(song).parent), "-o", str(tmp_path / "run"), "--weights", str(retrained), "--dry-run", "--quiet"]
    assert main(base) == 2
    err = capfd.readouterr().err
    assert "--trust-weights" in err and "Traceback" not in err
    assert main([*base, "--trust-weights"]) == 0, "--trust-weights must reach the run's own model load"
    captured = capfd.readouterr()
    assert "verified by: trusted (unverified)" in captured.err and "1 tracks in catalog" in captured.out
