"""Output files honour the umask (``0o666 & ~umask``) like any file a program writes, although demix
stages every output in a temp file (``mkstemp`` makes those 0600) and renames or links it into place."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from demix.models.registry import load_model
from demix.models.weights import save
from demix.pipeline.batch import manifest
from demix.pipeline.batch.manifest import ShardResult
from demix.pipeline.engine import SeparationSettings, plan_stems, separate_track
from demix.pipeline.io import AtomicOutput, Encoding, atomic_write, create_once, put_file, staged_path


@pytest.fixture(params=[0o022, 0o027], ids=["umask022", "umask027"])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _song(tmp_path: Path) -> Path:
    t = np.arange(44100, dtype=np.float32) / 44100
    wav = 0.3 * np.stack([np.sin(2 * np.pi * 220 * t), np.sin(2 * np.pi * 330 * t)], axis=1)
    path = tmp_path / "song.wav"
    sf.write(path, wav, 44100)
    return path


def test_separated_stems_follow_the_umask(tmp_path, umask):
    model = load_model("mixture")
    plan = plan_stems(model.sources)
    outputs = {s: str(tmp_path / "out" / f"{s}.flac") for s in plan.names}
    separate_track(model, str(_song(tmp_path)), outputs, plan=plan, encoding=Encoding("flac"), settings=SeparationSettings())
    assert {s: _mode(p) for s, p in outputs.items()} == {s: 0o666 & ~umask for s in outputs}


def test_manifest_parts_and_commit_records_follow_the_umask(tmp_path, umask):
    out = str(tmp_path / "run")
    commit = manifest.commit_shard(out, ShardResult("s1"))
    root = Path(out) / "manifests"
    files = [root / key for key in commit.parts.values()] + [root / "_commits" / "s1.json"]
    assert len(files) == 4 and all(f.is_file() for f in files)
    assert {str(f): _mode(f) for f in files} == {str(f): 0o666 & ~umask for f in files}


def test_atomic_write_create_once_put_file_and_staged_outputs_follow_the_umask(tmp_path, umask):
    want = 0o666 & ~umask
    atomic_write(str(tmp_path / "a" / "truth.json"), b"{}")
    assert create_once(str(tmp_path / "c" / "record.json"), b"{}")
    with staged_path(tmp_path / "s" / "x.bin") as tmp:
        Path(tmp).write_bytes(b"x")
        put_file(tmp, str(tmp_path / "s" / "x.bin"))
    with AtomicOutput() as staged:
        Path(staged.path_for(str(tmp_path / "o" / "clip.flac"))).write_bytes(b"y")
        staged.commit()
    for name in ("a/truth.json", "c/record.json", "s/x.bin", "o/clip.flac"):
        assert _mode(tmp_path / name) == want, name


def test_exported_weights_follow_the_umask(tmp_path, umask):
    path, _ = save({"w": torch.ones(3)}, tmp_path / "weights", "tiny")
    assert _mode(path) == 0o666 & ~umask


def test_cli_separate_writes_world_readable_stems_under_umask_022(tmp_path):
    exe = Path(sys.executable).with_name("demix")
    out = tmp_path / "out"
    proc = subprocess.run(
        [str(exe), "separate", str(_song(tmp_path)), "-o", str(out), "--model", "mixture", "--no-progress"],
        capture_output=True, text=True, preexec_fn=lambda: os.umask(0o022), timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    stems = sorted((out / "song").iterdir())
    assert len(stems) == 4
    assert {p.name: oct(_mode(p)) for p in stems} == {p.name: oct(0o644) for p in stems}
