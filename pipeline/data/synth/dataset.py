"""A synthetic dataset on disk in MUSDB layout: ``OUT/<track>/{mixture,vocals,drums,bass,other}.wav``,
``OUT/truth.json`` (which stems each track has) and ``OUT/synth_config.json`` (the settings)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from demix.pipeline.data.synth.config import (
    CONFIG_FILE, SYNTH_VERSION, TRUTH_FILE, SynthConfig, SynthError, find_soundfont, require_tool, track_name,
    vocal_engine,
)
from demix.pipeline.data.synth.plan import plan_song
from demix.pipeline.data.synth.render import render_song
from demix.pipeline.io import AtomicOutput, atomic_write, write_float_wav
from demix.pipeline.stems import STEMS

def _write_json(path: Path, obj: object) -> None:
    atomic_write(str(path), (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _dataset_settings(config: SynthConfig, soundfont: Path, engine: str) -> dict:
    return {
        "version": SYNTH_VERSION, "seed": int(config.seed), "seconds": float(config.seconds),
        "sample_rate": int(config.sample_rate), "absent_share": float(config.absent_share), "vocals": engine,
        "soundfont": {"name": soundfont.name, "bytes": soundfont.stat().st_size},
    }


def synth_dataset(out: str | Path, config: SynthConfig, *,
                  progress: Callable[[int], None] | None = None) -> dict[str, dict[str, bool]]:
    """Write ``config.tracks`` songs to ``out/<track>/{mixture,vocals,drums,bass,other}.wav`` (32-bit float, so
    the mixture file is the sum of the stem files bit for bit) and ``out/truth.json``
    ``{track: {stem: present}}`` for every track in the folder; returns that dict. Tracks already complete are skipped, so a re-run, or a
    run with more tracks, only renders what is missing; ``out/synth_config.json`` records the settings and a
    run with other settings into the same folder raises :class:`SynthError`.

    Args:
        progress: called with 1 after each track (rendered or skipped), so ``tqdm.update`` fits.
    """
    out = Path(out)
    sf2 = find_soundfont(config.soundfont)
    engine = vocal_engine(config)
    require_tool("fluidsynth", "fluidsynth")
    out.mkdir(parents=True, exist_ok=True)
    settings = _dataset_settings(config, sf2, engine)
    settings_path = out / CONFIG_FILE
    if settings_path.is_file():
        existing = json.loads(settings_path.read_text())
        if existing != settings:
            diff = {k: (existing.get(k), v) for k, v in settings.items() if existing.get(k) != v}
            raise SynthError(f"{out} holds synthetic tracks made with other settings (was, now): {diff}; use a new folder")
    else:
        _write_json(settings_path, settings)
    truth_path = out / TRUTH_FILE
    truth: dict[str, dict[str, bool]] = json.loads(truth_path.read_text()) if truth_path.is_file() else {}
    pinned = replace(config, soundfont=str(sf2), vocals=engine)
    files = [f"{s}.wav" for s in STEMS] + ["mixture.wav"]  # the mixture last: it marks a complete track
    for index in range(config.tracks):
        name = track_name(index)
        folder = out / name
        if not all((folder / f).is_file() for f in files):
            audio = render_song(index, pinned)
            with AtomicOutput() as staged:  # committed in order: the mixture, last, marks a complete track
                for f in files:
                    write_float_wav(staged.path_for(str(folder / f)), audio[f[:-4]], config.sample_rate)
                staged.commit()
        truth[name] = dict(plan_song(index, config).presence)
        if progress is not None:
            progress(1)
    _write_json(truth_path, truth)
    return truth
