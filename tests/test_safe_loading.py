"""Checkpoints in the published formats load without running code; a payload is refused before it runs.

The canary files are real ``torch.save`` zip files whose pickle calls ``os.system`` (or ``exec``) on
load; each test checks that demix refuses them and that the command never ran (its marker file is absent).
"""

from __future__ import annotations

import fractions
import os
import pickle
from pathlib import Path

import pytest
import torch

from demix.models import checkpoint_formats as cf
from demix.models.base import ModelLoadError
from demix.models.registry import load_model


class _Payload:
    """Unpickling this runs a shell command (the classic pickle payload)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _ExecPayload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


class HTDemucs:  # stands for the class a demucs package names: pickled by reference only
    pass


HTDemucs.__module__ = "demucs.htdemucs"


def _demucs_package(path: Path, extra=None, protocol: int = 2) -> Path:
    state = {"w": torch.randn(3, 2).half()}
    package = {"klass": HTDemucs, "args": (), "kwargs": {"sources": ["drums"], "segment": fractions.Fraction(39, 5)},
               "state": state, "training_args": {"lr": 3e-4}}
    if extra is not None:
        package["training_args"] = {"hook": extra}
    import sys
    import types

    fake = types.ModuleType("demucs.htdemucs")  # pickling by reference needs the name importable, here only
    fake.HTDemucs = HTDemucs
    sys.modules.setdefault("demucs.htdemucs", fake) if "demucs.htdemucs" not in sys.modules else None
    saved = sys.modules["demucs.htdemucs"]
    sys.modules["demucs.htdemucs"] = fake
    try:
        torch.save(package, path, pickle_protocol=protocol)
    finally:
        sys.modules["demucs.htdemucs"] = saved
    return path


@pytest.mark.parametrize("protocol", [2, 4])
def test_canary_payload_in_a_demucs_package_never_runs(tmp_path, protocol):
    marker = tmp_path / "canary"
    path = _demucs_package(tmp_path / "evil-00000000.th", extra=_Payload(marker), protocol=protocol)
    assert "posix.system" in cf.pickle_globals(cf._pickle_bytes(path)) or "nt.system" in cf.pickle_globals(cf._pickle_bytes(path))
    with pytest.raises(ModelLoadError, match=r"refusing weights .*system.*nothing from it was executed"):
        cf.read_demucs_package(path, klass="demucs.htdemucs.HTDemucs", kwargs={})
    assert not marker.exists()


def test_canary_payload_in_a_roformer_checkpoint_never_runs(tmp_path):
    marker = tmp_path / "canary"
    path = tmp_path / "model.ckpt"
    torch.save({"layer.weight": torch.zeros(2), "x": _ExecPayload(marker)}, path)
    with pytest.raises(ModelLoadError, match=r"(__builtin__|builtins)\.exec"):
        cf.read_checkpoint(path)
    assert not marker.exists()


def test_second_layer_refuses_too_when_the_scan_is_bypassed(tmp_path, monkeypatch):
    """Even without the opcode scan, torch's weights_only reader with demix's allow-list refuses the payload."""
    marker = tmp_path / "canary"
    path = tmp_path / "model.ckpt"
    torch.save({"x": _Payload(marker)}, path)
    monkeypatch.setattr(cf, "check_globals", lambda p: [])
    with pytest.raises(ModelLoadError, match="while reading the pickle"):
        cf.safe_load(path)
    assert not marker.exists()


def test_the_payload_is_real(tmp_path):
    """The canary does run under a plain unpickler (so the tests above prove something)."""
    marker = tmp_path / "canary"
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()


def test_stack_global_with_unresolved_operands_is_refused():
    # protocol-4 STACK_GLOBAL whose operands come from a call, not string constants
    data = b"\x80\x04" + b"cbuiltins\nstr\n" + b"(X\x05\x00\x00\x00posixtR" + b"X\x06\x00\x00\x00system\x93."
    assert "<unresolved>" in cf.pickle_globals(data)


def test_demucs_package_reads_as_float_with_klass_as_a_name(tmp_path):
    path = _demucs_package(tmp_path / "ok-00000000.th")
    state = cf.read_demucs_package(path, klass="demucs.htdemucs.HTDemucs", kwargs={"segment": 7.8, "sources": ["drums"]})
    assert state["w"].dtype == torch.float32 and tuple(state["w"].shape) == (3, 2)
    with pytest.raises(ModelLoadError, match="expects demucs.hdemucs.HDemucs"):
        cf.read_demucs_package(path, klass="demucs.hdemucs.HDemucs", kwargs={})
    with pytest.raises(ModelLoadError, match="another configuration: sources"):
        cf.read_demucs_package(path, klass="demucs.htdemucs.HTDemucs", kwargs={"sources": ["vocals"]})


def test_non_zip_and_garbage_are_refused(tmp_path):
    bad = tmp_path / "x.ckpt"
    bad.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ModelLoadError, match="not a torch.save zip file"):
        cf.read_checkpoint(bad)


def test_registry_load_refuses_a_payload_before_building_anything_from_it(tmp_path):
    marker = tmp_path / "canary"
    path = _demucs_package(tmp_path / "htdemucs-evil.th", extra=_Payload(marker))
    with pytest.raises(ModelLoadError, match="refusing weights .*system"):
        load_model("htdemucs", weights=str(path), trust=True)
    assert not marker.exists()
