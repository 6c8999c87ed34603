"""A synthetic dataset on disk in MUSDB layout: ``OUT/<track>/{mixture,vocals,drums,bass,other}.wav``,
``OUT/truth.json`` (which stems each track has) and ``OUT/synth_config.json`` (the settings). Profiles other
than classic also write each song's concrete choices (soundfonts, voice, effects, automation) to
``OUT/<track>/song.json`` and all of them to ``OUT/songs.json``."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np

from demix.pipeline.data.synth.config import (
    CONFIG_FILE, SONG_FILE, SONGS_FILE, SYNTH_VERSION, TRUTH_FILE, SynthConfig, SynthError, find_soundfont,
    require_engine, require_tool, resolve_soundfont, soundfont_label, soundfont_presets, track_name, vocal_engine,
)
from demix.pipeline.data.synth.midi import Part
from demix.pipeline.data.synth.plan import SongPlan, plan_song
from demix.pipeline.data.synth.render import available_program, render_song
from demix.pipeline.io import AtomicOutput, atomic_write, write_float_wav
from demix.pipeline.stems import STEMS

def _write_json(path: Path, obj: object) -> None:
    atomic_write(str(path), (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _font_entry(path: Path) -> dict:
    return {"name": path.name, "bytes": path.stat().st_size}


def _dataset_settings(config: SynthConfig, soundfont: Path | None, engine: str | None) -> dict:
    settings = {
        "version": SYNTH_VERSION, "seed": int(config.seed), "seconds": float(config.seconds),
        "sample_rate": int(config.sample_rate), "absent_share": float(config.absent_share),
    }
    if config.classic:  # exactly as before profiles existed, so that old folders can be topped up
        return {**settings, "vocals": engine, "soundfont": _font_entry(soundfont)}
    settings.update(config.profile_settings())
    settings["vocals"] = engine if engine is not None else list(config.voice_engines)
    if soundfont is not None:
        settings["soundfont"] = _font_entry(soundfont)
    else:
        settings["soundfonts"] = {name: _font_entry(resolve_soundfont(name)) for name in config.soundfonts}
    return settings


def song_metadata(plan: SongPlan, config: SynthConfig) -> dict:
    """The concrete choices of one song, JSON-ready: what an audit of a profile needs (``OUT/<track>/song.json``)."""
    if plan.soundfonts is not None:
        fonts = {s: soundfont_label(plan.soundfonts[s]) for s in STEMS}
        song_font = soundfont_label(plan.soundfonts["song"])
        kit_font = resolve_soundfont(plan.soundfonts["drums"])
        kit = available_program(_drum_part(plan), soundfont_presets(str(kit_font)))
    else:
        song_font = find_soundfont(config.soundfont).name
        fonts = dict.fromkeys(STEMS, song_font)
        kit = plan.drum_kit
    voice = plan.voice
    engine = voice.engine if voice.engine is not None else vocal_engine(config)
    vocals = None
    if plan.presence["vocals"]:
        vocals = {"engine": engine, "speaker": voice.speaker or (voice.espeak if engine == "espeak" else engine),
                  "style": voice.style, "range": [voice.low, voice.high], "harmony": voice.harmony,
                  "backing_program": voice.backing}
    return {
        "profile": config.profile, "presence": dict(plan.presence), "bpm": plan.bpm, "key": plan.key,
        "mode": plan.mode, "arrangement": plan.arrangement, "drum_style": plan.drum_style, "drum_kit": kit,
        "bass_program": plan.bass_program, "other_programs": [i.program for i in plan.other],
        "soundfont": song_font, "stem_soundfonts": fonts, "vocals": vocals,
        "gains_db": {s: round(float(g), 2) for s, g in plan.gains_db.items()},
        "effects": {s: [dict(e) for e in chain] for s, chain in plan.effects.items()} if plan.effects is not None else None,
        "automation": ({s: [list(p) for p in pts] for s, pts in plan.automation.items()}
                       if plan.automation is not None else None),
    }


def _drum_part(plan: SongPlan) -> Part:
    return Part(9, plan.drum_kit, 64, 0, 0, [])


def _render_all(indices: list[int], config: SynthConfig, jobs: int) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """``(index, audio)`` in order, ``jobs`` songs at a time in worker processes (1: here)."""
    if jobs <= 1 or len(indices) <= 1:
        for index in indices:
            yield index, render_song(index, config)
        return
    with ProcessPoolExecutor(max_workers=min(jobs, len(indices))) as pool:
        yield from zip(indices, pool.map(render_song, indices, [config] * len(indices)))


def _pinned(config: SynthConfig) -> tuple[SynthConfig, Path | None, str | None]:
    """``config`` with the soundfont and vocal engine it resolves to pinned, and those two (None where the profile
    draws them per song); fluidsynth, the soundfonts and the voice engines are checked first, so that a missing one
    fails before any work (the error names its package)."""
    require_tool("fluidsynth", "fluidsynth")
    pinned = config
    if config.soundfonts:
        sf2 = None
        for name in config.soundfonts:  # every soundfont found (or the error names its package) before any work
            soundfont_presets(str(resolve_soundfont(name)))
    else:
        sf2 = find_soundfont(config.soundfont)
        pinned = replace(pinned, soundfont=str(sf2))
    if config.voice_engines:
        engine = None
        for name in config.voice_engines:
            require_engine(name)
    else:
        engine = vocal_engine(config)
        pinned = replace(pinned, vocals=engine)
    return pinned, sf2, engine


def _check_settings(out: Path, settings: dict) -> None:
    """Record ``settings`` in ``out/synth_config.json``, or raise :class:`SynthError` when the folder holds tracks
    made with other ones."""
    settings_path = out / CONFIG_FILE
    if settings_path.is_file():
        existing = json.loads(settings_path.read_text())
        if existing != settings:
            diff = {k: (existing.get(k), v) for k, v in settings.items() if existing.get(k) != v}
            raise SynthError(f"{out} holds synthetic tracks made with other settings (was, now): {diff}; use a new folder")
    else:
        _write_json(settings_path, settings)


def synth_dataset(out: str | Path, config: SynthConfig, *, progress: Callable[[int], None] | None = None,
                  jobs: int = 1) -> dict[str, dict[str, bool]]:
    """Write ``config.tracks`` songs to ``out/<track>/{mixture,vocals,drums,bass,other}.wav`` (32-bit float, so
    the mixture file is the sum of the stem files bit for bit) and ``out/truth.json``
    ``{track: {stem: present}}`` for every track in the folder; returns that dict. Tracks already complete are skipped, so a re-run, or a
    run with more tracks, only renders what is missing; ``out/synth_config.json`` records the settings and a
    run with other settings into the same folder raises :class:`SynthError`. Profiles other than classic also
    write ``out/<track>/song.json`` and ``out/songs.json`` (:func:`song_metadata`).

    Args:
        progress: called with 1 after each track (rendered or skipped), so ``tqdm.update`` fits.
        jobs: songs rendered at once in worker processes (the audio does not depend on it).
    """
    out = Path(out)
    pinned, sf2, engine = _pinned(config)
    out.mkdir(parents=True, exist_ok=True)
    _check_settings(out, _dataset_settings(config, sf2, engine))
    truth_path = out / TRUTH_FILE
    truth: dict[str, dict[str, bool]] = json.loads(truth_path.read_text()) if truth_path.is_file() else {}
    songs_path = out / SONGS_FILE
    songs: dict[str, dict] | None = None
    if not config.classic:
        songs = json.loads(songs_path.read_text()) if songs_path.is_file() else {}
    files = [f"{s}.wav" for s in STEMS] + ["mixture.wav"]  # the mixture last: it marks a complete track
    missing = [i for i in range(config.tracks) if not all((out / track_name(i) / f).is_file() for f in files)]
    rendered = _render_all(list(missing), pinned, jobs)
    for index in range(config.tracks):
        name = track_name(index)
        folder = out / name
        plan = plan_song(index, pinned)
        meta = song_metadata(plan, pinned) if songs is not None else None
        if missing and missing[0] == index:
            missing.pop(0)
            _, audio = next(rendered)
            with AtomicOutput() as staged:  # committed in order: the mixture, last, marks a complete track
                if meta is not None:
                    staged_meta = staged.path_for(str(folder / SONG_FILE))
                    Path(staged_meta).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
                for f in files:
                    write_float_wav(staged.path_for(str(folder / f)), audio[f[:-4]], config.sample_rate)
                staged.commit()
        truth[name] = dict(plan.presence)
        if songs is not None:
            songs[name] = meta
        if progress is not None:
            progress(1)
    _write_json(truth_path, truth)
    if songs is not None:
        _write_json(songs_path, songs)
    return truth
