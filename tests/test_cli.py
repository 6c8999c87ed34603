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


def test_models_lists_irm_as_an_evaluation_oracle_and_evaluate_help_has_no_encoding_flags():
    """Issue 15, item 9: the README's `--model irm` is listed by `demix models` (as an evaluation
    oracle), and `demix evaluate --help` offers only options evaluation uses."""
    exe = Path(sys.executable).with_name("demix")
    models = subprocess.run([str(exe), "models"], capture_output=True, text=True, check=True).stdout
    irm = [line for line in models.splitlines() if line.startswith("irm")]
    assert irm and "evaluation oracle" in irm[0] and "demix evaluate" in irm[0]
    out = subprocess.run([str(exe), "evaluate", "--help"], capture_output=True, text=True, check=True).stdout
    for flag in ("--format", "--bit-depth", "--clip-mode", "--two-stems", "--stems "):
        assert flag not in out, flag
    for flag in ("--model", "--weights", "--segment", "--overlap", "--device", "--no-progress"):
        assert flag in out, flag


def test_bad_output_root_and_device_fail_at_once_in_one_line(inputs, tmp_path, capsys):
    """Issue 15, item 5: `-o` naming an existing file (or under one) and an unknown `--device` are
    refused before any model loads or audio is read: one line, exit 2."""
    src = str(inputs / "mono 22k.flac")
    taken = tmp_path / "taken.txt"
    taken.write_text("not a folder")
    for out in (taken, taken / "sub"):
        assert main(["separate", src, "-o", str(out), *FAST]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "not a folder" in err[0] and str(taken) in err[0], err
    assert taken.read_text() == "not a folder"
    for argv in (["separate", src, "-o", str(tmp_path / "o")], ["evaluate", str(tmp_path), "-o", str(tmp_path / "r")]):
        for bad in ("tpu", "cuda:x", "cpu0"):
            assert main([*argv, *FAST, "--device", bad]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and "--device" in err[0] and bad in err[0], err
    assert not (tmp_path / "o").exists()


def test_filename_template_and_refused_templates(inputs, tmp_path, capsys):
    """`--filename` (demucs' option): fields {track}, {stem}, {ext}; a template that leaves OUT or puts
    two stems or tracks on one path is refused before any work, in one line."""
    srcs = [str(inputs / "mono 22k.flac"), str(inputs / "sub dir" / "track.ogg")]
    out = tmp_path / "o"
    assert main(["separate", *srcs, "-o", str(out), *FAST, "--two-stems", "vocals", "--filename", "flat/{track}-{stem}.{ext}"]) == 0
    assert sorted(p.name for p in (out / "flat").iterdir()) == [
        "mono 22k-no_vocals.wav", "mono 22k-vocals.wav", "track-no_vocals.wav", "track-vocals.wav",
    ]
    capsys.readouterr()
    bad = {
        "../{track}/{stem}.{ext}": "not a path inside OUT",
        "/tmp/{track}/{stem}.{ext}": "not a path inside OUT",
        "{track}//{stem}.{ext}": "not a path inside OUT",
        "{track}/{stem}.{ext}/{model}": "unknown field",
        "{track}.{ext}": "to one path",  # the stems of a track collide
        "{stem}.{ext}": "to one path",  # two tracks collide
    }
    for template, why in bad.items():
        refused = tmp_path / "refused"
        assert main(["separate", *srcs, "-o", str(refused), *FAST, "--filename", template]) == 2, template
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and why in err[0], (template, err)
        assert not refused.exists(), template


def test_jobs_gives_the_same_files_as_one_job(inputs, tmp_path, capsys):
    """`--jobs 3` separates the inputs in threads sharing one model: byte-identical output to `--jobs 1`."""
    one, three = tmp_path / "one", tmp_path / "three"
    assert main(["separate", str(inputs), "-o", str(one), *FAST, "--jobs", "1"]) == 1  # broken.wav fails in both
    assert main(["separate", str(inputs), "-o", str(three), *FAST, "--jobs", "3"]) == 1
    printed = capsys.readouterr()
    assert printed.out.count("3 of 4 tracks separated") == 2
    assert sum(line.startswith("demix: failed:") for line in printed.err.splitlines()) == 2
    files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file())
    assert len(files) == 12 and files == sorted(p.relative_to(three) for p in three.rglob("*") if p.is_file())
    for rel in files:
        assert (one / rel).read_bytes() == (three / rel).read_bytes(), rel
    assert main(["separate", str(inputs), "-o", str(tmp_path / "x"), *FAST, "--jobs", "0"]) == 2


SLOW_SEPARATE = """
import sys
sys.path.insert(0, sys.argv[1])
from demix_test_models import SOURCES, GainModel
from demix.models.registry import ModelEntry, register
register(ModelEntry(name="test-slow-separate", factory=lambda: GainModel(delay_s=0.1), sample_rate=8000, sources=SOURCES, description="test only"))
from demix.pipeline.cli import main
from demix.pipeline.cli._process import exit_process
exit_process(main(sys.argv[2:]))  # as the console script ends (`entry`)
"""


@pytest.mark.parametrize("jobs", [1, 2])
def test_ctrl_c_abandons_the_track_being_written_and_exits_130(tmp_path, jobs):
    """Issue 15, item 1 (separate): SIGINT to the process group while a long track is being
    separated: exit 130 without a traceback, the finished track intact, nothing of the long one
    (no staged files, no stems, no folder), and a line saying how many tracks were finished."""
    import signal
    import time

    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    sf.write(src / "a short.wav", 0.1 * rng.standard_normal((8000, 2)), 8000, subtype="PCM_16")
    sf.write(src / "b long.wav", 0.1 * rng.standard_normal((8000 * 120, 2)), 8000, subtype="PCM_16")
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_SEPARATE, str(Path(__file__).parent), "separate", str(src), "-o", str(out),
         "--model", "test-slow-separate", "--device", "cpu", "--no-progress", "--jobs", str(jobs)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            # the final stem names (pathlib's "*" also matches the hidden staged ".demix-*.part.wav" files)
            short_done = all((out / "a short" / f"{stem}.wav").is_file() for stem in ("vocals", "drums", "bass", "other"))
            long_staged = bool(list((out / "b long").glob(".demix-*"))) if (out / "b long").is_dir() else False
            if short_done and long_staged:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        assert short_done and long_staged, "the long track never started"
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert "1 of 2 tracks finished" in stderr, stderr
    assert not (out / "b long").exists(), list((out / "b long").rglob("*"))
    assert not list(out.rglob(".demix-*")) and not list(out.rglob("*.part*"))
    for stem in ("vocals", "drums", "bass", "other"):
        data, rate = sf.read(out / "a short" / f"{stem}.wav")
        assert rate == 8000 and data.shape == (8000, 2)
