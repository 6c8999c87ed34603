"""The published models without their files: checkpoints written in exactly the published formats (demucs
``.th`` packages, MSST/UVR RoFormer ``.ckpt`` state dicts) from the published configs with random
weights, loaded through the registry by name with ``--weights``, and run through the engine with each
model's own segment, overlap and normalisation (the bag included).

Full-size networks are built for the parameter counts and the formats; separation through the engine uses
reduced configurations (a full HT Demucs chunk takes ~30 s and a full RoFormer chunk ~4 min on 2 CPU
cores), except one full-size 6-stem ``demix separate`` run.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from demucs.htdemucs import HTDemucs

from demix.models import registry
from demix.models.base import ModelLoadError
from demix.models.published import FT_BAG
from demix.pipeline.cli import main
from demix.pipeline.engine.overlap_add import SeparationSettings, separate

SMALL_HT = dict(channels=8, t_layers=1, bottom_channels=0, segment=1.0)
SMALL_RO = dict(dim=32, depth=1, chunk_size=22050)


def write_demucs_package(member, folder: Path, sig: str) -> Path:
    """``demucs.states.serialize_model`` + ``save_with_checksum``: a pickled dict of the real class, args,
    kwargs, a half-precision state and training args, saved as ``<sig>-<sha8>.th``."""
    package = {"klass": HTDemucs, "args": (), "kwargs": dict(member.expected_kwargs),
               "state": {k: v.half() for k, v in member.weights_module().state_dict().items()},
               "training_args": {"dset": {"segment": 11}, "optim": {"lr": 3e-4}}}
    buf = io.BytesIO()
    torch.save(package, buf)
    path = folder / f"{sig}-{hashlib.sha256(buf.getvalue()).hexdigest()[:8]}.th"
    path.write_bytes(buf.getvalue())
    return path


def write_ckpt(separator, path: Path) -> str:
    torch.save(separator.weights_module().state_dict(), path)  # MSST/UVR: a plain state dict in a .ckpt
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", ["htdemucs", "htdemucs_6s", "bs-roformer-vocals", "mel-roformer-vocals", "hdemucs-musdb"])
def test_full_size_parameter_counts_match_published_figures(name):
    entry = registry.get_entry(name)
    model = registry.load_model(name, pretrained=False)
    assert sum(p.numel() for p in model.parameters()) == entry.published.params
    assert tuple(model.sources) == entry.sources


def test_roformer_key_names_and_shapes_are_the_published_checkpoints():
    """Names and shapes known from the published viperx checkpoints (MSST's code, and independent ports)."""
    bs = registry.load_model("bs-roformer-vocals", pretrained=False).weights_module().state_dict()
    assert tuple(bs["layers.0.0.layers.0.0.to_qkv.weight"].shape) == (1536, 512)
    assert tuple(bs["layers.11.1.layers.0.0.rotary_embed.freqs"].shape) == (32,)
    assert tuple(bs["mask_estimators.0.to_freqs.61.0.2.weight"].shape) == (1032, 2048)
    assert tuple(bs["band_split.to_features.0.0.gamma"].shape) == (8,) and "final_norm.gamma" in bs
    mel = registry.load_model("mel-roformer-vocals", pretrained=False)
    assert mel.weights_module().band_split.dim_inputs == (
        28, 24, 24, 24, 24, 24, 24, 24, 24, 24, 24, 24, 24, 24, 24, 28, 28, 28, 36, 36, 36, 40, 40, 44, 52, 52, 52, 60, 64,
        68, 76, 80, 80, 88, 96, 104, 112, 116, 124, 132, 144, 156, 164, 176, 188, 200, 216, 228, 244, 264, 284, 304, 320,
        344, 372, 396, 420, 452, 488, 520)
    sd = mel.weights_module().state_dict()
    assert tuple(sd["mask_estimators.0.to_freqs.59.0.4.weight"].shape) == (1040, 1536) and "layers.0.0.norm.gamma" in sd


def test_full_size_demucs_package_loads_by_name_with_weights(tmp_path):
    source = registry.load_model("htdemucs", pretrained=False)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in source.parameters():
            p.normal_(0, 0.02)
    path = write_demucs_package(source, tmp_path, "955717e8")
    model = registry.load_model("htdemucs", weights=str(path))
    assert model.weights_verified_by == "sha8 in name"
    key = "crosstransformer.layers.0.linear1.weight"
    assert torch.equal(model.weights_module().state_dict()[key], source.weights_module().state_dict()[key].half().float())


def _mix(seconds: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * 44100)) / 44100
    return 0.3 * torch.stack([torch.sin(2 * np.pi * 220 * t), torch.sin(2 * np.pi * 330 * t)]) + 0.05 * torch.randn(2, t.numel(), generator=g)


def test_bag_loads_from_a_folder_and_combines_members_per_source(tmp_path):
    bag = registry.load_model("htdemucs_ft", pretrained=False, **SMALL_HT)
    with torch.no_grad():
        for i, member in enumerate(bag.members):
            torch.manual_seed(10 + i)
            for p in member.parameters():
                p.normal_(0, 0.05)
    for member, name in zip(bag.members, FT_BAG):
        write_demucs_package(member, tmp_path, name.split("-")[0])
    model = registry.load_model("htdemucs_ft", weights=str(tmp_path), **SMALL_HT)
    assert model.weights_verified_by == "sha8 in name" and len(model.weights_sha256) == 64
    settings = SeparationSettings()  # the model's own overlap (demucs' 0.25)
    assert settings.overlap_for(model) == 0.25
    mix = _mix(1.2)
    out = separate(model, mix, settings)  # segment 1 s, demucs' overlap and track normalisation
    assert out.shape == (4, 2, mix.shape[-1]) and torch.isfinite(out).all()
    for i in (0, 3):  # one-hot weights: source i comes from member i alone
        member = model.members[i]
        alone = separate(member, mix, settings)[i]
        assert torch.allclose(out[i], alone, atol=1e-4), model.sources[i]


def test_bag_refuses_a_member_whose_name_lies(tmp_path):
    bag = registry.load_model("htdemucs_ft", pretrained=False, **SMALL_HT)
    for member, name in zip(bag.members, FT_BAG):
        write_demucs_package(member, tmp_path, name.split("-")[0])
    victim = sorted(tmp_path.glob("92cfc3b6-*.th"))[0]
    victim.rename(tmp_path / "92cfc3b6-00000000.th")
    with pytest.raises(ModelLoadError, match="sha256 mismatch"):
        registry.load_model("htdemucs_ft", weights=str(tmp_path), **SMALL_HT)


@pytest.mark.parametrize("name", ["bs-roformer-vocals", "mel-roformer-vocals"])
def test_roformer_ckpt_loads_by_name_and_separates_through_the_engine(tmp_path, name):
    source = registry.load_model(name, pretrained=False, **SMALL_RO)
    path = tmp_path / "model.ckpt"
    digest = write_ckpt(source, path)
    with pytest.raises(ModelLoadError, match="no checksum"):
        registry.load_model(name, weights=str(path), **SMALL_RO)
    model = registry.load_model(name, weights=str(path), sha256=digest, **SMALL_RO)
    assert model.weights_verified_by == "--weights-sha256" and model.overlap == 0.5 and not model.normalize_input
    mix = _mix(1.1)
    assert SeparationSettings().overlap_for(model) == 0.5, "the publisher's overlap by default"
    assert SeparationSettings(overlap=0.1).overlap_for(model) == 0.1, "an explicit --overlap wins"
    out = separate(model, mix, SeparationSettings())
    assert out.shape == (2, 2, mix.shape[-1]) and out[0].abs().max() > 0
    assert torch.allclose(out.sum(0), mix, atol=1e-4)  # instrumental = mixture - vocals
    other = registry.get_entry("htdemucs").name  # a file of another architecture is refused by the strict load
    with pytest.raises(ModelLoadError, match="not a demucs package"):
        registry.load_model(other, weights=str(path), sha256=digest)


def test_six_stem_model_through_demix_separate_full_size(tmp_path):
    source = registry.load_model("htdemucs_6s", pretrained=False)
    path = write_demucs_package(source, tmp_path, "5c90dfd2")
    track = tmp_path / "song.wav"
    sf.write(track, _mix(1.5).T.numpy(), 44100)
    out = tmp_path / "out"
    assert main(["separate", str(track), "-o", str(out), "--model", "htdemucs_6s", "--weights", str(path)]) == 0
    written = sorted(p.stem for p in out.rglob("*.wav"))
    assert written == sorted(["drums", "bass", "other", "vocals", "guitar", "piano"])


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def served(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _serve_as(monkeypatch, name: str, uri: str) -> None:
    monkeypatch.setitem(registry._REGISTRY, name, replace(registry.get_entry(name), weights_uri=uri))


def test_download_fetches_verifies_and_copies(tmp_path, served, monkeypatch, capsys):
    root, base = served
    monkeypatch.setenv("DEMIX_CACHE", str(tmp_path / "cache"))
    source = registry.load_model("mel-roformer-vocals", pretrained=False, **SMALL_RO)
    digest = write_ckpt(source, root / "vocals.ckpt")
    _serve_as(monkeypatch, "mel-roformer-vocals", f"{base}/vocals.ckpt")
    monkeypatch.setitem(registry._REGISTRY, "mel-roformer-vocals", replace(registry.get_entry("mel-roformer-vocals"), sha256=digest))
    assert main(["models", "--download", "mel-roformer-vocals", "--to", str(tmp_path / "bucket")]) == 0
    assert (tmp_path / "bucket" / "vocals.ckpt").read_bytes() == (root / "vocals.ckpt").read_bytes()
    assert "verified by: registry sha256" in capsys.readouterr().out
    main(["models"])
    assert "mel-roformer-vocals" in (listing := capsys.readouterr().out) and "cached locally: yes" in listing


def test_download_refuses_a_checksum_mismatch(tmp_path, served, monkeypatch, capsys):
    root, base = served
    monkeypatch.setenv("DEMIX_CACHE", str(tmp_path / "cache"))
    (root / "955717e8-8726e21a.th").write_bytes(b"not the published file")
    _serve_as(monkeypatch, "htdemucs", f"{base}/955717e8-8726e21a.th")
    assert main(["models", "--download", "htdemucs"]) == 2
    assert "sha256 mismatch" in capsys.readouterr().err


def test_bag_by_name_over_http_as_a_run_with_network_loads_it(tmp_path, served, monkeypatch):
    """`demix run ... --model htdemucs_ft` with network and no --weights: the registry fetches the four
    members from the entry's URL prefix into the cache, checks each against the sha8 in its published
    name, and the bag separates (the entry points at a local server holding such files)."""
    root, base = served
    monkeypatch.setenv("DEMIX_CACHE", str(tmp_path / "cache"))
    bag = registry.load_model("htdemucs_ft", pretrained=False, **SMALL_HT)
    names = tuple(write_demucs_package(m, root, n.split("-")[0]).name for m, n in zip(bag.members, FT_BAG))
    entry = replace(registry.get_entry("htdemucs_ft"), weights_uri=base, bag=names)
    monkeypatch.setitem(registry._REGISTRY, "htdemucs_ft", entry)
    model = registry.load_model("htdemucs_ft", **SMALL_HT)
    assert len(list((tmp_path / "cache").rglob("*.th"))) == 4, "the members are cached"
    out = separate(model, _mix(1.2), SeparationSettings())
    assert out.shape[:2] == (4, 2) and torch.isfinite(out).all()
    (root / names[2]).write_bytes((root / names[2]).read_bytes()[:-10] + b"0123456789")  # a corrupted copy served
    monkeypatch.setenv("DEMIX_CACHE", str(tmp_path / "cache2"))
    with pytest.raises(ModelLoadError, match="sha256"):
        registry.load_model("htdemucs_ft", **SMALL_HT)
