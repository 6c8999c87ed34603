"""The varied synthetic profiles (issue 12): ``train`` varies soundfonts, voice engines, effects, ranges,
arrangements and loudness; ``heldout`` is a judge on a soundfont and a voice engine ``train`` never uses;
``classic`` stays the generator as it was (tests/test_synth.py).

Rendering tests need fluidsynth, the Debian soundfonts and voice engines each profile names (see
``synth.SOUNDFONTS`` and ``synth.config.ENGINE_TOOLS``) and are skipped without them; planning tests run anywhere.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import soundfile as sf

from demix.pipeline.data import synth
from demix.pipeline.data.synth import PROFILES, SynthConfig, SynthError, plan_song, render_song, synth_dataset
from demix.pipeline.data.synth import config as synth_config
from demix.pipeline.data.synth import effects
from demix.pipeline.data.synth.__main__ import main
from demix.pipeline.stems import STEMS

SR = 22050  # half the default rate: the same code paths, half the work


def _can_render(profile: str) -> bool:
    config = SynthConfig(profile=profile)
    if shutil.which("fluidsynth") is None:
        return False
    try:
        for name in config.soundfonts:
            synth.resolve_soundfont(name)
        for engine in config.voice_engines:
            synth_config.require_engine(engine)
    except SynthError:
        return False
    return True


needs_train = pytest.mark.skipif(not _can_render("train"), reason="needs fluidsynth, the train soundfonts, espeak-ng, flite")
needs_heldout = pytest.mark.skipif(not _can_render("heldout"), reason="needs fluidsynth, TimGM6mb, festival and its voices")


def _config(profile: str, **kw) -> SynthConfig:
    return SynthConfig(**{"seconds": 3.0, "seed": 7, "sample_rate": SR, "absent_share": 0.25, "profile": profile, **kw})


def _assert_valid(song: dict[str, np.ndarray], plan, config: SynthConfig) -> None:
    assert set(song) == {*STEMS, "mixture"}
    for name, audio in song.items():
        assert audio.dtype == np.float32 and audio.shape == (2, config.frames), name
        assert np.all(np.isfinite(audio)), name
    total = song["vocals"] + song["drums"]
    total += song["bass"]
    total += song["other"]
    np.testing.assert_array_equal(song["mixture"], total)  # exact, bit for bit
    assert np.abs(song["mixture"]).max() <= 0.9 + 1e-6
    for stem in STEMS:
        rms = float(np.sqrt(np.mean(song[stem].astype(np.float64) ** 2)))
        if plan.presence[stem]:
            assert rms > 1e-4, (plan.name, stem, rms)
        else:
            assert not song[stem].any(), (plan.name, stem)


def _index(config: SynthConfig, want, limit: int = 200) -> int:
    return next(i for i in range(limit) if want(plan_song(i, config)))


# --- configuration and plans (no audio) ---------------------------------------------------------------------------


def test_profiles_fill_the_fields_and_classic_is_the_default():
    classic = SynthConfig()
    assert classic.profile == "classic" and classic.classic
    assert classic.soundfonts == () and classic.voice_engines == () and not classic.effects
    train = SynthConfig(profile="train")
    assert not train.classic and train.effects and train.varied and train.automation and len(train.soundfonts) >= 4
    assert set(train.voice_engines) == {"espeak", "flite"}
    assert SynthConfig(profile="train", effects=False).effects is False  # an explicit field wins over the profile
    assert SynthConfig(profile="classic", effects=True).effects is True
    with pytest.raises(ValueError, match="profile"):
        SynthConfig(profile="opera")
    with pytest.raises(ValueError, match="voice_engines"):
        SynthConfig(voice_engines=("sapi",))
    with pytest.raises(ValueError, match="not both"):
        SynthConfig(profile="train", soundfont="/x.sf2")
    with pytest.raises(ValueError, match="spoken_share"):
        SynthConfig(spoken_share=2.0)


def test_heldout_shares_no_soundfont_voice_engine_or_speaker_with_train():
    train, heldout = PROFILES["train"], PROFILES["heldout"]
    assert heldout["soundfonts"] and heldout["voice_engines"]
    assert not set(train["soundfonts"]) & set(heldout["soundfonts"])
    assert not set(train["voice_engines"]) & set(heldout["voice_engines"])
    train_speakers = {s for e in train["voice_engines"] for s in synth.VOICES[e]}
    heldout_speakers = {s for e in heldout["voice_engines"] for s in synth.VOICES[e]}
    assert not train_speakers & heldout_speakers
    # nor the same recorded people under another engine's name (CMU kal and slt are in flite and festival)
    assert "slt" not in synth.VOICES["flite"] and "kal_diphone" not in synth.VOICES["festival"]


def test_train_plans_vary_what_classic_holds_fixed():
    config = SynthConfig(profile="train", seconds=12.0, seed=1)
    plans = [plan_song(i, config) for i in range(120)]
    assert len({p.soundfonts["song"] for p in plans}) == len(config.soundfonts)
    assert any(len({p.soundfonts[s] for s in STEMS}) > 1 for p in plans)  # a stem on another soundfont
    voiced = [p for p in plans if p.presence["vocals"]]
    assert {p.voice.engine for p in voiced} == {"espeak", "flite"}
    assert {p.voice.style for p in voiced} == {"sung", "spoken", "rapped"}
    assert {p.arrangement for p in plans} == {"sparse", "normal", "dense"}
    assert min(p.bpm for p in plans) < 80 and max(p.bpm for p in plans) > 150
    assert {p.mode for p in plans} == {"major", "minor", "dorian", "mixolydian"}
    assert min(p.voice.low for p in plans) < 45 and max(p.voice.high for p in plans) > 76
    assert all(p.effects is not None and set(p.effects) == {s for s in STEMS if p.presence[s]} for p in plans)
    assert all(set(p.automation) == {"mix", *(s for s in STEMS if p.presence[s])} for p in plans)
    kinds = Counter(e["type"] for p in plans for chain in p.effects.values() for e in chain)
    assert set(kinds) == {"highpass", "lowpass", "lowshelf", "highshelf", "peak", "saturate", "compress", "width", "reverb"}
    rooms = {(e["rt60"], e["ir_seed"]) for p in plans for chain in p.effects.values() for e in chain if e["type"] == "reverb"}
    assert len(rooms) > 50
    # the plan depends on (seed, index, config) only; presence is shared with classic
    assert plan_song(3, replace(config, tracks=2)) == plan_song(3, replace(config, tracks=99))
    classic = SynthConfig(seconds=12.0, seed=1)
    assert all(plan_song(i, classic).presence == plans[i].presence for i in range(20))
    assert plan_song(0, classic).soundfonts is None and plan_song(0, classic).effects is None


def test_heldout_plans_use_only_its_own_soundfont_and_engine():
    config = SynthConfig(profile="heldout", seconds=12.0, seed=2)
    plans = [plan_song(i, config) for i in range(60)]
    assert {f for p in plans for f in p.soundfonts.values()} == set(config.soundfonts)
    assert {p.voice.engine for p in plans} == set(config.voice_engines) == {"festival"}
    assert {p.voice.speaker for p in plans} == set(synth.VOICES["festival"])


def test_effects_change_the_audio_and_keep_it_finite():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8000)) * np.linspace(0, 0.3, 8000)
    chains = [
        [{"type": "highpass", "freq": 300.0}], [{"type": "lowpass", "freq": 2000.0}],
        [{"type": "peak", "freq": 1000.0, "gain_db": 9.0, "q": 2.0}], [{"type": "lowshelf", "freq": 200.0, "gain_db": -6.0}],
        [{"type": "highshelf", "freq": 12000.0, "gain_db": 6.0}],  # above Nyquist at 8 kHz: clamped, still stable
        [{"type": "saturate", "kind": k, "drive_db": 18.0, "mix": 1.0} for k in ("tanh", "soft", "asym")],
        [{"type": "compress", "threshold_db": -20.0, "ratio": 8.0, "attack_ms": 1.0, "release_ms": 100.0}],
        [{"type": "width", "width": 0.0}],
        [{"type": "reverb", "rt60": 1.2, "predelay_ms": 20.0, "hf_ratio": 0.5, "crossover_hz": 3000.0,
          "reflections": 6, "ir_seed": 3, "wet_db": -6.0}],
    ]
    for chain in chains:
        y = effects.apply_effects(x, chain, 8000)
        assert y.shape == x.shape and np.all(np.isfinite(y)), chain
        assert not np.allclose(y, x), chain
    compressed = effects.apply_effects(x, chains[6], 8000)
    assert np.abs(compressed[:, -1000:]).max() < np.abs(x[:, -1000:]).max()
    mono = effects.apply_effects(x, chains[7], 8000)
    np.testing.assert_allclose(mono[0], mono[1])
    curve = effects.gain_curve([(0.0, -24.0), (1.0, 0.0), (2.0, 6.0)], 8000 * 2, 8000)
    assert curve[0] == pytest.approx(10 ** (-24 / 20)) and curve[8000] == pytest.approx(1.0)
    assert np.all(np.diff(curve) >= 0)  # smooth between points, no overshoot


def test_wrapped_16_bit_speech_is_unwrapped():
    from demix.pipeline.data.synth.speech import _unwrap

    t = np.arange(400) / 8000
    clean = 1.15 * np.sin(2 * np.pi * 200 * t)  # louder than full scale: wraps in 16 bits
    wrapped = ((clean + 1) % 2 - 1).astype(np.float32)
    assert np.abs(np.diff(wrapped)).max() > 1.5
    fixed = _unwrap(wrapped)
    assert np.abs(np.diff(fixed)).max() < 0.2 and np.abs(fixed).max() <= 1.0
    np.testing.assert_allclose(fixed, clean / np.abs(clean).max(), atol=1e-5)
    quiet = (0.5 * np.sin(2 * np.pi * 200 * t)).astype(np.float32)
    assert _unwrap(quiet) is quiet


# --- rendering ----------------------------------------------------------------------------------------------------


@needs_train
def test_train_songs_are_valid_and_use_different_soundfonts_and_voices():
    config = _config("train")
    plans = [plan_song(i, config) for i in range(40)]
    # three songs with vocals on different soundfonts and engines
    picked, fonts, engines = [], set(), set()
    for p in plans:
        if p.presence["vocals"] and p.soundfonts["song"] not in fonts and (p.voice.engine not in engines or len(engines) == 2):
            picked.append(p.index)
            fonts.add(p.soundfonts["song"])
            engines.add(p.voice.engine)
        if len(picked) == 3:
            break
    assert len(fonts) == 3 and engines == {"espeak", "flite"}
    for index in picked:
        _assert_valid(render_song(index, config), plans[index], config)


@needs_train
def test_spoken_and_rapped_vocals_sound():
    config = _config("train")
    for style in ("spoken", "rapped"):
        index = _index(config, lambda p: p.presence["vocals"] and p.voice.style == style and p.voice.engine == "flite")
        song = render_song(index, replace(config, effects=False, automation=False))
        _assert_valid(song, plan_song(index, config), config)
        assert float(np.sqrt(np.mean(song["vocals"] ** 2))) > 1e-3, style


@needs_train
def test_effects_change_the_stems_and_the_sum_stays_exact():
    config = _config("train", absent_share=0.0)
    index = _index(config, lambda p: all(p.effects[s] for s in STEMS))
    dry = render_song(index, replace(config, effects=False))
    wet = render_song(index, config)
    _assert_valid(wet, plan_song(index, config), config)
    for stem in STEMS:
        assert not np.allclose(dry[stem], wet[stem], atol=1e-4), stem


@needs_heldout
def test_heldout_dataset_is_deterministic_and_records_each_song(tmp_path):
    config = _config("heldout", tracks=2, seed=2)
    truth = synth_dataset(tmp_path / "h", config, jobs=2)  # two worker processes
    songs = json.loads((tmp_path / "h" / synth.SONGS_FILE).read_text())
    settings = json.loads((tmp_path / "h" / synth.CONFIG_FILE).read_text())
    assert settings["profile"] == "heldout" and set(settings["soundfonts"]) == {"TimGM6mb.sf2"}
    assert sorted(songs) == sorted(truth) == ["synth-0000", "synth-0001"]
    for name, meta in songs.items():
        assert json.loads((tmp_path / "h" / name / synth.SONG_FILE).read_text()) == meta
        assert meta["profile"] == "heldout" and meta["soundfont"] == "TimGM6mb.sf2"
        assert set(meta["stem_soundfonts"].values()) == {"TimGM6mb.sf2"}
        assert meta["presence"] == truth[name]
        if meta["vocals"] is not None:
            assert meta["vocals"]["engine"] == "festival"
        assert set(meta["effects"]) == {s for s in STEMS if truth[name][s]}
        index = int(name.split("-")[1])
        again = render_song(index, config)  # here, not in a worker: the same bytes
        for f in (*STEMS, "mixture"):
            data, rate = sf.read(tmp_path / "h" / name / f"{f}.wav", dtype="float32", always_2d=True)
            assert rate == SR
            np.testing.assert_array_equal(data.T, again[f])
        _assert_valid(again, plan_song(index, config), config)
    assert synth_dataset(tmp_path / "h", config) == truth  # a re-run renders nothing and agrees


@needs_heldout
def test_cli_profile_and_classic_folders_stay_as_they_were(tmp_path, capsys):
    assert main(["dataset", str(tmp_path / "c"), "--tracks", "1", "--seconds", "2", "--sample-rate", str(SR)]) == 0
    settings = json.loads((tmp_path / "c" / synth.CONFIG_FILE).read_text())
    assert set(settings) == {"version", "seed", "seconds", "sample_rate", "absent_share", "vocals", "soundfont"}
    assert not (tmp_path / "c" / synth.SONGS_FILE).exists() and not (tmp_path / "c" / "synth-0000" / synth.SONG_FILE).exists()
    assert main(["dataset", str(tmp_path / "h"), "--profile", "heldout", "--tracks", "1", "--seconds", "2",
                 "--sample-rate", str(SR), "--seed", "4"]) == 0
    assert json.loads((tmp_path / "h" / "synth-0000" / synth.SONG_FILE).read_text())["profile"] == "heldout"
    assert main(["dataset", str(tmp_path / "h"), "--profile", "train", "--tracks", "1", "--seconds", "2",
                 "--sample-rate", str(SR), "--seed", "4"]) == 1
    assert "other settings" in capsys.readouterr().err


# --- missing tools ------------------------------------------------------------------------------------------------


def test_missing_voice_engines_and_soundfonts_name_their_debian_package(monkeypatch, tmp_path):
    real_which = shutil.which
    monkeypatch.setattr(synth_config.shutil, "which", lambda name: None if name in ("festival", "flite") else real_which(name))
    with pytest.raises(SynthError, match=r"apt-get install festival\)"):
        synth_config.require_engine("festival")
    with pytest.raises(SynthError, match=r"apt-get install flite\)"):
        synth_dataset(tmp_path / "t", _config("train", tracks=1))
    assert not (tmp_path / "t").exists()  # nothing written before the check
    monkeypatch.setattr(synth_config.shutil, "which", real_which)
    monkeypatch.setattr(synth_config, "FESTIVAL_VOICE_DIRS", (str(tmp_path / "voices"),))
    if real_which("festival") is not None:
        with pytest.raises(SynthError, match="festvox-kdlpc16k"):
            synth_config.require_engine("festival", "ked_diphone")
        with pytest.raises(SynthError, match="festvox-us-slt-hts"):
            synth_config.require_engine("festival", "cmu_us_slt_arctic_hts")
    monkeypatch.setitem(synth_config.SOUNDFONTS, "TimGM6mb.sf2", ((str(tmp_path / "TimGM6mb.sf2"),), "timgm6mb-soundfont"))
    with pytest.raises(SynthError, match="apt-get install timgm6mb-soundfont"):
        synth.resolve_soundfont("TimGM6mb.sf2")
    with pytest.raises(SynthError, match="neither a known name"):
        synth.resolve_soundfont(str(tmp_path / "nope.sf2"))


def test_soundfont_presets_are_read_from_the_header(tmp_path):
    for name in ("FluidR3_GM.sf2", "TimGM6mb.sf2", "FluidR3Mono_GM.sf3", "OPL-3_FM_128M.sf2"):
        try:
            path = synth.resolve_soundfont(name)
        except SynthError:
            continue
        presets = synth_config.soundfont_presets(str(path))
        assert {(0, p) for p in range(128)} <= presets, name  # General MIDI: every melodic program
        assert (128, 0) in presets, name  # the standard drum kit
    (tmp_path / "x.sf2").write_bytes(b"RIFF\x04\x00\x00\x00WAVE")
    with pytest.raises(SynthError, match="not a SoundFont"):
        synth_config.soundfont_presets(str(tmp_path / "x.sf2"))
