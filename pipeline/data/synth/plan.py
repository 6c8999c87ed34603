"""The plan of one song: every random choice (tempo, key, form, chords, instruments, presence, mix) made from
``np.random.default_rng([seed, index])`` before any audio is rendered."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from demix.pipeline.data.synth.config import SynthConfig, track_name
from demix.pipeline.stems import STEMS

_GOLDEN = 0.6180339887498949

SCALES = {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 10)}
# chord progressions as scale degrees (0 = tonic), one chord per bar
_PROGRESSIONS = {
    "major": ((0, 4, 5, 3), (0, 5, 3, 4), (5, 3, 0, 4), (0, 3, 4, 3), (1, 4, 0, 0), (0, 3, 0, 4), (3, 4, 0, 5), (0, 2, 3, 4)),
    "minor": ((0, 5, 2, 6), (0, 3, 4, 0), (0, 6, 5, 6), (0, 5, 3, 4), (0, 3, 6, 2), (5, 6, 0, 0), (0, 4, 5, 6)),
}
# song form; a clip starts at the intro, the first verse or the first chorus and runs on from there
_FORM = (("intro", (2, 4)), ("verse", (8,)), ("chorus", (8,)), ("verse", (8,)), ("chorus", (8,)), ("bridge", (4, 8)),
         ("chorus", (8,)), ("chorus", (8,)))
_REPEAT_FORM = (("verse", (8,)), ("chorus", (8,)), ("bridge", (4, 8)), ("chorus", (8,)))
# chance that a stem plays in a section (a stem left out of the track never plays)
_ACTIVITY = {
    "intro": {"vocals": 0.0, "drums": 0.5, "bass": 0.5, "other": 1.0},
    "verse": {"vocals": 1.0, "drums": 0.85, "bass": 0.9, "other": 0.9},
    "chorus": {"vocals": 1.0, "drums": 1.0, "bass": 1.0, "other": 1.0},
    "bridge": {"vocals": 0.5, "drums": 0.5, "bass": 0.7, "other": 1.0},
    "outro": {"vocals": 0.3, "drums": 0.6, "bass": 0.7, "other": 1.0},
}

# GM drum notes: 36 kick, 37 side stick, 38 snare, 39 clap, 42/46 closed/open hat, 49 crash, 51 ride
GROOVES = {
    "rock": {36: (0, 8), 38: (4, 12), 42: (0, 2, 4, 6, 8, 10, 12, 14)},
    "pop": {36: (0, 6, 8), 38: (4, 12), 42: (0, 2, 4, 6, 8, 10, 12, 14)},
    "dance": {36: (0, 4, 8, 12), 39: (4, 12), 42: (0, 4, 8, 12), 46: (2, 6, 10, 14)},
    "half": {36: (0, 11), 38: (8,), 42: (0, 2, 4, 6, 8, 10, 12, 14)},
    "funk": {36: (0, 3, 10), 38: (4, 7, 9, 12, 15), 42: tuple(range(16))},
    "hiphop": {36: (0, 7, 10), 38: (4, 12, 13), 42: (0, 2, 4, 6, 8, 10, 12, 14)},
    "shuffle": {36: (0, 8, 10), 38: (4, 12), 42: (0, 2, 4, 6, 8, 10, 12, 14)},
}
_KITS = {"rock": (0, 8, 16), "pop": (0, 8), "dance": (24, 25), "half": (0, 8, 16), "funk": (0, 8, 32),
         "hiphop": (25, 24), "shuffle": (32, 40, 0)}

# bass figures per bar: (step, length in steps, what) with R root, O octave, 5 fifth, A approach to the next root
BASS_FIGURES = {
    "whole": ((0, 16, "R"),),
    "half": ((0, 8, "R"), (8, 8, "5")),
    "quarter": ((0, 4, "R"), (4, 4, "R"), (8, 4, "5"), (12, 4, "R")),
    "eighth": tuple((s, 2, "O" if s in (6, 14) else "R") for s in range(0, 16, 2)),
    "octave": tuple((s, 2, "R" if s % 4 == 0 else "O") for s in range(0, 16, 2)),
    "sync": ((0, 3, "R"), (3, 3, "R"), (6, 2, "5"), (8, 3, "R"), (11, 3, "O"), (14, 2, "A")),
    "funk": ((0, 2, "R"), (3, 1, "O"), (4, 2, "R"), (7, 1, "5"), (10, 2, "R"), (12, 1, "O"), (14, 2, "A")),
}

# accompaniment ("other"): GM programs (0-based) by family, with the parts each family plays
_FAMILIES = {
    "keys": ((0, 1, 2, 4, 5, 7, 11), ("comp", "arp", "pad", "comp")),
    "guitar": ((24, 25, 26, 27, 28, 29, 30), ("strum", "strum", "arp", "comp")),
    "strings": ((48, 49, 50, 44, 45, 46), ("pad",)),
    "pad": ((88, 89, 90, 92, 94, 95), ("pad",)),
    "brass": ((61, 62, 63, 56, 60), ("stab", "pad")),
    "organ": ((16, 17, 18, 19), ("pad", "comp")),
}
_FAMILY_SHARE = (0.3, 0.3, 0.12, 0.1, 0.08, 0.1)  # keys and guitars most often, as in pop and rock
_LEADS = (80, 81, 29, 30, 65, 66, 73, 56, 11, 22)  # square, saw, overdrive, distortion, saxes, flute, trumpet, vibes, harmonica
_MALE_VOICES = ("en+m1", "en+m2", "en+m3", "en+m4", "en+m7", "en-us+m3")
_FEMALE_VOICES = ("en+f1", "en+f2", "en+f3", "en+f4", "en+f5", "en-us+f2")


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
    form = [(name, int(rng.choice(lengths))) for name, lengths in _FORM]
    form = form[int(rng.choice([0, 1, 2], p=[0.6, 0.25, 0.15])):]
    while sum(b for _, b in form) < bars_needed:
        form += [(name, int(rng.choice(lengths))) for name, lengths in _REPEAT_FORM]
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
    progs = {name: _PROGRESSIONS[mode][int(rng.integers(len(_PROGRESSIONS[mode])))] for name in ("verse", "chorus", "bridge")}
    if rng.random() < 0.4:
        progs["chorus"] = progs["verse"]
    progs["intro"] = progs["verse"] if rng.random() < 0.5 else progs["chorus"]
    progs["outro"] = progs["chorus"]
    return sevenths, progs


def _active_stems(rng: np.random.Generator, form: list[tuple[str, int]], presence: dict[str, bool]) -> list[set[str]]:
    """Which stems play in which section: sections with stems dropping out give realistic active segments."""
    active = []
    for name, _ in form:
        active.append({s for s in STEMS if presence[s] and rng.random() < _ACTIVITY[name][s]})
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
    families = list(_FAMILIES)
    first = str(rng.choice(families, p=_FAMILY_SHARE))
    side = 1 if rng.random() < 0.5 else -1
    other = [_instrument(rng, first, side, None)]
    if rng.random() < 0.6:
        if rng.random() < 0.4:
            program = int(rng.choice(_LEADS))
            other.append(Instrument(program, "riff", 64 - side * int(rng.integers(10, 40)), None, int(rng.integers(30, 70))))
        else:
            second = [f for f in families if f != first][int(rng.integers(len(families) - 1))]
            only = frozenset({"chorus", "bridge"}) if rng.random() < 0.5 else None
            other.append(_instrument(rng, second, -side, only))
    return other


def _voice(rng: np.random.Generator) -> Voice:
    female = rng.random() < 0.5
    voices = _FEMALE_VOICES if female else _MALE_VOICES
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
    presence = _presence(index, config)
    bpm = round(float(rng.uniform(80, 150)), 1)
    key = int(rng.integers(12))
    mode = "minor" if rng.random() < 0.4 else "major"
    drum_style = str(rng.choice(list(GROOVES)))
    swing = 0.67 if drum_style == "shuffle" else (float(rng.choice([0.0, 0.4])) if rng.random() < 0.15 else 0.0)
    bars_needed = math.ceil(config.seconds * bpm / 240.0)
    form = _sections(rng, bars_needed)
    sevenths, progs = _progressions(rng, mode)
    active = _active_stems(rng, form, presence)
    sections, bar = [], 0
    chords: list[Chord] = []
    for (name, bars), stems in zip(form, active):
        sections.append(Section(name, bar, bars, frozenset(stems)))
        prog = progs[name]
        chords += [_chord(mode, prog[j % len(prog)], sevenths) for j in range(bars)]
        bar += bars

    kit = int(rng.choice(_KITS[drum_style]))
    bass_program = int(rng.integers(32, 40))
    bass_figure = str(rng.choice(list(BASS_FIGURES)[1:]))
    other = _accompaniment_instruments(rng)
    voice = _voice(rng)
    gains = {s: float(rng.uniform(-3.0, 3.0)) for s in STEMS}
    pans = {"drums": 64 + int(rng.integers(-6, 7)), "bass": 64 + int(rng.integers(-4, 5))}
    sends = {"drums": int(rng.integers(15, 50)), "bass": int(rng.integers(0, 25)), "vocals": int(rng.integers(40, 80))}
    reverb = (round(float(rng.uniform(0.2, 0.8)), 3), round(float(rng.uniform(0.1, 0.6)), 3),
              round(float(rng.uniform(0.5, 1.0)), 3), round(float(rng.uniform(0.6, 0.9)), 3))
    return SongPlan(
        name=track_name(index), index=index, presence=presence, bpm=bpm, key=key, mode=mode, swing=swing,
        sections=tuple(sections), chords=tuple(chords), drum_style=drum_style, drum_kit=kit,
        bass_program=bass_program, bass_figure=bass_figure, other=tuple(other), voice=voice, gains_db=gains,
        pans=pans, sends=sends, reverb=reverb,
    )


def _instrument(rng: np.random.Generator, family: str, side: int, only: frozenset[str] | None) -> Instrument:
    programs, roles = _FAMILIES[family]
    program = int(rng.choice(programs))
    role = str(rng.choice(roles))
    if program in (45, 46):  # pizzicato strings, harp
        role = "arp"
    if program == 28:  # palm-muted guitar
        role = "comp"
    return Instrument(program, role, 64 + side * int(rng.integers(12, 45)), only, int(rng.integers(25, 80)))
