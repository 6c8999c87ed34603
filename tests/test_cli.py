"""`demix separate` end to end on generated audio, through the real console entry point."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from demix.pipeline.cli import main
from demix.pipeline.data.synth import toy_song

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--model", "unet", "--segment", "2", "--no-progress"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("in")
    song = toy_song(3.0, 44100, seed=1)["mixture"]
    sf.write(folder / "Café (live) 'take 2' \"final\".wav", song.T, 44100, subtype="PCM_16")
    sf.write(folder / "mono 22k.flac", toy_song(3.0, 22050, seed=2)["mixture"].mean(0), 22050, subtype="PCM_24")
    sub = folder / "sub dir"
    sub.mkdir()
    sf.write(sub / "track.ogg", song.T, 44100, format="OGG")
    (folder / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really")
    return folder


def _stems(out: Path) -> dict[str, list[str]]:
    return {d.name: sorted(p.name for p in d.iterdir()) for d in out.iterdir() if d.is_dir()}


def test_separate_folder_with_one_bad_input(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["separate", str(inputs), "-o", str(out), *FAST])
    captured = capsys.readouterr()
    assert code == 1, "a failed input must make the exit status non-zero"
    failures = [line for line in captured.err.splitlines() if line.startswith("demix: failed:")]
    assert len(failures) == 1 and "broken.wav" in failures[0] and "decode" in failures[0]
    assert "3 of 4 tracks separated" in captured.out
    stems = _stems(out)
    assert set(stems) == {"Café (live) 'take 2' \"final\"", "mono 22k", "track"}
    for files in stems.values():
        assert files == ["bass.wav", "drums.wav", "other.wav", "vocals.wav"]
    data, sr = sf.read(out / "mono 22k" / "vocals.wav")
    assert sr == 44100 and data.shape == (3 * 44100, 2), "mono 22.05 kHz input -> stereo 44.1 kHz stems, same duration"
    assert not list(out.rglob("*.part*")), "temporary files left behind"
    assert not (out / "broken").exists(), "a failed track left a folder behind"


def test_two_stems_flac_24_and_subset(inputs, tmp_path):
    src = str(inputs / "mono 22k.flac")
    out = tmp_path / "o"
    assert main(["separate", src, "-o", str(out), *FAST, "--two-stems", "vocals", "--format", "flac", "--bit-depth", "24"]) == 0
    assert _stems(out) == {"mono 22k": ["no_vocals.flac", "vocals.flac"]}
    info = sf.info(out / "mono 22k" / "vocals.flac")
    assert info.subtype == "PCM_24" and info.samplerate == 44100
    out2 = tmp_path / "o2"
    assert main(["separate", src, "-o", str(out2), *FAST, "--stems", "drums,bass", "--format", "mp3"]) == 0
    assert _stems(out2) == {"mono 22k": ["bass.mp3", "drums.mp3"]}


def test_softmax_unet_stems_sum_to_mixture(inputs, tmp_path):
    """With a model whose masks sum to one, the written float stems add back up to the input."""
    src = inputs / "Café (live) 'take 2' \"final\".wav"
    out = tmp_path / "o"
    from demix.models.registry import load_model
    from demix.pipeline.io import Encoding
    from demix.pipeline.engine import SeparationSettings, plan_stems, separate_track

    model = load_model("unet", mask="softmax")
    plan = plan_stems(model.sources)
    outputs = {s: str(out / f"{s}.wav") for s in plan.names}
    result = separate_track(
        model, str(src), outputs, plan=plan, encoding=Encoding("wav", "32f", "none"),
        settings=SeparationSettings(segment=1.0, overlap=0.5),
    )
    total = sum(sf.read(outputs[s], dtype="float32")[0] for s in plan.names)
    mix = sf.read(src, dtype="float32")[0]
    assert result.duration_s == pytest.approx(3.0)
    assert np.abs(total - mix).max() < 1e-3


def test_bad_arguments_exit_2(inputs, tmp_path, capsys):
    src = str(inputs / "mono 22k.flac")
    assert main(["separate", src, "-o", str(tmp_path), "--model", "nope"]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert main(["separate", str(tmp_path / "missing.wav"), "-o", str(tmp_path)]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["separate", src, "-o", str(tmp_path), "--format", "flac", "--bit-depth", "32f"]) == 2
    assert main(["separate", src, "-o", str(tmp_path), *FAST, "--two-stems", "piano"]) == 2
    assert "piano" in capsys.readouterr().err


def test_console_script_help_and_models():
    exe = Path(sys.executable).with_name("demix")
    assert exe.exists(), "the demix console script is not installed"
    out = subprocess.run([str(exe), "separate", "--help"], capture_output=True, text=True, check=True).stdout
    for flag in ("--model", "--weights", "--two-stems", "--stems", "--format", "--bit-depth", "--segment", "--overlap", "--shifts", "--device", "--clip-mode"):
        assert flag in out
    models = subprocess.run([str(exe), "models"], capture_output=True, text=True, check=True).stdout
    assert "hdemucs-musdb" in models and "unet" in models


def test_module_entry_runs_in_subprocess(inputs, tmp_path):
    """python -m demix.pipeline.cli works with a non-ASCII file name and reports success."""
    src = str(inputs / "Café (live) 'take 2' \"final\".wav")
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "demix.pipeline.cli", "separate", src, "-o", str(tmp_path), *FAST],
        capture_output=True, text=True, cwd=ROOT, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "Café (live) 'take 2' \"final\"" / "vocals.wav").is_file()


def test_new_commands_have_help_with_their_options():
    exe = Path(sys.executable).with_name("demix")
    for command, flags in {
        "remix": ("--examples", "--seed", "--seconds", "--gain-db", "--workers", "--ray-address", "remixes.parquet"),
        "export": ("--task", "lyrics", "transcription", "lyrics.parquet"),
        "evaluate": ("--presence", "--presence-weights"),
        "run": ("--presence", "combined"),
        "train": ("--init-weights",),
    }.items():
        out = subprocess.run([str(exe), command, "--help"], capture_output=True, text=True, check=True).stdout
        for flag in flags:
            assert flag in out, (command, flag)


@pytest.mark.timeout(300)
def test_evaluate_presence_on_a_small_synthetic_set(tmp_path, capsys):
    """`demix evaluate --presence` separates each song once and scores three detectors against truth.json."""
    import pyarrow.parquet as pq

    from demix.pipeline.data.synth import SynthConfig, synth_dataset

    data = tmp_path / "data"
    truth = synth_dataset(data, SynthConfig(tracks=3, seconds=8.0, seed=21, absent_share=1.0))
    assert any(not all(t.values()) for t in truth.values())
    out = tmp_path / "report"
    assert main(["evaluate", "--presence", str(data), "-o", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "combined" in printed and "absF1" in printed
    scores = pq.read_table(out / "presence_scores.parquet").to_pylist()
    assert {(r["detector"], r["stem"]) for r in scores} == {(d, s) for d in ("energy", "classifier", "combined") for s in ("vocals", "drums", "bass", "other")}
    for r in scores:
        assert r["tracks"] == 3 and r["present"] + r["absent"] == 3
        assert r["present"] == sum(truth[t][r["stem"]] for t in truth)
        assert 0.0 <= r["f1"] <= 1.0
    preds = pq.read_table(out / "presence_predictions.parquet").to_pylist()
    assert len(preds) == 3 * 3 * 4 and all((p["presence_score"] >= 0.5) == p["present"] for p in preds)
    assert (out / "presence.md").read_text().count("| combined |") == 4
