"""One song's audio: its MIDI parts rendered by the ``fluidsynth`` command with a General MIDI soundfont, its lead
sung (:mod:`demix.pipeline.data.synth.voice`) meanwhile, then levelled and mixed."""

from __future__ import annotations

import math
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import soundfile as sf

from demix.pipeline.data.synth.compose import compose_song
from demix.pipeline.data.synth.config import SynthConfig, SynthError, find_soundfont, require_tool, vocal_engine
from demix.pipeline.data.synth.midi import Part, midi_file
from demix.pipeline.data.synth.plan import SongPlan, plan_song
from demix.pipeline.data.synth.voice import sing
from demix.pipeline.stems import STEMS

_TAIL_S = 4  # silence between stems rendered one after another in one fluidsynth run (release + reverb tails)
# level of each present stem before the mix is scaled down: RMS over its active parts, dBFS
_STEM_LEVEL_DB = {"vocals": -17.0, "drums": -16.0, "bass": -18.0, "other": -18.0}


class _Render(NamedTuple):
    proc: subprocess.Popen
    wav: Path
    log: Path
    slots: int
    slot_s: int


def _start_fluidsynth(slots: Sequence[Sequence[Part]], plan: SongPlan, config: SynthConfig, soundfont: Path,
                      tmp: Path) -> _Render:
    """Start rendering each slot's parts. One process loads the soundfont once and plays the slots one after
    another, with silence between them so that no stem hears another's release or reverb."""
    exe = require_tool("fluidsynth", "fluidsynth")
    slot_s = math.ceil(config.seconds) + _TAIL_S
    midi, wav, log = tmp / f"{plan.name}.mid", tmp / f"{plan.name}.wav", tmp / f"{plan.name}.log"
    midi.write_bytes(midi_file(slots, slot_s))
    room, damp, width, level = plan.reverb
    cmd = [
        exe, "-ni", "-q", "-R", "1", "-C", "0", "-g", "0.4", "-r", str(config.sample_rate), "-O", "float", "-T", "wav",
        "-o", "player.timing-source=sample", "-o", "synth.lock-memory=0", "-o", "synth.cpu-cores=1",
        "-o", "synth.dynamic-sample-loading=0", "-o", "synth.polyphony=512",
        "-o", f"synth.reverb.room-size={room}", "-o", f"synth.reverb.damp={damp}",
        "-o", f"synth.reverb.width={width}", "-o", f"synth.reverb.level={level}",
        "-F", str(wav), str(soundfont), str(midi),
    ]
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=subprocess.STDOUT)
    return _Render(proc, wav, log, len(slots), slot_s)


def _collect_fluidsynth(render: _Render, config: SynthConfig, name: str) -> list[np.ndarray]:
    """Wait for :func:`_start_fluidsynth`; one ``(2, frames)`` array per slot."""
    code = render.proc.wait()
    if code != 0 or not render.wav.is_file():
        message = render.log.read_text(errors="replace").strip()[-500:] if render.log.is_file() else ""
        raise SynthError(f"fluidsynth failed on {name} (exit {code}): {message}")
    n, sr = config.frames, config.sample_rate
    out = []
    with sf.SoundFile(render.wav) as f:
        if f.samplerate != sr or f.channels != 2:
            raise SynthError(f"fluidsynth wrote {f.samplerate} Hz, {f.channels} channels; expected {sr} Hz stereo")
        for k in range(render.slots):
            audio = np.zeros((2, n), dtype=np.float32)
            start = k * render.slot_s * sr
            if start < f.frames:
                f.seek(start)
                seg = f.read(min(n, f.frames - start), dtype="float32", always_2d=True)
                audio[:, : len(seg)] = seg.T
            out.append(audio)
    return out


def _active_rms(x: np.ndarray, sample_rate: int) -> float:
    """RMS over the blocks where the stem sounds (within 40 dB of its loudest 100 ms)."""
    block = max(1, int(0.1 * sample_rate))
    nb = x.shape[1] // block
    if nb == 0:
        return float(np.sqrt((x**2).mean()))
    power = (x[:, : nb * block] ** 2).reshape(x.shape[0], nb, block).mean(axis=(0, 2))
    if power.max() <= 0:
        return 0.0
    return float(np.sqrt(power[power > power.max() * 1e-4].mean()))


def render_song(index: int, config: SynthConfig) -> dict[str, np.ndarray]:
    """Track ``index`` of the dataset ``config`` describes: ``{stem: (2, frames)}`` float32 for the four stems and
    ``"mixture"``, their float32 sum ``((vocals + drums) + bass) + other``, peak <= 0.9. A left-out stem is all
    zeros; which stems are present is ``plan_song(index, config).presence``."""
    plan = plan_song(index, config)
    engine = vocal_engine(config)
    sf2 = find_soundfont(config.soundfont)
    parts, lead, harmony = compose_song(plan, config, engine)
    n, sr = config.frames, config.sample_rate
    stems = {s: np.zeros((2, n)) for s in STEMS}
    slots = [s for s in STEMS if any(part.notes for part in parts[s])]
    with tempfile.TemporaryDirectory(prefix="demix-synth-") as tmp:
        render = _start_fluidsynth([parts[s] for s in slots], plan, config, sf2, Path(tmp)) if slots else None
        try:
            if lead:  # sung while fluidsynth renders
                stems["vocals"] += sing(lead, harmony, plan, config)
        finally:
            rendered = _collect_fluidsynth(render, config, plan.name) if render is not None else []
    for stem, audio in zip(slots, rendered):
        stems[stem] += audio
    for stem in STEMS:
        if not plan.presence[stem]:
            continue
        level = _active_rms(stems[stem], sr)
        if level < 1e-6:
            raise SynthError(f"{plan.name}: stem {stem!r} is planned present but came out silent")
        stems[stem] *= 10 ** ((_STEM_LEVEL_DB[stem] + plan.gains_db[stem]) / 20) / level
    peak = float(np.abs(sum(stems.values())).max())
    gain = 0.9 / peak if peak > 0.9 else 1.0
    out = {s: (stems[s] * gain).astype(np.float32) for s in STEMS}
    mixture = out["vocals"] + out["drums"]
    mixture += out["bass"]
    mixture += out["other"]
    out["mixture"] = mixture
    return out
