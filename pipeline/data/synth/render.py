"""One song's audio: its MIDI parts rendered by the ``fluidsynth`` command with a General MIDI soundfont (with
``SynthConfig.soundfonts``: one run per soundfont the song's stems use), its lead sung or spoken
(:mod:`demix.pipeline.data.synth.voice`) meanwhile, then each stem through its effect chain
(:mod:`demix.pipeline.data.synth.effects`), levelled, automated and mixed."""

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
from demix.pipeline.data.synth import effects
from demix.pipeline.data.synth.config import (
    SynthConfig, SynthError, find_soundfont, require_engine, require_tool, resolve_soundfont, soundfont_presets,
    vocal_engine,
)
from demix.pipeline.data.synth.midi import Part, midi_file
from demix.pipeline.data.synth.plan import SongPlan, plan_song
from demix.pipeline.data.synth.voice import sing, speak
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
                      tmp: Path, tag: str = "", dynamic: bool = False) -> _Render:
    """Start rendering each slot's parts. One process loads the soundfont once and plays the slots one after
    another, with silence between them so that no stem hears another's release or reverb. ``dynamic`` loads only
    the samples the parts use (much faster for large or compressed ``.sf3`` soundfonts)."""
    exe = require_tool("fluidsynth", "fluidsynth")
    slot_s = math.ceil(config.seconds) + _TAIL_S
    midi, wav, log = (tmp / f"{plan.name}{tag}.{ext}" for ext in ("mid", "wav", "log"))
    midi.write_bytes(midi_file(slots, slot_s))
    room, damp, width, level = plan.reverb
    cmd = [
        exe, "-ni", "-q", "-R", "1", "-C", "0", "-g", "0.4", "-r", str(config.sample_rate), "-O", "float", "-T", "wav",
        "-o", "player.timing-source=sample", "-o", "synth.lock-memory=0", "-o", "synth.cpu-cores=1",
        "-o", f"synth.dynamic-sample-loading={int(dynamic)}", "-o", "synth.polyphony=512",
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


def available_program(part: Part, presets: frozenset[tuple[int, int]]) -> int:
    """``part.program`` when the soundfont has it (drum kits: bank 128 on channel 10), else program 0 (the
    standard kit, the grand piano)."""
    bank = 128 if part.channel == 9 else 0
    return part.program if (bank, part.program) in presets else 0


def song_soundfonts(plan: SongPlan, config: SynthConfig) -> dict[str, Path]:
    """The soundfont file of each stem of ``plan``."""
    if plan.soundfonts is None:
        sf2 = find_soundfont(config.soundfont)
        return dict.fromkeys(STEMS, sf2)
    return {s: resolve_soundfont(plan.soundfonts[s]) for s in STEMS}


def render_song(index: int, config: SynthConfig) -> dict[str, np.ndarray]:
    """Track ``index`` of the dataset ``config`` describes: ``{stem: (2, frames)}`` float32 for the four stems and
    ``"mixture"``, their float32 sum ``((vocals + drums) + bass) + other``, peak <= 0.9. A left-out stem is all
    zeros; which stems are present is ``plan_song(index, config).presence``."""
    plan = plan_song(index, config)
    engine = vocal_engine(config) if plan.voice.engine is None else plan.voice.engine
    fonts = song_soundfonts(plan, config)
    parts, lead, harmony = compose_song(plan, config, engine)
    if lead and engine in ("flite", "festival"):
        require_engine(engine, plan.voice.speaker)
    n, sr = config.frames, config.sample_rate
    stems = {s: np.zeros((2, n)) for s in STEMS}
    slots = [s for s in STEMS if any(part.notes for part in parts[s])]
    # one fluidsynth run per soundfont (classic: one); parts moved to programs the soundfont has
    groups: dict[Path, list[str]] = {}
    for stem in slots:
        groups.setdefault(fonts[stem], []).append(stem)
    dynamic = plan.soundfonts is not None
    with tempfile.TemporaryDirectory(prefix="demix-synth-") as tmp:
        renders: list[tuple[list[str], _Render]] = []
        try:
            for k, (font, group) in enumerate(groups.items()):
                if dynamic:
                    presets = soundfont_presets(str(font))
                    group_parts = [[p._replace(program=available_program(p, presets)) for p in parts[s]] for s in group]
                else:
                    group_parts = [parts[s] for s in group]
                tag = f"-{k}" if len(groups) > 1 else ""
                renders.append((group, _start_fluidsynth(group_parts, plan, config, font, Path(tmp), tag, dynamic)))
            if lead:  # sung (or spoken) while fluidsynth renders
                if plan.voice.style == "sung":
                    stems["vocals"] += sing(lead, harmony, plan, config)
                else:
                    stems["vocals"] += speak(lead, plan, config)
        finally:
            rendered = []
            for group, render in renders:  # wait for every run, also when one failed
                try:
                    rendered.append((group, _collect_fluidsynth(render, config, plan.name)))
                except SynthError as err:
                    rendered.append((group, err))
    for group, audio in rendered:
        if isinstance(audio, SynthError):
            raise audio
        for stem, stem_audio in zip(group, audio):
            stems[stem] += stem_audio
    return _mix(stems, plan, n, sr)


def _mix(stems: dict[str, np.ndarray], plan: SongPlan, n: int, sr: int) -> dict[str, np.ndarray]:
    """Each present stem of ``stems`` through its effect chain, levelled and automated, then the float32 stems and
    their sum ``"mixture"``, scaled down together to a peak of at most 0.9."""
    for stem in STEMS:
        if not plan.presence[stem]:
            continue
        if plan.effects is not None and plan.effects.get(stem):
            stems[stem] = effects.apply_effects(stems[stem], plan.effects[stem], sr)
        level = _active_rms(stems[stem], sr)
        if level < 1e-6:
            raise SynthError(f"{plan.name}: stem {stem!r} is planned present but came out silent")
        stems[stem] *= 10 ** ((_STEM_LEVEL_DB[stem] + plan.gains_db[stem]) / 20) / level
        if plan.automation is not None:
            curve = effects.gain_curve(plan.automation[stem], n, sr) * effects.gain_curve(plan.automation["mix"], n, sr)
            stems[stem] *= curve
    peak = float(np.abs(sum(stems.values())).max())
    gain = 0.9 / peak if peak > 0.9 else 1.0
    out = {s: (stems[s] * gain).astype(np.float32) for s in STEMS}
    mixture = out["vocals"] + out["drums"]
    mixture += out["bass"]
    mixture += out["other"]
    out["mixture"] = mixture
    return out
