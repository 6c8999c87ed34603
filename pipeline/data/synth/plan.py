"""The plan of one song: every random choice (tempo, key, form, chords, instruments, presence, mix) made from
``np.random.default_rng([seed, index])`` before any audio is rendered, out of the vocabulary in :mod:`.styles`.
Choices that only the varied profiles make come from streams of their own: arrangement, voice engine and
soundfonts from ``[seed, index, 20]``, effects from ``[..., 21]``, automation from ``[..., 22]``; so switching
effects or automation on or off leaves the notes and every other choice as they were, and presence is the same in
every profile."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np

from demix.pipeline.data.synth.config import ESPEAK_FEMALE, ESPEAK_MALE, VOICES, SynthConfig, track_name
from demix.pipeline.data.synth.effects import plan_automation, plan_effects
from demix.pipeline.data.synth.styles import (
    ACTIVITY, ARRANGEMENT_SHARE, ARRANGEMENTS, BASE_MODE, BASS_FIGURES, FAMILIES, FAMILY_SHARE, FORM, GROOVES, KITS,
    LEADS, PROGRESSIONS, REPEAT_FORM, SCALES,
)
from demix.pipeline.stems import STEMS

_GOLDEN = 0.6180339887498949
VOCAL_STYLES = ("sung", "spoken", "rapped")  # rapped: each word spoken on its note's onset


class Chord(NamedTuple):
    root: int  # semitones above the key's tonic
    tones: tuple[int, ...]  # semitones above the tonic, ascending from the root


class Note(NamedTuple):
    start: float  # seconds from the clip start
    dur: float  # seconds
    pitch: int  # MIDI note
    vel: int  # MIDI velocity 1..127


class Sung(NamedTuple):
    start: float
    dur: float
    pitch: int
    vel: int
    word: str


@dataclass(frozen=True)
class Section:
    name: str  # intro, verse, chorus, bridge or outro
    start_bar: int  # bars from the clip start
    bars: int  # bars inside the clip
    active: frozenset[str]  # stems that play in this section


@dataclass(frozen=True)
class Instrument:
    program: int  # GM program, 0-based
    role: str  # pad, comp, stab, arp, strum or riff
    pan: int  # MIDI CC10
    sections: frozenset[str] | None  # section names it plays in (None: wherever "other" plays)
    reverb: int  # CC91 send


@dataclass(frozen=True)
class Voice:
    espeak: str  # espeak-ng voice, e.g. "en+f3"
    low: int  # melody range, MIDI notes
    high: int
    pitch: int  # espeak-ng -p (base pitch the syllables are spoken at before PSOLA)
    speed: int  # espeak-ng -s (words per minute: consonant lengths)
    gm_program: int  # lead program when singing without espeak-ng: 53 Voice Oohs, 54 Synth Voice, 85 Solo Vox
    harmony: bool  # a second voice a third above in choruses
    backing: int | None  # GM choir program holding chords in choruses (52 Choir Aahs, 53 Voice Oohs), or None
    pan: float  # -1 (left) .. 1 (right)
    vibrato_hz: float
    vibrato_cents: float
    reverb_s: float  # RT60 of the vocal reverb
    reverb_db: float  # wet level
    echo: float  # delay feedback gain (0: no echo)
    # with SynthConfig.voice_engines (None otherwise: SynthConfig.vocals decides, espeak-ng speaks ``espeak``)
    engine: str | None = None  # espeak, flite, festival or gm
    speaker: str | None = None  # the engine's voice (espeak: the same as ``espeak``)
    female: bool | None = None
    style: str = "sung"  # sung, spoken or rapped (VOCAL_STYLES)


@dataclass(frozen=True)
class SongPlan:
    """Every random choice of one song, made before any audio is rendered (cheap)."""

    name: str
    index: int
    presence: Mapping[str, bool]  # stem -> present in the track (truth.json)
    bpm: float
    key: int  # tonic pitch class, 0 = C
    mode: str  # major or minor
    swing: float  # delay of off-beat eighths, in sixteenths (0 straight, 0.67 triplet feel)
    sections: tuple[Section, ...]
    chords: tuple[Chord, ...]  # one per bar from the clip start
    drum_style: str
    drum_kit: int
    bass_program: int
    bass_figure: str
    other: tuple[Instrument, ...]
    voice: Voice
    gains_db: Mapping[str, float]  # per-stem level offset
    pans: Mapping[str, int]  # CC10 of drums and bass
    sends: Mapping[str, int]  # CC91 of drums, bass and GM voices
    reverb: tuple[float, float, float, float]  # fluidsynth room size, damping, width, level
    # choices of profiles other than classic (the defaults are classic's)
    arrangement: str = "normal"  # sparse, normal or dense (SynthConfig.varied)
    melody_density: float = 1.0  # scales the chance of each sung phrase
    bass_shift: int = 0  # semitones added to the bass line
    other_shift: float = 0.0  # semitones added to the accompaniment's centre
    soundfonts: Mapping[str, str] | None = None  # stem -> soundfont (SynthConfig.soundfonts); None: config.soundfont
    effects: Mapping[str, tuple[Mapping[str, object], ...]] | None = None  # stem -> effect chain (SynthConfig.effects)
    automation: Mapping[str, tuple[tuple[float, float], ...]] | None = None  # stem or "mix" -> (seconds, dB) points

    @property
    def bar_s(self) -> float:
        return 240.0 / self.bpm

    def time(self, bar: int | float, step: int | float) -> float:
        """Seconds from the clip start of sixteenth ``step`` in ``bar`` (swing delays off-beat eighths)."""
        swing = self.swing if float(step) % 4 == 2 else 0.0
        return (bar + (step + swing) / 16.0) * self.bar_s


def _presence(index: int, config: SynthConfig) -> dict[str, bool]:
    # a golden-ratio sequence spreads the absent tracks evenly: any prefix holds about absent_share of them
    phase = float(np.random.default_rng([config.seed]).random())
    present = dict.fromkeys(STEMS, True)
    if (phase + index * _GOLDEN) % 1.0 < config.absent_share:
        rng = np.random.default_rng([config.seed, index, 1])
        count = int(rng.choice([1, 2, 3], p=[0.75, 0.2, 0.05]))
        for stem in rng.choice(STEMS, size=count, replace=False, p=[0.5, 0.2, 0.15, 0.15]):
            present[str(stem)] = False
    return present


def _chord(mode: str, degree: int, seventh: bool) -> Chord:
    scale = SCALES[mode]
    steps = (degree, degree + 2, degree + 4) + ((degree + 6,) if seventh else ())
    tones = tuple(scale[i % 7] + 12 * (i // 7) for i in steps)
    return Chord(tones[0], tones)


def _sections(rng: np.random.Generator, bars_needed: int) -> list[tuple[str, int]]:
    form = [(name, int(rng.choice(lengths))) for name, lengths in FORM]
    form = form[int(rng.choice([0, 1, 2], p=[0.6, 0.25, 0.15])):]
    while sum(b for _, b in form) < bars_needed:
        form += [(name, int(rng.choice(lengths))) for name, lengths in REPEAT_FORM]
    out, total = [], 0
    for name, b in form:
        if total >= bars_needed:
            break
        out.append((name, min(b, bars_needed - total)))
        total += b
    if len(out) > 1 and out[-1][1] >= 2 and rng.random() < 0.3:  # the clip ends on an outro
        out[-1] = ("outro", out[-1][1])
    return out


def _progressions(rng: np.random.Generator, mode: str) -> tuple[bool, dict[str, tuple[int, ...]]]:
    """Whether chords take sevenths, and the progression of each section name."""
    sevenths = rng.random() < 0.25
    progs = {name: PROGRESSIONS[mode][int(rng.integers(len(PROGRESSIONS[mode])))] for name in ("verse", "chorus", "bridge")}
    if rng.random() < 0.4:
        progs["chorus"] = progs["verse"]
    progs["intro"] = progs["verse"] if rng.random() < 0.5 else progs["chorus"]
    progs["outro"] = progs["chorus"]
    return sevenths, progs


def _active_stems(rng: np.random.Generator, form: list[tuple[str, int]], presence: dict[str, bool],
                  scale: float = 1.0) -> list[set[str]]:
    """Which stems play in which section: sections with stems dropping out give realistic active segments.
    ``scale`` multiplies the chance of the non-vocal stems (sparse arrangements)."""
    active = []
    for name, _ in form:
        if scale == 1.0:
            active.append({s for s in STEMS if presence[s] and rng.random() < ACTIVITY[name][s]})
        else:
            chance = {s: ACTIVITY[name][s] * (1.0 if s == "vocals" else scale) for s in STEMS}
            active.append({s for s in STEMS if presence[s] and rng.random() < chance[s]})
    present = [s for s in STEMS if presence[s]]
    for stems in active:
        if not stems:
            stems.add(present[int(rng.integers(len(present)))])
    for stem in present:
        if not any(stem in a for a in active):
            # the longest section that could hold it (vocals prefer a verse or chorus)
            best = max(range(len(form)), key=lambda k: (stem != "vocals" or form[k][0] in ("verse", "chorus"), form[k][1]))
            active[best].add(stem)
    return active


def _accompaniment_instruments(rng: np.random.Generator) -> list[Instrument]:
    """Accompaniment: one instrument, often a second one on the other side."""
    families = list(FAMILIES)
    first = str(rng.choice(families, p=FAMILY_SHARE))
    side = 1 if rng.random() < 0.5 else -1
    other = [_instrument(rng, first, side, None)]
    if rng.random() < 0.6:
        if rng.random() < 0.4:
            program = int(rng.choice(LEADS))
            other.append(Instrument(program, "riff", 64 - side * int(rng.integers(10, 40)), None, int(rng.integers(30, 70))))
        else:
            second = [f for f in families if f != first][int(rng.integers(len(families) - 1))]
            only = frozenset({"chorus", "bridge"}) if rng.random() < 0.5 else None
            other.append(_instrument(rng, second, -side, only))
    return other


def _voice(rng: np.random.Generator) -> Voice:
    female = rng.random() < 0.5
    voices = ESPEAK_FEMALE if female else ESPEAK_MALE
    low = int(rng.integers(55, 59)) if female else int(rng.integers(45, 50))
    return Voice(
        espeak=str(voices[int(rng.integers(len(voices)))]),
        low=low,
        high=low + int(rng.integers(16, 20)),
        pitch=int(rng.integers(88, 100)),
        speed=int(rng.integers(110, 150)),
        gm_program=int(rng.choice([53, 54, 85])),
        harmony=bool(rng.random() < 0.4),
        backing=int(rng.choice([52, 53])) if rng.random() < 0.4 else None,
        pan=float(rng.uniform(-0.1, 0.1)),
        vibrato_hz=float(rng.uniform(4.8, 6.4)),
        vibrato_cents=float(rng.uniform(15, 45)),
        reverb_s=float(rng.uniform(0.6, 2.2)),
        reverb_db=float(rng.uniform(-16, -8)),
        echo=float(rng.uniform(0.15, 0.35)) if rng.random() < 0.3 else 0.0,
    )


def plan_song(index: int, config: SynthConfig) -> SongPlan:
    """The plan of track ``index``: tempo, key, form, chords, instruments, presence, mix. No audio."""
    if index < 0:
        raise ValueError(f"track index must be >= 0, got {index}")
    rng = np.random.default_rng([config.seed, index])
    extra = np.random.default_rng([config.seed, index, 20])  # choices classic does not make
    presence = _presence(index, config)
    if config.varied:
        bpm = round(float(rng.uniform(60, 180)), 1)
        key = int(rng.integers(12))
        mode = str(rng.choice(list(SCALES), p=[0.45, 0.35, 0.1, 0.1]))
        arrangement = str(extra.choice(list(ARRANGEMENTS), p=ARRANGEMENT_SHARE))
    else:
        bpm = round(float(rng.uniform(80, 150)), 1)
        key = int(rng.integers(12))
        mode = "minor" if rng.random() < 0.4 else "major"
        arrangement = "normal"
    activity_scale = ARRANGEMENTS[arrangement][0]
    drum_style = str(rng.choice(list(GROOVES)))
    swing = 0.67 if drum_style == "shuffle" else (float(rng.choice([0.0, 0.4])) if rng.random() < 0.15 else 0.0)
    bars_needed = math.ceil(config.seconds * bpm / 240.0)
    form = _sections(rng, bars_needed)
    sevenths, progs = _progressions(rng, BASE_MODE[mode])
    active = _active_stems(rng, form, presence, activity_scale)
    sections, bar = [], 0
    chords: list[Chord] = []
    for (name, bars), stems in zip(form, active):
        sections.append(Section(name, bar, bars, frozenset(stems)))
        prog = progs[name]
        chords += [_chord(mode, prog[j % len(prog)], sevenths) for j in range(bars)]
        bar += bars

    kit = int(rng.choice(KITS[drum_style]))
    bass_program = int(rng.integers(32, 40))
    bass_figure = str(rng.choice(list(BASS_FIGURES)[1:]))
    other = _accompaniment_instruments(rng)
    voice = _voice(rng)
    gains = {s: float(rng.uniform(-3.0, 3.0)) for s in STEMS}
    other, voice, gains, varied = _profile_choices(extra, index, config, arrangement, presence, other, voice, gains)
    pans = {"drums": 64 + int(rng.integers(-6, 7)), "bass": 64 + int(rng.integers(-4, 5))}
    sends = {"drums": int(rng.integers(15, 50)), "bass": int(rng.integers(0, 25)), "vocals": int(rng.integers(40, 80))}
    reverb = (round(float(rng.uniform(0.2, 0.8)), 3), round(float(rng.uniform(0.1, 0.6)), 3),
              round(float(rng.uniform(0.5, 1.0)), 3), round(float(rng.uniform(0.6, 0.9)), 3))
    return SongPlan(
        name=track_name(index), index=index, presence=presence, bpm=bpm, key=key, mode=mode, swing=swing,
        sections=tuple(sections), chords=tuple(chords), drum_style=drum_style, drum_kit=kit,
        bass_program=bass_program, bass_figure=bass_figure, other=tuple(other), voice=voice, gains_db=gains,
        pans=pans, sends=sends, reverb=reverb, **varied,
    )


def _profile_choices(extra: np.random.Generator, index: int, config: SynthConfig, arrangement: str,
                     presence: dict[str, bool], other: list[Instrument], voice: Voice, gains: dict[str, float],
                     ) -> tuple[list[Instrument], Voice, dict[str, float], dict[str, object]]:
    """What the profiles other than classic change of a drawn song: accompaniment, levels, voice, soundfonts,
    effects, automation (``extra`` is the ``[seed, index, 20]`` stream). Returns ``other``, ``voice``, ``gains``
    and the :class:`SongPlan` fields classic leaves at their defaults."""
    varied: dict[str, object] = {}
    if config.varied:
        if arrangement == "sparse":
            other = other[:1]
        elif arrangement == "dense":
            other += _extra_instruments(extra, other, 4 - len(other))
        gains = {s: float(extra.uniform(-6.0, 6.0)) for s in STEMS}
        varied = {"arrangement": arrangement, "melody_density": ARRANGEMENTS[arrangement][1],
                  "bass_shift": int(extra.choice([0, 0, 0, 12])), "other_shift": round(float(extra.uniform(-8, 10)), 2)}
    if config.voice_engines:
        voice = _engine_voice(extra, voice, config)
    elif config.varied:
        voice = _wide_register(extra, voice, voice.espeak.split("+")[-1].startswith("f"))
    if config.soundfonts:
        varied["soundfonts"] = _soundfonts(extra, config)
    if config.effects:
        varied["effects"] = plan_effects(np.random.default_rng([config.seed, index, 21]), config.effect_strength,
                                         presence)
    if config.automation:
        varied["automation"] = plan_automation(np.random.default_rng([config.seed, index, 22]), config.seconds, presence)
    return other, voice, gains, varied


def _extra_instruments(rng: np.random.Generator, have: list[Instrument], count: int) -> list[Instrument]:
    """Up to ``count`` more accompaniment instruments of families not yet playing (dense arrangements)."""
    used = {f for f, (programs, _) in FAMILIES.items() if any(i.program in programs for i in have)}
    free = [f for f in FAMILIES if f not in used]
    out = []
    for _ in range(min(count, len(free), int(rng.integers(1, 3)))):
        family = free.pop(int(rng.integers(len(free))))
        only = frozenset({"chorus", "bridge"}) if rng.random() < 0.4 else None
        out.append(_instrument(rng, family, 1 if rng.random() < 0.5 else -1, only))
    return out


def _wide_register(rng: np.random.Generator, voice: Voice, female: bool) -> Voice:
    """A melody range from a wider spread of registers than classic's."""
    low = int(rng.integers(52, 64)) if female else int(rng.integers(40, 52))
    return replace(voice, low=low, high=low + int(rng.integers(12, 23)))


def _engine_voice(rng: np.random.Generator, voice: Voice, config: SynthConfig) -> Voice:
    """The song's voice engine, speaker, register and style (sung, spoken, rapped) from ``config.voice_engines``."""
    engine = str(config.voice_engines[int(rng.integers(len(config.voice_engines)))])
    speakers = VOICES[engine]
    speaker = list(speakers)[int(rng.integers(len(speakers)))]
    female = bool(speakers[speaker]) if engine != "gm" else bool(rng.random() < 0.5)
    style = "sung"
    if engine != "gm" and rng.random() < config.spoken_share:
        style = "spoken" if rng.random() < 0.6 else "rapped"
    voice = _wide_register(rng, voice, female) if config.varied else voice
    if style != "sung":  # speech at a speaking rate and (espeak-ng) a speaking pitch; sung syllables are re-pitched
        voice = replace(voice, speed=int(rng.integers(125, 185)), pitch=int(rng.integers(30, 71)))
    return replace(voice, espeak=speaker if engine == "espeak" else voice.espeak, engine=engine, speaker=speaker,
                   female=female, style=style)


def _soundfonts(rng: np.random.Generator, config: SynthConfig) -> dict[str, str]:
    """Each stem's soundfont: the song's, or now and then (``stem_soundfont_share``) another one."""
    fonts = config.soundfonts
    song = str(fonts[int(rng.integers(len(fonts)))])
    out = {}
    for stem in STEMS:
        out[stem] = song
        if len(fonts) > 1 and rng.random() < config.stem_soundfont_share:
            others = [f for f in fonts if f != song]
            out[stem] = str(others[int(rng.integers(len(others)))])
    return {"song": song, **out}


def _instrument(rng: np.random.Generator, family: str, side: int, only: frozenset[str] | None) -> Instrument:
    programs, roles = FAMILIES[family]
    program = int(rng.choice(programs))
    role = str(rng.choice(roles))
    if program in (45, 46):  # pizzicato strings, harp
        role = "arp"
    if program == 28:  # palm-muted guitar
        role = "comp"
    return Instrument(program, role, 64 + side * int(rng.integers(12, 45)), only, int(rng.integers(25, 80)))
