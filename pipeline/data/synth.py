"""Generated audio for demos, tests, benchmarks and training data.

Two generators:

* :func:`toy_song` builds a short four-stem piece from plain oscillators and noise (no soundfont needed): a
  vibrato lead with harmonics (vocals), kick/snare/hat hits (drums), a low sawtooth line (bass) and sustained
  chords (other). Deterministic per seed; the mixture is the exact sum of the stems.
* :func:`synth_dataset` writes Slakh-style multitrack songs in MUSDB layout,
  ``OUT/<track>/{mixture,vocals,drums,bass,other}.wav`` plus ``OUT/truth.json`` (which stems each track has).
  Each song is planned from ``np.random.default_rng([seed, index])`` (:func:`plan_song`), composed as MIDI
  (drums, bass, one or two accompaniment instruments, a sung melody), rendered by the ``fluidsynth`` command
  with a General MIDI soundfont, its lead vocal sung by ``espeak-ng`` syllables moved onto the melody with
  TD-PSOLA (pitch, vibrato and vowel length change; formants and consonants stay), then mixed: per-stem level,
  pan, reverb. :func:`render_song` returns one song's audio without writing it.

Audio arrays are ``(channels, time)`` float32 throughout; note times are seconds from the start of the clip.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
from scipy.fft import next_fast_len

from demix.pipeline.io import write_float_wav

STEMS = ("vocals", "drums", "bass", "other")


def _env(n: int, sr: int, attack: float, decay: float) -> np.ndarray:
    t = np.arange(n) / sr
    return np.minimum(t / max(attack, 1e-4), 1.0) * np.exp(-t / decay)


def toy_song(seconds: float = 8.0, sample_rate: int = 44100, seed: int = 0) -> dict[str, np.ndarray]:
    """Four stereo stems ``{stem: (2, time)}`` float32 plus ``"mixture"`` (their sum, peak <= 0.9)."""
    rng = np.random.default_rng(seed)
    n = int(seconds * sample_rate)
    bpm = rng.uniform(90, 130)
    beat = 60.0 / bpm
    root = 110.0 * 2 ** (rng.integers(0, 12) / 12)
    stems = {s: np.zeros(n) for s in STEMS}

    # drums: kick on beats 1 and 3, snare on 2 and 4, hats on eighths
    for k, start in enumerate(np.arange(0, seconds, beat / 2)):
        i = int(start * sample_rate)
        if i >= n:
            break
        m = min(n - i, int(0.4 * sample_rate))
        tt = np.arange(m) / sample_rate
        if k % 4 == 0:
            stems["drums"][i : i + m] += 0.8 * np.sin(2 * np.pi * (50 + 80 * np.exp(-tt * 30)) * tt) * _env(m, sample_rate, 0.002, 0.12)
        elif k % 4 == 2:
            stems["drums"][i : i + m] += 0.35 * rng.standard_normal(m) * _env(m, sample_rate, 0.001, 0.08)
        stems["drums"][i : i + m] += 0.08 * rng.standard_normal(m) * _env(m, sample_rate, 0.001, 0.02)

    # bass and chords follow a four-chord progression, one chord per bar
    progression = rng.choice([0, 3, 5, 7, 8, 10], size=4)
    bar = 4 * beat
    for j, start in enumerate(np.arange(0, seconds, bar)):
        i, m = int(start * sample_rate), min(n - int(start * sample_rate), int(bar * sample_rate))
        tt = np.arange(m) / sample_rate
        f = root * 2 ** (progression[j % 4] / 12) / 2
        saw = 2 * ((f * tt) % 1.0) - 1
        stems["bass"][i : i + m] += 0.3 * np.convolve(saw, np.ones(8) / 8, mode="same") * _env(m, sample_rate, 0.01, bar)
        for interval in (0, 4, 7):
            fc = 2 * f * 2 ** (interval / 12) * 2
            stems["other"][i : i + m] += 0.07 * (np.sin(2 * np.pi * fc * tt) + 0.3 * np.sin(4 * np.pi * fc * tt)) * _env(m, sample_rate, 0.05, 2 * bar)

    # vocals: phrases of notes with vibrato and a few harmonics, silent between phrases
    note = beat
    for k, start in enumerate(np.arange(0, seconds, note)):
        if (k // 8) % 2 == 1 and rng.random() < 0.7:
            continue
        i, m = int(start * sample_rate), min(n - int(start * sample_rate), int(note * sample_rate))
        tt = np.arange(m) / sample_rate
        f = 2 * root * 2 ** (rng.choice([0, 2, 4, 5, 7, 9, 12]) / 12)
        phase = 2 * np.pi * f * tt + 0.4 * np.sin(2 * np.pi * 5.5 * tt)
        voice = sum(a * np.sin(h * phase) for h, a in ((1, 1.0), (2, 0.5), (3, 0.25), (4, 0.12)))
        stems["vocals"][i : i + m] += 0.15 * voice * _env(m, sample_rate, 0.03, note)

    pans = {"vocals": 0.0, "drums": rng.uniform(-0.2, 0.2), "bass": 0.0, "other": rng.uniform(-0.6, 0.6)}
    out = {}
    for s in STEMS:
        left, right = np.sqrt(0.5 * (1 - pans[s])), np.sqrt(0.5 * (1 + pans[s]))
        out[s] = np.stack([left * stems[s], right * stems[s]]).astype(np.float32)
    mix = sum(out[s].astype(np.float64) for s in STEMS)
    gain = min(1.0, 0.9 / max(np.abs(mix).max(), 1e-9))
    out = {s: (v * gain).astype(np.float32) for s, v in out.items()}
    out["mixture"] = sum(out[s] for s in STEMS)
    return out


def write_demo_inputs(folder: str | Path, seed: int = 0) -> list[Path]:
    """A few mixtures in the formats and names users throw at demix; returns their paths."""
    import soundfile as sf

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = [
        ("Café del Mar (live) 'take 2'.wav", 44100, 2, "PCM_16", 8.0),
        ("mono demo.flac", 22050, 1, "PCM_24", 6.0),
        ("kompressed.mp3", 44100, 2, None, 6.0),
    ]
    paths = []
    for k, (name, sr, ch, subtype, secs) in enumerate(files):
        mix = toy_song(secs, sr, seed + k)["mixture"]
        data = mix.mean(0) if ch == 1 else mix.T
        path = folder / name
        sf.write(path, data, sr, subtype=subtype) if subtype else sf.write(path, data, sr, format="MP3")
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------------------------
# Synthetic multitrack songs (FluidSynth + General MIDI soundfont, espeak-ng vocals) in MUSDB layout
# ---------------------------------------------------------------------------------------------------------------

SYNTH_VERSION = 1  # bump when the same settings would give other audio; recorded in OUT/synth_config.json
SOUNDFONT_ENV = "DEMIX_SOUNDFONT"
SOUNDFONT_PATHS = (
    "/usr/share/sounds/sf2/FluidR3_GM.sf2",  # Debian/Ubuntu: fluid-soundfont-gm
    "/usr/share/soundfonts/FluidR3_GM.sf2",  # Arch, Fedora
)
VOCAL_ENGINES = ("auto", "espeak", "gm")
TRUTH_FILE = "truth.json"
CONFIG_FILE = "synth_config.json"

_TAIL_S = 4  # silence between stems rendered one after another in one fluidsynth run (release + reverb tails)
_GOLDEN = 0.6180339887498949


class SynthError(RuntimeError):
    """A tool, soundfont or output folder that synthesis needs is missing or unusable; the message says which."""


@dataclass(frozen=True)
class SynthConfig:
    """Settings of a synthetic dataset. Track ``i`` depends only on ``(seed, i)`` and the other fields, so a
    dataset with more tracks is a superset of one with fewer.

    Attributes:
        tracks: number of songs, named ``synth-0000``, ``synth-0001``, ...
        seconds: length of every song (at least 2 s); every file has ``round(seconds * sample_rate)`` frames.
        seed: dataset seed.
        sample_rate: of every file written (8000-96000 Hz).
        absent_share: share of tracks with one to three stems left out on purpose (written as all-zero files);
            vocals are left out most often (instrumentals), never all four stems.
        soundfont: a General MIDI ``.sf2``; ``None`` takes ``$DEMIX_SOUNDFONT`` or FluidR3_GM.sf2 from the
            Debian package ``fluid-soundfont-gm``.
        vocals: ``"espeak"`` sings the lead with espeak-ng syllables (consonants, formants), ``"gm"`` plays it
            on General MIDI voice programs, ``"auto"`` takes espeak when ``espeak-ng`` is installed.
    """

    tracks: int = 10
    seconds: float = 30.0
    seed: int = 0
    sample_rate: int = 44100
    absent_share: float = 0.25
    soundfont: str | None = None
    vocals: str = "auto"

    def __post_init__(self) -> None:
        if self.tracks < 0:
            raise ValueError(f"SynthConfig.tracks must be >= 0, got {self.tracks}")
        if not 2.0 <= self.seconds <= 3600.0:
            raise ValueError(f"SynthConfig.seconds must be within [2, 3600], got {self.seconds}")
        if not 8000 <= self.sample_rate <= 96000:
            raise ValueError(f"SynthConfig.sample_rate must be within [8000, 96000] Hz, got {self.sample_rate}")
        if not 0.0 <= self.absent_share <= 1.0:
            raise ValueError(f"SynthConfig.absent_share must be within [0, 1], got {self.absent_share}")
        if self.vocals not in VOCAL_ENGINES:
            raise ValueError(f"SynthConfig.vocals must be one of {VOCAL_ENGINES}, got {self.vocals!r}")
        if self.seed < 0:
            raise ValueError(f"SynthConfig.seed must be >= 0, got {self.seed}")

    @property
    def frames(self) -> int:
        return int(round(self.seconds * self.sample_rate))


def track_name(index: int) -> str:
    return f"synth-{index:04d}"


def find_soundfont(path: str | Path | None = None) -> Path:
    """The soundfont to use: ``path``, else ``$DEMIX_SOUNDFONT``, else the Debian FluidR3_GM.sf2."""
    if path is not None or os.environ.get(SOUNDFONT_ENV):
        given = Path(path if path is not None else os.environ[SOUNDFONT_ENV]).expanduser()
        if not given.is_file():
            origin = "SynthConfig.soundfont" if path is not None else f"${SOUNDFONT_ENV}"
            raise SynthError(f"soundfont {str(given)!r} (from {origin}) is not a file")
        return given
    for candidate in SOUNDFONT_PATHS:
        if Path(candidate).is_file():
            return Path(candidate)
    raise SynthError(
        f"no General MIDI soundfont found (looked in {', '.join(SOUNDFONT_PATHS)}); install the Debian package "
        f"'fluid-soundfont-gm' (apt-get install fluid-soundfont-gm) or set ${SOUNDFONT_ENV} to an .sf2 file"
    )


def _tool(name: str, package: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise SynthError(f"{name!r} not found on PATH; install the Debian package {package!r} (apt-get install {package})")
    return found


def vocal_engine(config: SynthConfig) -> str:
    """``"espeak"`` or ``"gm"``: how this config's lead vocals are made on this machine."""
    if config.vocals == "espeak":
        _tool("espeak-ng", "espeak-ng")
        return "espeak"
    if config.vocals == "gm":
        return "gm"
    return "espeak" if shutil.which("espeak-ng") else "gm"


# --- music ------------------------------------------------------------------------------------------------------

_SCALES = {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 10)}
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
_GROOVES = {
    "rock": {36: (0, 8), 38: (4, 12), 42: (0, 2, 4, 6, 8, 10, 12, 14)},
    "pop": {36: (0, 6, 8), 38: (4, 12), 42: (0, 2, 4, 6, 8, 10, 12, 14)},
    "dance": {36: (0, 4, 8, 12), 39: (4, 12), 42: (0, 4, 8, 12), 46: (2, 6, 10, 14)},
    "half": {36: (0, 11), 38: (8,), 42: (0, 2, 4, 6, 8, 10, 12, 14)},
    "funk": {36: (0, 3, 10), 38: (4, 7, 9, 12, 15), 42: tuple(range(16))},
    "hiphop": {36: (0, 7, 10), 38: (4, 12, 13), 42: (0, 2, 4, 6, 8, 10, 12, 14)},
    "shuffle": {36: (0, 8, 10), 38: (4, 12), 42: (0, 2, 4, 6, 8, 10, 12, 14)},
}
_GHOSTS = {"funk": (7, 9, 15), "hiphop": (13,)}
_KITS = {"rock": (0, 8, 16), "pop": (0, 8), "dance": (24, 25), "half": (0, 8, 16), "funk": (0, 8, 32),
         "hiphop": (25, 24), "shuffle": (32, 40, 0)}
_TOMS = (50, 48, 47, 45, 43, 41)

# bass figures per bar: (step, length in steps, what) with R root, O octave, 5 fifth, A approach to the next root
_BASS_FIGURES = {
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
_COMP_RHYTHMS = ((0, 4, 8, 12), (0, 6, 8, 14), (2, 6, 10, 14), (0, 3, 6, 8, 11, 14), (0, 8), (0, 3, 6, 10, 12))
_STRUM_RHYTHMS = ((0, 2, 4, 6, 8, 10, 12, 14), (0, 3, 6, 8, 10, 12, 14), (0, 4, 6, 10, 12, 14), (0, 6, 8, 14))

# sung melody rhythms: (step, length) in a phrase's first bar (A) and second bar (B)
_RHYTHM_A = (((0, 4), (4, 4), (8, 4), (12, 4)), ((0, 2), (2, 2), (4, 4), (8, 2), (10, 2), (12, 4)),
             ((2, 2), (4, 2), (6, 2), (8, 6)), ((0, 6), (6, 2), (8, 8)), ((0, 3), (3, 3), (6, 2), (8, 4)),
             ((2, 2), (4, 2), (6, 2), (8, 2), (10, 6)), ((0, 2), (2, 2), (4, 2), (6, 2), (8, 2), (10, 2), (12, 4)))
_RHYTHM_B = (((0, 2), (2, 2), (4, 8)), ((0, 8),), ((0, 4), (4, 6)), ((0, 2), (2, 2), (4, 2), (6, 6)), ((0, 3), (3, 5)))
_WORDS = ("love", "night", "heart", "fire", "light", "home", "day", "way", "time", "dream", "run", "stay", "fall",
          "feel", "go", "know", "you", "me", "my", "so", "hold", "sky", "rain", "sun", "burn", "shine", "wild", "free",
          "gold", "high", "slow", "down", "call", "name", "say", "true", "blue", "fly", "cry", "now", "here", "mine",
          "sweet", "dance", "lie", "moon", "town", "road", "door", "need")
_HOOKS = ("oh", "yeah", "la", "na", "ah")
_MALE_VOICES = ("en+m1", "en+m2", "en+m3", "en+m4", "en+m7", "en-us+m3")
_FEMALE_VOICES = ("en+f1", "en+f2", "en+f3", "en+f4", "en+f5", "en-us+f2")
# level of each present stem before the mix is scaled down: RMS over its active parts, dBFS
_STEM_LEVEL_DB = {"vocals": -17.0, "drums": -16.0, "bass": -18.0, "other": -18.0}


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
    scale = _SCALES[mode]
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


def plan_song(index: int, config: SynthConfig) -> SongPlan:
    """The plan of track ``index``: tempo, key, form, chords, instruments, presence, mix. No audio."""
    if index < 0:
        raise ValueError(f"track index must be >= 0, got {index}")
    rng = np.random.default_rng([config.seed, index])
    presence = _presence(index, config)
    bpm = round(float(rng.uniform(80, 150)), 1)
    key = int(rng.integers(12))
    mode = "minor" if rng.random() < 0.4 else "major"
    drum_style = str(rng.choice(list(_GROOVES)))
    swing = 0.67 if drum_style == "shuffle" else (float(rng.choice([0.0, 0.4])) if rng.random() < 0.15 else 0.0)
    bars_needed = math.ceil(config.seconds * bpm / 240.0)
    form = _sections(rng, bars_needed)

    sevenths = rng.random() < 0.25
    progs = {name: _PROGRESSIONS[mode][int(rng.integers(len(_PROGRESSIONS[mode])))] for name in ("verse", "chorus", "bridge")}
    if rng.random() < 0.4:
        progs["chorus"] = progs["verse"]
    progs["intro"] = progs["verse"] if rng.random() < 0.5 else progs["chorus"]
    progs["outro"] = progs["chorus"]

    # which stems play in which section: sections with stems dropping out give realistic active segments
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
    sections, bar = [], 0
    chords: list[Chord] = []
    for (name, bars), stems in zip(form, active):
        sections.append(Section(name, bar, bars, frozenset(stems)))
        prog = progs[name]
        chords += [_chord(mode, prog[j % len(prog)], sevenths) for j in range(bars)]
        bar += bars

    kit = int(rng.choice(_KITS[drum_style]))
    bass_program = int(rng.integers(32, 40))
    bass_figure = str(rng.choice(list(_BASS_FIGURES)[1:]))

    # accompaniment: one instrument, often a second one on the other side
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

    female = rng.random() < 0.5
    voices = _FEMALE_VOICES if female else _MALE_VOICES
    low = int(rng.integers(55, 59)) if female else int(rng.integers(45, 50))
    voice = Voice(
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


# --- composition --------------------------------------------------------------------------------------------------


def _vel(value: float) -> int:
    return int(np.clip(round(value), 1, 127))


def _scale_step(pitch: int, steps: int, key: int, scale: Sequence[int]) -> int:
    """The MIDI note ``steps`` scale tones above (below, when negative) ``pitch``."""
    direction = 1 if steps > 0 else -1
    for _ in range(abs(steps)):
        pitch += direction
        while (pitch - key) % 12 not in scale:
            pitch += direction
    return pitch


def _section_bars(plan: SongPlan, stem: str):
    """(section, bar from clip start, bar inside section) for every bar where ``stem`` plays."""
    for section in plan.sections:
        if stem in section.active:
            for j in range(section.bars):
                yield section, section.start_bar + j, j


def _drums(plan: SongPlan, rng: np.random.Generator) -> list[Note]:
    notes: list[Note] = []
    groove = _GROOVES[plan.drum_style]
    chorus_cymbal = 51 if rng.random() < 0.4 else 46
    previous = None
    for section, bar, j in _section_bars(plan, "drums"):
        hits: dict[int, list[tuple[int, float]]] = {}
        for drum, steps in groove.items():
            for step in steps:
                if drum == 38 and step in _GHOSTS.get(plan.drum_style, ()):
                    vel = 35.0
                elif drum in (36, 38, 39):
                    vel = 108.0 if drum == 36 else 100.0
                else:
                    vel = 85.0 if step % 4 == 0 else (68.0 if step % 2 == 0 else 52.0)
                hits.setdefault(drum, []).append((step, vel))
        if section.name in ("intro", "outro"):
            hits[36] = [(0, 105.0)] + ([(8, 100.0)] if plan.drum_style != "half" else [])
            if rng.random() < 0.5 and 38 in hits:
                hits[37] = [(s, v * 0.9) for s, v in hits.pop(38) if v > 40]
        elif section.name == "bridge" and rng.random() < 0.5:
            hits = {36: [(0, 105.0)], 38: [(8, 100.0)], 51: [(s, 70.0) for s in range(0, 16, 4)]}
        elif section.name == "chorus":
            cymbal = hits.pop(42, [])
            if chorus_cymbal == 51:
                hits[51] = [(s, v) for s, v in cymbal if s % 2 == 0]
            else:
                hits[42] = [(s, v) for s, v in cymbal if s % 4 == 0]
                hits[46] = hits.get(46, []) + [(s, 70.0) for s in (2, 6, 10, 14)]
        if rng.random() < 0.15:  # an extra kick now and then
            hits[36] = hits.get(36, []) + [(int(rng.choice([6, 10, 14])), 90.0)]
        if j == 0 and (section.name in ("chorus", "bridge") or previous != section.name):
            hits[49] = [(0, 105.0)]
        if j == section.bars - 1 and section.bars >= 4 and rng.random() < 0.7:  # fill into the next section
            first = 12 if rng.random() < 0.6 else 8
            for drum in hits:
                hits[drum] = [(s, v) for s, v in hits[drum] if s < first or drum == 36 and s == first]
            toms = rng.random() < 0.6
            for k, step in enumerate(range(first, 16)):
                drum = _TOMS[min(k * len(_TOMS) // (16 - first), len(_TOMS) - 1)] if toms else 38
                hits.setdefault(drum, []).append((step, 80.0 + 30.0 * k / (16 - first)))
        previous = section.name
        for drum, steps in hits.items():
            length = 1.5 if drum in (46, 49, 51) else 0.25
            for step, vel in steps:
                start = max(0.0, plan.time(bar, step) + float(rng.normal(0, 0.004)))
                notes.append(Note(start, length, drum, _vel(vel + rng.normal(0, 6))))
    return notes


def _bass(plan: SongPlan, rng: np.random.Generator) -> list[Note]:
    notes: list[Note] = []
    scale = _SCALES[plan.mode]
    short = plan.bass_program in (36, 37)  # slap basses
    for section, bar, j in _section_bars(plan, "bass"):
        figure = plan.bass_figure
        if section.name in ("intro", "outro"):
            figure = "whole" if rng.random() < 0.5 else "half"
        chord = plan.chords[bar]
        nxt = plan.chords[bar + 1] if bar + 1 < len(plan.chords) else chord
        root = 28 + (plan.key + chord.root - 28) % 12  # E1..D#2
        next_root = 28 + (plan.key + nxt.root - 28) % 12
        for step, length, what in _BASS_FIGURES[figure]:
            if what == "R":
                pitch = root
            elif what == "O":
                pitch = root + 12
            elif what == "5":
                pitch = root + chord.tones[2] - chord.tones[0]
            else:  # approach the next root from a semitone below or a scale step either side
                r = rng.random()
                pitch = next_root - 1 if r < 0.4 else _scale_step(next_root, -1 if r < 0.8 else 1, plan.key, scale)
            legato = 0.5 if short else float(rng.uniform(0.75, 0.95))
            start = plan.time(bar, step) + float(rng.normal(0, 0.003))
            dur = length * plan.bar_s / 16 * legato
            accent = 10 if step % 4 == 0 else 0
            notes.append(Note(max(0.0, start), dur, int(pitch), _vel(rng.normal(88 + accent, 6))))
    return notes


def _voicing(key: int, chord: Chord, center: float, size: int, previous: float | None) -> list[int]:
    """Chord tones around ``center``, choosing the inversion nearest the previous voicing (voice leading)."""
    pcs = [(key + t) % 12 for t in chord.tones]
    target = center if previous is None else 0.5 * (center + previous)
    best: list[int] = []
    for inv in range(len(pcs)):
        order = pcs[inv:] + pcs[:inv]
        low = int(center) - 7
        notes = [low + (order[0] - low) % 12]
        for pc in order[1:]:
            notes.append(notes[-1] + ((pc - notes[-1]) % 12 or 12))
        while len(notes) < size:
            notes.append(notes[len(notes) - len(pcs)] + 12)
        notes = notes[:max(size, 1)]
        if not best or abs(np.mean(notes) - target) < abs(np.mean(best) - target):
            best = notes
    return best


def _accompaniment(plan: SongPlan, inst: Instrument, rng: np.random.Generator, melody_sections: set[str]) -> list[Note]:
    notes: list[Note] = []
    comp = _COMP_RHYTHMS[int(rng.integers(len(_COMP_RHYTHMS)))]
    strum = _STRUM_RHYTHMS[int(rng.integers(len(_STRUM_RHYTHMS)))]
    center = float(rng.uniform(58, 66))
    arp_rate = 1 if plan.bpm < 112 and rng.random() < 0.5 else 2
    arp_order = str(rng.choice(["up", "updown", "random"]))
    power = inst.program in (29, 30) and rng.random() < 0.7
    step_s = plan.bar_s / 16
    previous: float | None = None
    riff_tunes: dict[str, list] = {}
    for section, bar, j in _section_bars(plan, "other"):
        if inst.sections is not None and section.name not in inst.sections:
            continue
        dyn = {"chorus": 8, "intro": -8, "outro": -8}.get(section.name, 0)
        chord = plan.chords[bar]
        if inst.role == "riff":
            if section.name in melody_sections:
                continue
            if section.name not in riff_tunes:
                riff_tunes[section.name] = _tune(plan, rng, section, 64, 81, density=0.8)
            for b, step, length, pitch, _ in riff_tunes[section.name]:
                if b == j:
                    notes.append(Note(plan.time(bar, step), length * step_s * 0.9, pitch, _vel(rng.normal(90 + dyn, 6))))
            continue
        voicing = _voicing(plan.key, chord, center, 4 if inst.role in ("pad", "comp") else 3, previous)
        previous = float(np.mean(voicing))
        if inst.role == "pad":
            same = j > 0 and plan.chords[bar - 1] == chord
            if not same:
                length = 1
                while j + length < section.bars and plan.chords[bar + length] == chord:
                    length += 1
                start = plan.time(bar, 0)
                for p in voicing:
                    notes.append(Note(start, length * plan.bar_s * 0.98, p, _vel(rng.normal(72 + dyn, 5))))
        elif inst.role in ("comp", "stab"):
            for k, step in enumerate(comp):
                nxt = comp[k + 1] if k + 1 < len(comp) else 16
                dur = (nxt - step) * step_s * (0.35 if inst.role == "stab" else 0.85)
                vel = rng.normal((100 if inst.role == "stab" else 80) + dyn + (6 if step % 4 == 0 else 0), 5)
                for p in voicing:
                    notes.append(Note(plan.time(bar, step) + float(rng.normal(0, 0.003)), dur, p, _vel(vel)))
        elif inst.role == "strum":
            low = 40 + (plan.key + chord.root - 40) % 12
            third = chord.tones[1] - chord.tones[0]
            shape = [low, low + 7, low + 12] if power else [low, low + 7, low + 12, low + 12 + third, low + 19]
            for k, step in enumerate(strum):
                nxt = strum[k + 1] if k + 1 < len(strum) else 16
                down = step % 4 == 0 or k == 0
                order = shape if down else shape[::-1]
                vel = rng.normal(88 + dyn + (8 if down else -6), 5)
                for s, p in enumerate(order):
                    notes.append(Note(plan.time(bar, step) + s * 0.012, (nxt - step) * step_s * 0.9, p, _vel(vel - 3 * s)))
        else:  # arp
            tones = voicing + [voicing[0] + 12, voicing[1] + 12]
            if arp_order == "updown":
                tones = tones + tones[-2:0:-1]
            for k, step in enumerate(range(0, 16, arp_rate)):
                p = tones[int(rng.integers(len(tones)))] if arp_order == "random" else tones[k % len(tones)]
                notes.append(Note(plan.time(bar, step), arp_rate * step_s * 1.6, p, _vel(rng.normal(74 + dyn, 6))))
    return notes


def _tune(plan: SongPlan, rng: np.random.Generator, section: Section, low: int, high: int,
          density: float) -> list[tuple[int, int, int, int, str]]:
    """A melody for one section: ``(bar in section, step, length in steps, MIDI pitch, word)`` per note."""
    scale = _SCALES[plan.mode]
    ladder = [p for p in range(low, high + 1) if (p - plan.key) % 12 in scale]
    idx = int(len(ladder) * (0.55 if section.name == "chorus" else 0.35)) + int(rng.integers(-1, 2))
    vocabulary = [str(w) for w in rng.choice(_WORDS, size=10, replace=False)]
    hook = str(rng.choice(_HOOKS))
    out = []
    bars = 8 if section.name in ("verse", "chorus") else section.bars
    for phrase in range(math.ceil(bars / 2)):
        if phrase > 0 and rng.random() > density:
            continue
        rhythm = [(0, s, n) for s, n in _RHYTHM_A[int(rng.integers(len(_RHYTHM_A)))]]
        rhythm += [(1, s, n) for s, n in _RHYTHM_B[int(rng.integers(len(_RHYTHM_B)))]]
        for k, (half, step, length) in enumerate(rhythm):
            bar = 2 * phrase + half
            if bar >= bars:
                break
            idx = int(np.clip(idx + rng.choice([-2, -1, 0, 1, 2, 3, -3], p=[0.15, 0.3, 0.1, 0.3, 0.1, 0.025, 0.025]),
                              0, len(ladder) - 1))
            chord = plan.chords[min(section.start_bar + bar, len(plan.chords) - 1)]
            if step in (0, 8) or k == len(rhythm) - 1:  # strong beats and phrase ends land on chord tones
                pcs = {(plan.key + t) % 12 for t in chord.tones}
                tones = [i for i, p in enumerate(ladder) if p % 12 in pcs]
                idx = min(tones, key=lambda i: abs(i - idx))
            word = hook if section.name == "chorus" and k == 0 else vocabulary[int(rng.integers(len(vocabulary)))]
            out.append((bar, step, length, ladder[idx], word))
    return out


def _melody(plan: SongPlan, rng: np.random.Generator) -> list[Sung]:
    notes: list[Sung] = []
    tunes: dict[str, list] = {}
    density = {"verse": 0.8, "chorus": 1.0, "bridge": 0.7, "outro": 0.5, "intro": 0.5}
    step_s = plan.bar_s / 16
    for section in plan.sections:
        if "vocals" not in section.active:
            continue
        if section.name not in tunes:
            tunes[section.name] = _tune(plan, rng, section, plan.voice.low, plan.voice.high, density[section.name])
        for bar, step, length, pitch, word in tunes[section.name]:
            if bar >= section.bars:
                continue
            start = plan.time(section.start_bar + bar, step) + float(rng.normal(0, 0.008))
            vel = _vel(rng.normal(96 if section.name == "chorus" else 88, 6))
            notes.append(Sung(max(0.0, start), length * step_s * 0.92, pitch, vel, word))
    return notes


def _harmony(plan: SongPlan, lead: list[Sung]) -> list[Sung]:
    """A third above the lead (a scale step pair) in choruses."""
    scale = _SCALES[plan.mode]
    chorus = [(plan.time(s.start_bar, 0), plan.time(s.start_bar + s.bars, 0)) for s in plan.sections if s.name == "chorus"]
    return [note._replace(pitch=_scale_step(note.pitch, 2, plan.key, scale), vel=int(note.vel * 0.7), start=note.start + 0.012)
            for note in lead if any(a <= note.start + 0.05 < b for a, b in chorus)]


def _choir(plan: SongPlan, rng: np.random.Generator) -> list[Note]:
    notes = []
    center = (plan.voice.low + plan.voice.high) / 2 + 2
    for section, bar, j in _section_bars(plan, "vocals"):
        if section.name != "chorus":
            continue
        for p in _voicing(plan.key, plan.chords[bar], center, 3, None):
            notes.append(Note(plan.time(bar, 0), plan.bar_s * 0.98, p, _vel(rng.normal(64, 4))))
    return notes


class _Part(NamedTuple):
    channel: int
    program: int
    pan: int
    reverb: int
    modulation: int
    notes: list[Note]


def _compose(plan: SongPlan, config: SynthConfig, engine: str) -> tuple[dict[str, list[_Part]], list[Sung], list[Sung]]:
    """MIDI parts per stem (left-out stems get none) and the sung lead and harmony (espeak engine only)."""

    def rng(k: int) -> np.random.Generator:
        return np.random.default_rng([config.seed, plan.index, k])

    melody_sections = {s.name for s in plan.sections if "vocals" in s.active}
    parts: dict[str, list[_Part]] = {s: [] for s in STEMS}
    if plan.presence["drums"]:
        parts["drums"].append(_Part(9, plan.drum_kit, plan.pans["drums"], plan.sends["drums"], 0, _drums(plan, rng(2))))
    if plan.presence["bass"]:
        parts["bass"].append(_Part(0, plan.bass_program, plan.pans["bass"], plan.sends["bass"], 0, _bass(plan, rng(3))))
    if plan.presence["other"]:
        for k, inst in enumerate(plan.other):
            notes = _accompaniment(plan, inst, rng(4 + k), melody_sections if plan.presence["vocals"] else set())
            parts["other"].append(_Part(1 + k, inst.program, inst.pan, inst.reverb, 0, notes))
    lead: list[Sung] = []
    harmony: list[Sung] = []
    if plan.presence["vocals"]:
        lead = _melody(plan, rng(6))
        harmony = _harmony(plan, lead) if plan.voice.harmony else []
        if engine == "gm":
            pan = int(64 + 63 * plan.voice.pan)
            parts["vocals"].append(_Part(3, plan.voice.gm_program, pan, plan.sends["vocals"], 50,
                                         [Note(n.start, n.dur, n.pitch, n.vel) for n in lead]))
            if harmony:
                parts["vocals"].append(_Part(4, plan.voice.gm_program, 40, plan.sends["vocals"], 50,
                                             [Note(n.start, n.dur, n.pitch, n.vel) for n in harmony]))
            lead, harmony = [], []
        if plan.voice.backing is not None:
            parts["vocals"].append(_Part(5, plan.voice.backing, 64, plan.sends["vocals"], 0, _choir(plan, rng(7))))
    # keep what starts inside the clip, cut what runs past its end
    end = config.seconds
    for stem in parts:
        parts[stem] = [p._replace(notes=[n._replace(start=max(0.0, n.start), dur=min(n.dur, end - max(0.0, n.start)))
                                         for n in p.notes if n.start < end - 0.02]) for p in parts[stem]]
    lead = [n for n in lead if n.start < end - 0.05]
    harmony = [n for n in harmony if n.start < end - 0.05]
    return parts, lead, harmony


# --- MIDI + fluidsynth ------------------------------------------------------------------------------------------


def _vlq(value: int) -> bytes:
    out = [value & 0x7F]
    value >>= 7
    while value:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    return bytes(reversed(out))


def _midi_file(slots: Sequence[Sequence[_Part]], slot_s: int) -> bytes:
    """A type-0 Standard MIDI File, one tick per millisecond, slot ``k`` starting at ``k * slot_s`` seconds."""
    events: list[tuple[int, int, bytes]] = [(0, 0, b"\xff\x51\x03" + (1_000_000).to_bytes(3, "big"))]
    for k, parts in enumerate(slots):
        t0 = k * slot_s * 1000
        for part in parts:
            ch = part.channel
            events += [
                (t0, 1, bytes([0xB0 | ch, 0, 0])),
                (t0, 1, bytes([0xC0 | ch, part.program])),
                (t0, 1, bytes([0xB0 | ch, 7, 100])),
                (t0, 1, bytes([0xB0 | ch, 11, 127])),
                (t0, 1, bytes([0xB0 | ch, 10, int(np.clip(part.pan, 0, 127))])),
                (t0, 1, bytes([0xB0 | ch, 91, part.reverb])),
                (t0, 1, bytes([0xB0 | ch, 93, 0])),
                (t0, 1, bytes([0xB0 | ch, 1, part.modulation])),
            ]
            held: dict[int, list[int]] = {}
            ons: list[list[int]] = []
            for note in sorted(part.notes):
                on = t0 + 5 + int(round(note.start * 1000))
                off = max(on + 1, t0 + 5 + int(round((note.start + note.dur) * 1000)))
                prev = held.get(note.pitch)
                if prev is not None and prev[1] > on:  # a key struck again ends the held one
                    if prev[0] >= on:
                        continue
                    prev[1] = on
                held[note.pitch] = [on, off, note.pitch, note.vel]
                ons.append(held[note.pitch])
            for on, off, pitch, vel in ons:
                events.append((on, 2, bytes([0x90 | ch, pitch, vel])))
                events.append((off, 0, bytes([0x80 | ch, pitch, 0])))
    events.append((len(slots) * slot_s * 1000, 3, b"\xff\x2f\x00"))
    events.sort(key=lambda e: (e[0], e[1]))
    track, now = bytearray(), 0
    for tick, _, message in events:
        track += _vlq(tick - now) + message
        now = tick
    return b"MThd" + struct.pack(">IHHH", 6, 0, 1, 1000) + b"MTrk" + struct.pack(">I", len(track)) + bytes(track)


class _Render(NamedTuple):
    proc: subprocess.Popen
    wav: Path
    log: Path
    slots: int
    slot_s: int


def _start_fluidsynth(slots: Sequence[Sequence[_Part]], plan: SongPlan, config: SynthConfig, soundfont: Path,
                      tmp: Path) -> _Render:
    """Start rendering each slot's parts. One process loads the soundfont once and plays the slots one after
    another, with silence between them so that no stem hears another's release or reverb."""
    exe = _tool("fluidsynth", "fluidsynth")
    slot_s = math.ceil(config.seconds) + _TAIL_S
    midi, wav, log = tmp / f"{plan.name}.mid", tmp / f"{plan.name}.wav", tmp / f"{plan.name}.log"
    midi.write_bytes(_midi_file(slots, slot_s))
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
    import soundfile as sf

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


# --- sung vocals: espeak-ng syllables, TD-PSOLA onto the melody --------------------------------------------------


class _Syllable(NamedTuple):
    x: np.ndarray  # (time,) at the song's sample rate
    marks: np.ndarray  # pitch marks (sample indices), one per source period
    period: float  # source period, samples
    voiced: np.ndarray  # (time,) 0..1
    vowel: tuple[int, int]  # longest voiced run [start, end)


def _fast_len(n: int) -> int:
    """Smallest ``2^a 3^b 5^c >= n`` (an FFT size pocketfft handles quickly)."""
    return next_fast_len(n, real=True)


def _resample(x: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Band-limited resampling of a short signal that starts and ends in silence, by FFT."""
    if rate_in == rate_out:
        return x.astype(np.float64)
    g = math.gcd(rate_in, rate_out)
    q = rate_in // g
    n_in = q * _fast_len(-(-len(x) // q))
    n_out = n_in // q * (rate_out // g)
    spec = np.fft.rfft(x, n_in)
    out = np.zeros(n_out // 2 + 1, dtype=complex)
    m = min(len(spec), len(out))
    out[:m] = spec[:m]
    return np.fft.irfft(out, n_out)[: int(round(len(x) * rate_out / rate_in))] * (n_out / n_in)


def _espeak_words(words: Sequence[str], voice: Voice) -> tuple[list[np.ndarray], int]:
    """Each word spoken on one flat pitch (SSML prosody range 0%) by one espeak-ng call, cut apart at the pauses;
    word by word when the cut does not give one piece per word."""
    import soundfile as sf

    exe = _tool("espeak-ng", "espeak-ng")

    def speak(text: str) -> tuple[np.ndarray, int]:
        ssml = f'<speak><prosody range="0%">{text}</prosody></speak>'
        cmd = [exe, "--stdout", "-m", "-v", voice.espeak, "-s", str(voice.speed), "-p", str(voice.pitch), ssml]
        proc = subprocess.run(cmd, capture_output=True)
        if proc.returncode != 0 or not proc.stdout:
            raise SynthError(f"espeak-ng failed (exit {proc.returncode}): {proc.stderr.decode(errors='replace').strip()[-300:]}")
        x, rate = sf.read(io.BytesIO(proc.stdout), dtype="float32")
        return (x if x.ndim == 1 else x.mean(1)), rate

    x, rate = speak(' <break time="700ms"/> '.join(words))
    hop = int(0.005 * rate)
    frames = np.abs(x[: len(x) // hop * hop]).reshape(-1, hop).max(1)
    loud = np.flatnonzero(frames > 3e-3 * max(frames.max(), 1e-9))
    pieces = []
    if len(loud):
        breaks = np.flatnonzero(np.diff(loud) > 30)  # >= 150 ms of silence between words
        starts = np.concatenate([[loud[0]], loud[breaks + 1]])
        ends = np.concatenate([loud[breaks], [loud[-1]]]) + 1
        pieces = [x[max(0, (a - 2) * hop):(b + 4) * hop] for a, b in zip(starts, ends)]
    if len(pieces) != len(words):
        pieces = [speak(w)[0] for w in words]
    return pieces, rate


def _analyse(x: np.ndarray, rate: int, sample_rate: int, male: bool) -> _Syllable:
    x = _resample(np.pad(x, (64, 64)), rate, sample_rate)
    frame = int(0.01 * sample_rate)
    nf = max(1, len(x) // frame)
    frames = x[: nf * frame].reshape(nf, frame)
    rms = np.sqrt((frames**2).mean(1))
    zcr = (np.abs(np.diff(np.sign(frames), axis=1)) > 0).mean(1) * sample_rate / 2
    voiced_f = (rms > 0.06 * rms.max()) & (zcr < 2500)
    # the vowel: longest voiced run
    best, run_start = (0, 0), None
    for k, v in enumerate(np.append(voiced_f, False)):
        if v and run_start is None:
            run_start = k
        elif not v and run_start is not None:
            if k - run_start > best[1] - best[0]:
                best = (run_start, k)
            run_start = None
    if best == (0, 0):
        best = (int(np.argmax(rms)), int(np.argmax(rms)) + 1)
    a, b = best[0] * frame, best[1] * frame
    # period from the autocorrelation of the vowel's middle
    lo_f, hi_f = (60.0, 220.0) if male else (90.0, 420.0)
    seg = x[a:b] if b - a > 4 * sample_rate / lo_f else x[max(0, a - frame * 4):b + frame * 4]
    seg = seg - seg.mean()
    size = _fast_len(2 * len(seg))
    ac = np.fft.irfft(np.abs(np.fft.rfft(seg, size)) ** 2, size)[: len(seg)]
    lag_lo, lag_hi = int(sample_rate / hi_f), min(int(sample_rate / lo_f), len(ac) - 2)
    lag = lag_lo + int(np.argmax(ac[lag_lo:lag_hi])) if lag_hi > lag_lo else int(sample_rate / 150)
    if 0 < lag < len(ac) - 1:  # parabolic refinement
        y0, y1, y2 = ac[lag - 1], ac[lag], ac[lag + 1]
        denom = y0 - 2 * y1 + y2
        period = lag + (0.5 * (y0 - y2) / denom if denom < 0 else 0.0)
    else:
        period = float(lag)
    # pitch marks: from the vowel's biggest peak outwards, one per period, snapped to the local peak when voiced
    voiced = np.repeat(voiced_f.astype(np.float64), frame)
    voiced = np.pad(voiced, (0, len(x) - len(voiced)))
    anchor = a + int(np.argmax(x[a:b])) if b > a else int(np.argmax(x))
    marks = [anchor]
    half = max(1, int(period * 0.2))
    for direction in (1, -1):
        pos = float(anchor)
        while True:
            pos += direction * period
            c = int(round(pos))
            if c < 0 or c >= len(x):
                break
            if voiced[c] > 0:
                w0, w1 = max(0, c - half), min(len(x), c + half + 1)
                c = w0 + int(np.argmax(x[w0:w1]))
                pos = float(c)
            marks.append(c)
    # smooth the voicing mask a little (5 ms ramps) for crossfading sung and spoken parts
    ramp = max(1, int(0.005 * sample_rate))
    csum = np.concatenate([[0.0], np.cumsum(np.pad(voiced, (ramp // 2, ramp - ramp // 2)))])
    voiced = (csum[ramp:] - csum[:-ramp])[: len(x)] / ramp
    return _Syllable(x, np.array(sorted(set(marks))), float(period), voiced, (a, b))


def _sing_note(syl: _Syllable, note: Sung, voice: Voice, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """One syllable on one note: the spoken onset and coda kept, the vowel stretched to the note's length and
    moved to its pitch (with scoop and vibrato) by TD-PSOLA, so formants and consonants stay put."""
    x, marks, period, voiced, (va, vb) = syl
    L = len(x)
    a = va + 0.3 * (vb - va)
    b = va + 0.7 * (vb - va)
    dur = note.dur * sample_rate
    coda = L - b
    vowel = max(dur - a - 0.5 * coda, 0.3 * (b - a))
    total = int(a + vowel + coda)
    cut = int(min(total, dur + 0.08 * sample_rate))
    t = np.arange(cut, dtype=np.float64)
    secs = t / sample_rate
    cents = voice.vibrato_cents * np.sin(2 * np.pi * voice.vibrato_hz * secs + rng.uniform(0, 2 * np.pi))
    cents *= np.clip((secs - 0.15) / 0.3, 0.0, 1.0)
    if rng.random() < 0.4:
        cents -= 80.0 * np.clip(1.0 - secs / 0.08, 0.0, 1.0)  # scoop up into the note
    f0 = 440.0 * 2 ** ((note.pitch - 69) / 12 + cents / 1200)
    phase = np.cumsum(f0 / sample_rate)
    grains = np.concatenate([[0], np.flatnonzero(np.diff(np.floor(phase)) > 0) + 1])
    src = np.interp(t, [0, a, a + vowel, total], [0, a, b, L])
    src_g = src[grains]
    k = np.clip(np.searchsorted(marks, src_g), 1, len(marks) - 1)
    k -= (src_g - marks[k - 1]) < (marks[k] - src_g)
    centers = marks[k]
    w = int(round(period))
    offsets = np.arange(-w, w + 1)
    window = np.hanning(2 * w + 3)[1:-1]
    padded = np.pad(x, (w, w + 1))
    scale = (sample_rate / f0[grains]) / period
    pieces = padded[centers[:, None] + w + offsets] * window * scale[:, None]
    pos = grains[:, None] + offsets + w
    sung = np.bincount(pos.ravel(), pieces.ravel(), minlength=cut + 2 * w + 1)[w:w + cut]
    # unvoiced parts (consonants) come straight from the source, time-mapped
    spoken = np.interp(src, np.arange(L), x)
    v = np.interp(src, np.arange(L), voiced)
    y = v * sung + (1 - v) * spoken
    fade_in = min(cut, int(0.004 * sample_rate))
    fade_out = min(cut, int(0.05 * sample_rate))
    y[:fade_in] *= np.linspace(0, 1, fade_in)
    if cut < total:
        y[cut - fade_out:] *= np.linspace(1, 0, fade_out)
    return y * (note.vel / 100.0) ** 1.5


def _sing(lead: list[Sung], harmony: list[Sung], plan: SongPlan, config: SynthConfig) -> np.ndarray:
    """The sung vocal, ``(2, frames)``: lead (and harmony) voices, echo, reverb."""
    sr, n = config.sample_rate, config.frames
    rng = np.random.default_rng([config.seed, plan.index, 8])
    words = sorted({s.word for s in lead + harmony})
    male = plan.voice.espeak.split("+")[-1].startswith("m")
    pieces, rate = _espeak_words(words, plan.voice)
    bank = {w: _analyse(p, rate, sr, male) for w, p in zip(words, pieces)}
    out = np.zeros((2, n))
    pan = plan.voice.pan
    for voice_notes, pan_k, gain in ((lead, pan, 1.0), (harmony, -0.4 if pan <= 0 else 0.4, 0.55)):
        if not voice_notes:
            continue
        mono = np.zeros(n)
        for note in voice_notes:
            syl = bank[note.word]
            # the vowel lands on the beat: the consonant before it comes a little early
            start = int(round(note.start * sr - 0.6 * syl.vowel[0]))
            y = _sing_note(syl, note, plan.voice, sr, rng)
            if start >= n:
                continue
            if start < 0:
                y, start = y[-start:], 0
            y = y[: n - start]
            mono[start:start + len(y)] += y
        out[0] += gain * np.sqrt(0.5 * (1 - pan_k)) * mono
        out[1] += gain * np.sqrt(0.5 * (1 + pan_k)) * mono
    if plan.voice.echo > 0:
        delay = int(round(plan.bar_s * (0.1875 if rng.random() < 0.5 else 0.25) * sr))
        dry = out.copy()
        for tap in range(1, 4):
            d = tap * delay
            if d >= n:
                break
            out[:, d:] += (plan.voice.echo ** tap) * dry[::-1 if tap % 2 else 1, : n - d]  # ping-pong
    return _reverb(out, sr, plan.voice.reverb_s, plan.voice.reverb_db, rng)


def _reverb(x: np.ndarray, sample_rate: int, rt60: float, wet_db: float, rng: np.random.Generator) -> np.ndarray:
    """Convolution with a decaying, darkening stereo noise tail (a small-room/plate impression). The tail is
    computed at about 22 kHz (the sung voice has little above 11 kHz, the tail is darkened below 8 kHz)."""
    n = x.shape[1]
    factor = max(1, sample_rate // 22050)
    rate = sample_rate / factor
    dry = x.mean(0)
    if factor > 1:  # box filter, then keep every factor-th sample
        dry = np.convolve(dry, np.full(factor, 1.0 / factor), mode="same")[::factor]
    length = int(min(0.75 * rt60, 1.5) * rate)  # down to -45 dB
    t = np.arange(length) / rate
    ir = rng.standard_normal((2, length)) * np.exp(-6.9 * t / rt60)
    ir = np.pad(ir, ((0, 0), (int(rng.uniform(0.01, 0.03) * rate), 0)))  # pre-delay
    size = _fast_len(len(dry) + ir.shape[1])
    damping = 1.0 / (1.0 + (np.fft.rfftfreq(size, 1.0 / rate) / rng.uniform(3000, 8000)) ** 2)
    spec_ir = np.fft.rfft(ir, size) * damping
    spec_ir /= np.sqrt((np.abs(spec_ir) ** 2).mean(axis=-1, keepdims=True) + 1e-12)  # unit energy tail
    wet = np.fft.irfft(np.fft.rfft(dry, size)[None] * spec_ir, size)[:, : len(dry)]
    if factor > 1:
        grid = np.arange(n) / factor
        wet = np.stack([np.interp(grid, np.arange(len(dry)), w) for w in wet])
    return x + wet * 10 ** (wet_db / 20)


# --- song ---------------------------------------------------------------------------------------------------------


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
    parts, lead, harmony = _compose(plan, config, engine)
    n, sr = config.frames, config.sample_rate
    stems = {s: np.zeros((2, n)) for s in STEMS}
    slots = [s for s in STEMS if any(part.notes for part in parts[s])]
    with tempfile.TemporaryDirectory(prefix="demix-synth-") as tmp:
        render = _start_fluidsynth([parts[s] for s in slots], plan, config, sf2, Path(tmp)) if slots else None
        try:
            if lead:  # sung while fluidsynth renders
                stems["vocals"] += _sing(lead, harmony, plan, config)
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


# --- dataset ------------------------------------------------------------------------------------------------------


def _write_json(path: Path, obj: object) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


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
    _tool("fluidsynth", "fluidsynth")
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
            with tempfile.TemporaryDirectory(prefix=f".tmp-{name}-", dir=out) as tmp:
                for f in files:
                    write_float_wav(Path(tmp) / f, audio[f[:-4]], config.sample_rate)
                folder.mkdir(exist_ok=True)
                for f in files:
                    os.replace(Path(tmp) / f, folder / f)
        truth[name] = dict(plan_song(index, config).presence)
        if progress is not None:
            progress(1)
    _write_json(truth_path, truth)
    return truth


def write_demo_catalog(folder: str | Path, *, tracks: int = 3, seconds: float = 12.0, seed: int = 0) -> Path:
    """A small catalog for ``make demo``: synthetic songs, awkward names, one corrupt file.

    Writes ``folder/songs/`` (MUSDB layout), ``folder/extra/`` (assorted formats and names), a
    truncated FLAC, and ``folder/catalog.csv`` (``uri,track_id``, uris relative to the CSV).
    Returns the CSV's path.
    """
    import csv

    import soundfile as sf

    folder = Path(folder)
    synth_dataset(folder / "songs", SynthConfig(tracks=tracks, seconds=seconds, seed=seed, absent_share=0.34))
    extra = write_demo_inputs(folder / "extra", seed)
    broken = folder / "extra" / "broken (truncated).flac"
    sf.write(broken, toy_song(4.0, 44100, seed)["mixture"].T, 44100, subtype="PCM_16")
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 3])
    rows = [(f"songs/{track_name(i)}/mixture.wav", track_name(i)) for i in range(tracks)]
    rows += [(str(p.relative_to(folder)), "") for p in [*extra, broken]]
    path = folder / "catalog.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["uri", "track_id"])
        writer.writerows(rows)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demix.pipeline.data.synth", description="write generated audio")
    sub = parser.add_subparsers(dest="what", required=True)
    demo = sub.add_parser("demo", help="a few toy mixtures in assorted formats and names")
    demo.add_argument("out")
    demo.add_argument("--seed", type=int, default=0)
    cat = sub.add_parser("demo-catalog", help="the make-demo catalog: synthetic songs, odd names, one corrupt file")
    cat.add_argument("out")
    cat.add_argument("--tracks", type=int, default=3)
    cat.add_argument("--seconds", type=float, default=12.0)
    data = sub.add_parser("dataset", help="synthetic multitrack songs in MUSDB layout (needs fluidsynth)")
    data.add_argument("out", help="output folder: OUT/<track>/{mixture,vocals,drums,bass,other}.wav, OUT/truth.json")
    data.add_argument("--tracks", type=int, default=SynthConfig.tracks, help="number of songs (default: %(default)s)")
    data.add_argument("--seconds", type=float, default=SynthConfig.seconds, help="length of each song (default: %(default)s)")
    data.add_argument("--seed", type=int, default=SynthConfig.seed, help="dataset seed (default: %(default)s)")
    data.add_argument("--sample-rate", type=int, default=SynthConfig.sample_rate, help="Hz (default: %(default)s)")
    data.add_argument("--absent-share", type=float, default=SynthConfig.absent_share,
                      help="share of tracks with stems left out on purpose (default: %(default)s)")
    data.add_argument("--soundfont", default=None, help=f"General MIDI .sf2 (default: ${SOUNDFONT_ENV} or FluidR3_GM.sf2)")
    data.add_argument("--vocals", choices=VOCAL_ENGINES, default=SynthConfig.vocals,
                      help="espeak: sung syllables; gm: General MIDI voices; auto: espeak when installed")
    args = parser.parse_args(argv)
    if args.what == "demo":
        for p in write_demo_inputs(args.out, args.seed):
            print(p)
        return 0
    if args.what == "demo-catalog":
        try:
            print(write_demo_catalog(args.out, tracks=args.tracks, seconds=args.seconds))
        except (SynthError, ValueError) as err:
            print(f"demix.pipeline.data.synth: {err}", file=sys.stderr)
            return 1
        return 0
    try:
        config = SynthConfig(
            tracks=args.tracks, seconds=args.seconds, seed=args.seed, sample_rate=args.sample_rate,
            absent_share=args.absent_share, soundfont=args.soundfont, vocals=args.vocals,
        )
        truth = synth_dataset(args.out, config)
    except (SynthError, ValueError) as err:
        print(f"demix.pipeline.data.synth: {err}", file=sys.stderr)
        return 1
    for name in map(track_name, range(config.tracks)):
        print(name, " ".join(s for s in STEMS if truth[name][s]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
