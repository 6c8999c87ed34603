"""Registry and weights: hash checks, strict loading, the pretrained loader offline."""

from __future__ import annotations

import hashlib
import http.server
import threading

import pytest
import torch

from demix.models import ModelLoadError, get_entry, list_models, load_model
from demix.models.registry import DEFAULT_MODEL, ModelEntry, register
from demix.models import weights as W


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def hdemucs_checkpoint(tmp_path_factory):
    """A checkpoint with exactly the structure of HDEMUCS_HIGH_MUSDB_PLUS (random values)."""
    from torchaudio.models import hdemucs_high

    torch.manual_seed(1)
    net = hdemucs_high(sources=["drums", "bass", "other", "vocals"])
    path = tmp_path_factory.mktemp("ckpt") / "hdemucs_high_trained.pt"
    torch.save(net.state_dict(), path)
    return path, net.state_dict()


def test_entries_are_frozen_data():
    entry = get_entry("hdemucs-musdb")
    assert entry.sample_rate == 44100 and entry.sources == ("drums", "bass", "other", "vocals")
    assert entry.weights_uri.endswith("hdemucs_high_trained.pt") and len(entry.sha256) == 64
    with pytest.raises(Exception):
        entry.name = "other"  # frozen
    assert DEFAULT_MODEL in {e.name for e in list_models()}
    with pytest.raises(ValueError, match="already registered"):
        register(entry)
    with pytest.raises(ModelLoadError, match="unknown model"):
        get_entry("no-such-model")


def test_pretrained_loader_round_trip_offline(hdemucs_checkpoint):
    path, state = hdemucs_checkpoint
    model = load_model("hdemucs-musdb", weights=str(path), sha256=_sha(path))
    assert model.weights_sha256 == _sha(path)
    assert not model.training
    loaded = model.weights_module().state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    x = torch.randn(1, 2, 44100)
    with torch.inference_mode():
        y = model(x)
    assert y.shape == (1, 4, 2, 44100)


def test_registry_uri_is_fetched_into_cache_and_verified(hdemucs_checkpoint, tmp_path, monkeypatch):
    """The registry path (URI + sha256) end to end, served from a local fsspec URI."""
    path, _ = hdemucs_checkpoint
    monkeypatch.setenv("DEMIX_CACHE", str(tmp_path / "cache"))
    entry = ModelEntry(
        name="hdemucs-test-local", factory=get_entry("hdemucs-musdb").factory, sample_rate=44100,
        sources=("drums", "bass", "other", "vocals"), weights_uri=f"file://{path}", sha256=_sha(path),
    )
    register(entry)
    model = load_model("hdemucs-test-local")
    assert model.weights_sha256 == entry.sha256


def test_http_download_goes_to_cache_and_is_checked(hdemucs_checkpoint, tmp_path, monkeypatch):
    path, _ = hdemucs_checkpoint
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(path.parent), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/{path.name}"
        cache = tmp_path / "cache"
        got = W.fetch(url, sha256=_sha(path), cache=cache)
        assert got.parent.parent == cache / "weights" and got.name == path.name and _sha(got) == _sha(path)
        with pytest.raises(ModelLoadError, match="sha256 mismatch"):
            W.fetch(url, sha256="0" * 64, cache=tmp_path / "cache2")
    finally:
        server.shutdown()


def test_hash_mismatch_is_refused(hdemucs_checkpoint):
    path, _ = hdemucs_checkpoint
    with pytest.raises(ModelLoadError, match="sha256 mismatch"):
        load_model("hdemucs-musdb", weights=str(path), sha256="f" * 64)


def test_sha8_in_file_name_is_checked(hdemucs_checkpoint, tmp_path):
    path, _ = hdemucs_checkpoint
    good = tmp_path / f"hdemucs-{_sha(path)[:8]}.th"
    good.write_bytes(path.read_bytes())
    load_model("hdemucs-musdb", weights=str(good))
    bad = tmp_path / "hdemucs-deadbeef.th"
    bad.write_bytes(path.read_bytes())
    with pytest.raises(ModelLoadError, match="promises deadbeef"):
        load_model("hdemucs-musdb", weights=str(bad))


def test_offline_download_fails_fast_with_advice(tmp_path, monkeypatch):
    monkeypatch.setenv("DEMIX_CACHE", str(tmp_path))
    # port 9 on loopback: connection refused at once, like an air-gapped cluster
    with pytest.raises(ModelLoadError, match="--weights"):
        W.fetch("http://127.0.0.1:9/hdemucs_high_trained.pt", sha256="0" * 64)
    assert not list((tmp_path / "weights").glob("*")), "a partial download was left in the cache"


def test_strict_key_match(tmp_path, hdemucs_checkpoint):
    _, state = hdemucs_checkpoint
    partial = dict(state)
    partial.pop(next(iter(partial)))
    partial["extra.weight"] = torch.zeros(1)
    p = tmp_path / "partial.pt"
    torch.save(partial, p)
    with pytest.raises(ModelLoadError, match="missing keys .* unexpected keys"):
        load_model("hdemucs-musdb", weights=str(p), trust=True)


class _Evil:
    """Any non-tensor class: weights_only=True must refuse to unpickle it."""


def test_pickled_objects_are_refused(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"obj": _Evil()}, p)
    with pytest.raises(ModelLoadError, match="cannot read weights"):
        load_model("hdemucs-musdb", weights=str(p), trust=True)


def test_safetensors_weights(tmp_path):
    from safetensors.torch import save_file

    ref = load_model("unet", depth=3, channels=4, pretrained=False)
    p = tmp_path / "unet.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(p))
    model = load_model("unet", depth=3, channels=4, weights=str(p), sha256=_sha(p))
    x = torch.randn(1, 2, 4096)
    with torch.inference_mode():
        assert torch.equal(model(x), ref(x))


def test_unknown_option_and_missing_file_refused():
    with pytest.raises(ModelLoadError, match="has no option phase"):
        load_model("hdemucs-musdb", phase="griffinlim")
    with pytest.raises(ModelLoadError, match="not found"):
        load_model("unet", weights="/nonexistent/unet.safetensors")


def test_untrained_default_is_deterministic():
    a, b = load_model(DEFAULT_MODEL, pretrained=False), load_model(DEFAULT_MODEL, pretrained=False)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_cached_weights_are_kept_per_address(tmp_path):
    """Two files with one name at two addresses (a v1 and a v2 of model.pt) are two cache entries: the
    second fetch must not hand back the first one's bytes (with --trust-weights nothing else would
    notice)."""
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/demix-test/v1/model.pt", b"first version")
    fs.pipe("/demix-test/v2/model.pt", b"second version")
    cache = tmp_path / "cache"
    one = W.fetch("memory://demix-test/v1/model.pt", cache=cache)
    two = W.fetch("memory://demix-test/v2/model.pt", cache=cache)
    assert one != two and one.read_bytes() == b"first version" and two.read_bytes() == b"second version"
    assert W.fetch("memory://demix-test/v1/model.pt", cache=cache) == one  # and a second fetch hits the cache
