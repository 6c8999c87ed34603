"""Synthetic multitrack songs: layout, truth, exact sums, determinism, supersets, re-runs.

The rendering tests need the ``fluidsynth`` command and a General MIDI soundfont (Debian: fluidsynth,
fluid-soundfont-gm) and are skipped without them; the planning tests run anywhere.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from demix.pipeline.data import synth
from demix.pipeline.data.synth import SynthConfig, SynthError, compose, midi, plan_song, render_song, synth_dataset, toy_song
from demix.pipeline.data.synth import config as synth_config
from demix.pipeline.stems import STEMS
from demix.pipeline.io import write_float_wav

FILES = ("mixture", *STEMS)


def _have_renderer() -> bool:
    try:
        synth.find_soundfont()
    except SynthError:
        return False
    return shutil.which("fluidsynth") is not None


needs_fluidsynth = pytest.mark.skipif(not _have_renderer(), reason="needs fluidsynth and a GM soundfont")
CONFIG = SynthConfig(tracks=3, seconds=4.0, seed=11, absent_share=0.5)


def _read(path: Path) -> np.ndarray:
    data, _ = sf.read(path, dtype="float32", always_2d=True)
    return data.T


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "a"
    ticks: list[int] = []
    truth = synth_dataset(out, CONFIG, progress=ticks.append)
    assert ticks == [1, 1, 1]
    return out, truth


# --- planning (no audio) ------------------------------------------------------------------------------------------


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="seconds"):
        SynthConfig(seconds=0.5)
    with pytest.raises(ValueError, match="absent_share"):
        SynthConfig(absent_share=1.5)
    with pytest.raises(ValueError, match="vocals"):
        SynthConfig(vocals="opera")


def test_presence_share_and_never_all_absent():
    config = SynthConfig(seed=3)
    plans = [plan_song(i, config) for i in range(400)]
    absent = Counter(s for p in plans for s in STEMS if not p.presence[s])
    with_absent = sum(not all(p.presence.values()) for p in plans)
    assert abs(with_absent / len(plans) - config.absent_share) < 0.02  # evenly spread, not just on average
    assert all(any(p.presence.values()) for p in plans)
    assert absent["vocals"] == max(absent.values())  # instrumentals are the most common gap
    assert not any(not all(plan_song(i, SynthConfig(seed=3, absent_share=0.0)).presence.values()) for i in range(50))


def test_plan_depends_only_on_seed_and_index():
    a, b = SynthConfig(tracks=2, seed=4), SynthConfig(tracks=50, seed=4)
    assert plan_song(1, a) == plan_song(1, b)
    assert plan_song(1, a) != plan_song(1, SynthConfig(seed=5))
    plan = plan_song(1, a)
    assert 80 <= plan.bpm <= 150 and len(plan.chords) == sum(s.bars for s in plan.sections)


@pytest.mark.parametrize("seconds", [2.0, 4.0, 30.0])
def test_every_present_stem_has_notes_in_the_clip(seconds):
    config = SynthConfig(seconds=seconds, seed=9)
    for index in range(60):
        plan = plan_song(index, config)
        parts, lead, _ = compose.compose_song(plan, config, "espeak")
        for stem in STEMS:
            notes = [n for part in parts[stem] for n in part.notes]
            if stem == "vocals":
                notes += lead
            assert bool(notes) == plan.presence[stem], (index, stem)
            assert all(0 <= n.start < seconds for n in notes)


def test_midi_file_header_and_tempo():
    part = midi.Part(0, 33, 64, 20, 0, [synth.Note(0.0, 0.5, 40, 100), synth.Note(0.25, 0.5, 40, 90)])
    data = midi.midi_file([[part]], slot_s=3)
    assert data[:4] == b"MThd" and data[14:18] == b"MTrk"
    assert b"\xff\x51\x03\x0f\x42\x40" in data  # 1 000 000 us per quarter: one tick per millisecond
    assert data.endswith(b"\xff\x2f\x00")


def test_wav_writer_is_byte_stable_and_readable(tmp_path):
    audio = np.random.default_rng(0).uniform(-1, 1, (2, 1000)).astype(np.float32)
    write_float_wav(tmp_path / "a.wav", audio, 22050)
    write_float_wav(tmp_path / "b.wav", audio, 22050)
    assert (tmp_path / "a.wav").read_bytes() == (tmp_path / "b.wav").read_bytes()
    info = sf.info(str(tmp_path / "a.wav"))
    assert (info.samplerate, info.channels, info.frames, info.subtype) == (22050, 2, 1000, "FLOAT")
    np.testing.assert_array_equal(_read(tmp_path / "a.wav"), audio)


def test_missing_soundfont_names_the_package(tmp_path, monkeypatch):
    with pytest.raises(SynthError, match="is not a file"):
        synth.find_soundfont(tmp_path / "nope.sf2")
    monkeypatch.delenv(synth.SOUNDFONT_ENV, raising=False)
    monkeypatch.setattr(synth_config, "SOUNDFONT_PATHS", (str(tmp_path / "missing.sf2"),))
    with pytest.raises(SynthError, match="fluid-soundfont-gm"):
        synth.find_soundfont()


def test_vocal_engine_falls_back_to_general_midi_without_espeak(monkeypatch):
    real_which = shutil.which
    monkeypatch.setattr(synth_config.shutil, "which", lambda name: None if name == "espeak-ng" else real_which(name))
    assert synth.vocal_engine(SynthConfig()) == "gm"
    with pytest.raises(SynthError, match="apt-get install espeak-ng"):
        synth.vocal_engine(SynthConfig(vocals="espeak"))


def test_toy_song_still_sums():
    song = toy_song(1.0, 8000, seed=2)
    np.testing.assert_array_equal(song["mixture"], sum(song[s] for s in STEMS))


# --- rendering ----------------------------------------------------------------------------------------------------


@needs_fluidsynth
def test_layout_and_truth_file(dataset):
    out, truth = dataset
    names = [f"synth-{i:04d}" for i in range(CONFIG.tracks)]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == names
    assert json.loads((out / "truth.json").read_text()) == truth
    assert sorted(truth) == names and all(sorted(t) == sorted(STEMS) for t in truth.values())
    assert any(not all(t.values()) for t in truth.values())  # absent_share=0.5 leaves something out
    for name in names:
        for f in FILES:
            info = sf.info(str(out / name / f"{f}.wav"))
            assert (info.samplerate, info.channels, info.frames, info.subtype) == (44100, 2, 4 * 44100, "FLOAT")


@needs_fluidsynth
def test_mixture_is_exact_sum_never_clips_and_truth_matches_silence(dataset):
    out, truth = dataset
    for name, presence in truth.items():
        stems = {s: _read(out / name / f"{s}.wav") for s in FILES}
        assert all(a.dtype == np.float32 for a in stems.values())
        total = stems["vocals"] + stems["drums"]
        total += stems["bass"]
        total += stems["other"]
        np.testing.assert_array_equal(stems["mixture"], total)
        assert np.abs(stems["mixture"]).max() <= 0.9 + 1e-6
        assert max(np.abs(stems[s]).max() for s in STEMS) <= 1.0
        for stem in STEMS:
            rms = float(np.sqrt(np.mean(stems[stem].astype(np.float64) ** 2)))
            if presence[stem]:
                assert rms > 1e-3, (name, stem, rms)
            else:
                assert not stems[stem].any(), (name, stem)


@needs_fluidsynth
def test_superset_and_determinism(dataset, tmp_path):
    out, _ = dataset
    smaller = SynthConfig(tracks=2, seconds=CONFIG.seconds, seed=CONFIG.seed, absent_share=CONFIG.absent_share)
    truth = synth_dataset(tmp_path / "b", smaller)
    assert truth == {k: v for k, v in json.loads((out / "truth.json").read_text()).items() if k in truth}
    for name in truth:
        for f in FILES:
            assert (tmp_path / "b" / name / f"{f}.wav").read_bytes() == (out / name / f"{f}.wav").read_bytes(), (name, f)
    other_seed = render_song(0, SynthConfig(tracks=1, seconds=CONFIG.seconds, seed=CONFIG.seed + 1))
    assert not np.array_equal(other_seed["mixture"], _read(out / "synth-0000" / "mixture.wav"))


@needs_fluidsynth
def test_rerun_skips_complete_tracks_and_refuses_other_settings(dataset):
    out, truth = dataset
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.wav")}
    assert synth_dataset(out, CONFIG) == truth
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.wav")} == stamps
    with pytest.raises(SynthError, match="other settings"):
        synth_dataset(out, SynthConfig(tracks=1, seconds=5.0, seed=CONFIG.seed, absent_share=CONFIG.absent_share))


@needs_fluidsynth
def test_general_midi_voices_when_espeak_is_not_used():
    config = SynthConfig(tracks=1, seconds=3.0, seed=2, vocals="gm", sample_rate=22050)
    index = next(i for i in range(20) if plan_song(i, config).presence["vocals"])
    song = render_song(index, config)
    assert song["vocals"].shape == (2, 3 * 22050)
    assert np.sqrt(np.mean(song["vocals"] ** 2)) > 1e-3
