"""The wheel installs under one ``demix`` import namespace: beside an unrelated top-level ``models``
package in a fresh virtual environment, ``demix --help`` and a one-track separation still work.

The fresh venv gets the test environment's third-party packages (torch, ...) through a ``.pth`` line
pointing at its site-packages; paths added that way are not scanned for ``.pth`` files, so the
editable install of this checkout stays invisible there and only the wheel provides ``demix``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]


def _site_packages(prefix: Path) -> Path:
    return Path(sysconfig.get_path("purelib", vars={"base": str(prefix), "platbase": str(prefix)}))


@pytest.fixture(scope="module")
def fresh_env(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("pkg")
    wheels = tmp / "wheels"
    src = tmp / "src"  # a clean copy: setuptools' build/ folder in the checkout may hold stale modules
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for folder in ("pipeline", "models", "flows"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(src)],
        check=True, cwd=tmp, timeout=600,
    )
    (wheel,) = wheels.glob("demix_catalog-*.whl")
    env = tmp / "venv"
    venv.EnvBuilder(with_pip=False).create(env)
    site = _site_packages(env)
    # an unrelated project's top-level `models` package
    (site / "models").mkdir()
    (site / "models" / "__init__.py").write_text("UNRELATED = 'not demix'\n")
    # third-party dependencies from the test environment (not its editable demix)
    (site / "deps.pth").write_text(str(_site_packages(Path(sys.prefix))) + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(env / "bin" / "python"), "install", "--no-deps", "-q", str(wheel)],
        check=True, cwd=tmp, timeout=600,
    )
    return env


def _run(env: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(list(args), cwd=cwd, env=clean, capture_output=True, text=True, timeout=600)


def test_wheel_installs_under_one_namespace_beside_an_unrelated_models(fresh_env, tmp_path):
    py = str(fresh_env / "bin" / "python")
    probe = _run(
        fresh_env, py, "-c",
        "import demix.models, demix.pipeline, demix.flows, models; "
        "print(models.UNRELATED); print(demix.models.__file__); print(demix.pipeline.__file__)",
        cwd=tmp_path,
    )
    assert probe.returncode == 0, probe.stderr
    unrelated, models_file, pipeline_file = probe.stdout.split("\n")[:3]
    assert unrelated == "not demix"
    for path in (models_file, pipeline_file):
        assert str(fresh_env) in path and str(ROOT) not in path, path  # the wheel's copy, not this checkout
    names = _run(fresh_env, py, "-c", "import importlib.metadata as m; print(m.version('demix-catalog'))", cwd=tmp_path)
    assert names.returncode == 0 and names.stdout.strip(), names.stderr

    helped = _run(fresh_env, str(fresh_env / "bin" / "demix"), "--help", cwd=tmp_path)
    assert helped.returncode == 0, helped.stderr
    assert "separate" in helped.stdout and "run" in helped.stdout


def test_wheel_separates_a_track_with_its_shipped_weights(fresh_env, tmp_path):
    t = np.arange(44100 * 2) / 44100
    tone = 0.3 * np.stack([np.sin(2 * np.pi * 220 * t), np.sin(2 * np.pi * 330 * t)], axis=1)
    sf.write(tmp_path / "tone.wav", tone.astype(np.float32), 44100, subtype="PCM_16")
    done = _run(
        fresh_env, str(fresh_env / "bin" / "demix"), "separate", "tone.wav", "-o", "out", "--model", "unet",
        "--device", "cpu", "--no-progress", cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    for stem in ("vocals", "drums", "bass", "other"):
        audio, rate = sf.read(tmp_path / "out" / "tone" / f"{stem}.wav")
        assert rate == 44100 and audio.shape == tone.shape
