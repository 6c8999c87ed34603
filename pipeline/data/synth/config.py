"""Settings of a synthetic dataset, its file names, and the tools, soundfonts and voices synthesis needs."""

from __future__ import annotations

import functools
import os
import shutil
import struct
from dataclasses import dataclass, fields
from pathlib import Path

SYNTH_VERSION = 1  # bump when the same settings would give other audio; recorded in OUT/synth_config.json
SOUNDFONT_ENV = "DEMIX_SOUNDFONT"
SOUNDFONT_PATHS = (
    "/usr/share/sounds/sf2/FluidR3_GM.sf2",  # Debian/Ubuntu: fluid-soundfont-gm
    "/usr/share/soundfonts/FluidR3_GM.sf2",  # Arch, Fedora
)
VOCAL_ENGINES = ("auto", "espeak", "gm")
TRUTH_FILE = "truth.json"
CONFIG_FILE = "synth_config.json"
SONG_FILE = "song.json"  # OUT/<track>/song.json: the concrete choices of one song (profiles other than classic)
SONGS_FILE = "songs.json"  # OUT/songs.json: {track: song.json content}

# General MIDI soundfonts that Debian packages, by file name: (where to look, Debian package)
SOUNDFONTS: dict[str, tuple[tuple[str, ...], str]] = {
    "FluidR3_GM.sf2": (SOUNDFONT_PATHS, "fluid-soundfont-gm"),
    "MuseScore_General.sf3": (("/usr/share/sounds/sf3/MuseScore_General.sf3",
                               "/usr/share/sounds/sf3/MuseScore_General_Full.sf3"), "musescore-general-soundfont"),
    "FluidR3Mono_GM.sf3": (("/usr/share/sounds/sf3/FluidR3Mono_GM.sf3",
                            "/usr/share/fluidr3mono-gm-soundfont/FluidR3Mono_GM.sf3"), "fluidr3mono-gm-soundfont"),
    "sf_GMbank.sf2": (("/usr/share/sounds/sf2/sf_GMbank.sf2", "/usr/share/samples/sf_GMbank.sf2"), "csound-soundfont"),
    "OPL-3_FM_128M.sf2": (("/usr/share/sounds/sf2/OPL-3_FM_128M.sf2",), "opl3-soundfont"),
    "TimGM6mb.sf2": (("/usr/share/sounds/sf2/TimGM6mb.sf2",), "timgm6mb-soundfont"),
}

# Voice engines of the profiles (SynthConfig.voice_engines): engine -> {speaker: female}. espeak-ng speakers are
# formant voices; flite's and festival's are built from recordings of human speakers. The two lists share no
# speaker: flite's and festival's "slt" and "kal" are the same recorded people, so each goes to one engine only.
ESPEAK_MALE = ("en+m1", "en+m2", "en+m3", "en+m4", "en+m7", "en-us+m3")
ESPEAK_FEMALE = ("en+f1", "en+f2", "en+f3", "en+f4", "en+f5", "en-us+f2")
VOICES: dict[str, dict[str, bool]] = {
    "espeak": {**dict.fromkeys(ESPEAK_MALE, False), **dict.fromkeys(ESPEAK_FEMALE, True)},
    "flite": {"kal16": False, "awb": False, "rms": False},  # CMU kal (diphone), awb, rms (clustergen)
    "festival": {"ked_diphone": False, "cmu_us_slt_arctic_hts": True},  # CSTR ked (diphone), CMU slt (HTS)
    "gm": {"gm": False},  # General MIDI voice programs (Voice Oohs, Synth Voice, Solo Vox) on the song's soundfont
}
# the command each engine runs and the Debian package that brings it
ENGINE_TOOLS = {"espeak": ("espeak-ng", "espeak-ng"), "flite": ("flite", "flite"), "festival": ("festival", "festival")}
FESTIVAL_VOICE_DIRS = ("/usr/share/festival/voices",)
FESTIVAL_VOICES = {  # speaker -> (folder under a voices dir, Debian package)
    "ked_diphone": ("english/ked_diphone", "festvox-kdlpc16k"),
    "cmu_us_slt_arctic_hts": ("us/cmu_us_slt_arctic_hts", "festvox-us-slt-hts"),
}

# Named presets (SynthConfig.profile). "classic" is the generator as it always was: one soundfont, espeak-ng
# sung vocals, no effects. "train" varies what classic holds fixed; "heldout" is a judge: its soundfont and its
# voice engine are never used by "train".
PROFILES: dict[str, dict[str, object]] = {
    "classic": {"soundfonts": (), "voice_engines": (), "spoken_share": 0.0, "stem_soundfont_share": 0.0,
                "effects": False, "effect_strength": 1.0, "varied": False, "automation": False},
    "train": {"soundfonts": ("FluidR3_GM.sf2", "MuseScore_General.sf3", "FluidR3Mono_GM.sf3", "sf_GMbank.sf2",
                             "OPL-3_FM_128M.sf2"),
              "voice_engines": ("espeak", "flite"), "spoken_share": 0.3, "stem_soundfont_share": 0.15,
              "effects": True, "effect_strength": 1.0, "varied": True, "automation": True},
    "heldout": {"soundfonts": ("TimGM6mb.sf2",), "voice_engines": ("festival",), "spoken_share": 0.3,
                "stem_soundfont_share": 0.0, "effects": True, "effect_strength": 0.6, "varied": True,
                "automation": True},
}
_PROFILE_FIELDS = tuple(PROFILES["classic"])


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
            Debian package ``fluid-soundfont-gm``. Used when ``soundfonts`` is empty.
        vocals: ``"espeak"`` sings the lead with espeak-ng syllables (consonants, formants), ``"gm"`` plays it
            on General MIDI voice programs, ``"auto"`` takes espeak when ``espeak-ng`` is installed. Used when
            ``voice_engines`` is empty.
        profile: ``"classic"`` (the default: one soundfont, sung espeak-ng vocals, no effects, as always),
            ``"train"`` or ``"heldout"`` (see :data:`PROFILES`); fills every field below left at ``None``.
        soundfonts: soundfonts each song draws one from (names in :data:`SOUNDFONTS` or paths); ``()``: the one
            ``soundfont``.
        voice_engines: engines each song with vocals draws one from: ``"espeak"`` (espeak-ng), ``"flite"``,
            ``"festival"`` (speakers in :data:`VOICES`), ``"gm"``; ``()``: ``vocals`` decides.
        spoken_share: share of songs (with a speaking engine) whose lead is spoken instead of sung.
        stem_soundfont_share: chance that a stem takes another of ``soundfonts`` than its song.
        effects: a random chain per stem before the mix (EQ, filters, saturation, compression, reverb rooms).
        effect_strength: 0..1, how far the effects go (probabilities and ranges).
        varied: wider tempo, key, mode and register ranges, sparse and dense arrangements.
        automation: slow per-stem and whole-mix gain changes (loudness that moves).
    """

    tracks: int = 10
    seconds: float = 30.0
    seed: int = 0
    sample_rate: int = 44100
    absent_share: float = 0.25
    soundfont: str | None = None
    vocals: str = "auto"
    profile: str = "classic"
    soundfonts: tuple[str, ...] | None = None
    voice_engines: tuple[str, ...] | None = None
    spoken_share: float | None = None
    stem_soundfont_share: float | None = None
    effects: bool | None = None
    effect_strength: float | None = None
    varied: bool | None = None
    automation: bool | None = None

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise ValueError(f"SynthConfig.profile must be one of {tuple(PROFILES)}, got {self.profile!r}")
        for name in _PROFILE_FIELDS:  # None: the profile's value
            value = getattr(self, name)
            if value is None:
                value = PROFILES[self.profile][name]
            if isinstance(value, (list, tuple)):
                value = tuple(str(v) for v in value)
            object.__setattr__(self, name, value)
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
        bad = [e for e in self.voice_engines if e not in VOICES]
        if bad:
            raise ValueError(f"SynthConfig.voice_engines: unknown {bad}; known: {tuple(VOICES)}")
        for name in ("spoken_share", "stem_soundfont_share", "effect_strength"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise ValueError(f"SynthConfig.{name} must be within [0, 1], got {getattr(self, name)}")
        if self.soundfonts and self.soundfont is not None:
            raise ValueError("give SynthConfig.soundfont (one soundfont) or SynthConfig.soundfonts, not both")

    @property
    def frames(self) -> int:
        return int(round(self.seconds * self.sample_rate))

    @property
    def classic(self) -> bool:
        """Whether every profile field has its classic value: the generator exactly as it always was."""
        return all(getattr(self, name) == PROFILES["classic"][name] for name in _PROFILE_FIELDS)

    def profile_settings(self) -> dict[str, object]:
        """The profile fields, JSON-ready."""
        out: dict[str, object] = {"profile": self.profile}
        for f in fields(self):
            if f.name in _PROFILE_FIELDS:
                value = getattr(self, f.name)
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


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


def resolve_soundfont(name: str) -> Path:
    """A soundfont of ``SynthConfig.soundfonts``: a name in :data:`SOUNDFONTS` (found where its Debian package
    puts it) or a path."""
    if name in SOUNDFONTS:
        paths, package = SOUNDFONTS[name]
        for candidate in paths:
            if Path(candidate).is_file():
                return Path(candidate)
        raise SynthError(f"soundfont {name} not found (looked in {', '.join(paths)}); install the Debian package "
                         f"{package!r} (apt-get install {package})")
    given = Path(name).expanduser()
    if not given.is_file():
        raise SynthError(f"soundfont {name!r} (from SynthConfig.soundfonts) is neither a known name "
                         f"({', '.join(SOUNDFONTS)}) nor a file")
    return given


def soundfont_label(name: str) -> str:
    """How a soundfont of ``SynthConfig.soundfonts`` is named in metadata: its known name or file name."""
    return name if name in SOUNDFONTS else Path(name).name


@functools.lru_cache(maxsize=32)
def soundfont_presets(path: str) -> frozenset[tuple[int, int]]:
    """``(bank, program)`` of every preset in an ``.sf2``/``.sf3`` file (its ``phdr`` chunk; no samples read)."""
    try:
        with open(path, "rb") as f:
            riff, size, form = struct.unpack("<4sI4s", f.read(12))
            if riff != b"RIFF" or form != b"sfbk":
                raise SynthError(f"{path} is not a SoundFont (RIFF sfbk) file")
            end = 8 + size
            while f.tell() < end:
                head = f.read(8)
                if len(head) < 8:
                    break
                cid, csz = struct.unpack("<4sI", head)
                if cid != b"LIST":
                    f.seek(csz + (csz & 1), 1)
                    continue
                kind, list_end = f.read(4), f.tell() - 4 + csz  # some .sf3 writers do not pad LIST chunks
                if kind != b"pdta":
                    f.seek(list_end)
                    continue
                while f.tell() < list_end:
                    sid, ssz = struct.unpack("<4sI", f.read(8))
                    if sid == b"phdr":
                        data = f.read(ssz)
                        return frozenset(struct.unpack("<20sHH", data[k * 38:k * 38 + 24])[1:][::-1]
                                         for k in range(ssz // 38 - 1))  # the last record is the terminal one
                    f.seek(ssz + (ssz & 1), 1)
    except (OSError, struct.error) as err:
        raise SynthError(f"cannot read the presets of soundfont {path}: {err}") from err
    raise SynthError(f"soundfont {path} has no preset headers (phdr chunk)")


def require_tool(name: str, package: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise SynthError(f"{name!r} not found on PATH; install the Debian package {package!r} (apt-get install {package})")
    return found


def require_engine(engine: str, speaker: str | None = None) -> None:
    """Raise :class:`SynthError` naming the Debian package when voice ``engine`` (and its ``speaker``, or every
    speaker of the engine) cannot run here."""
    if engine in ENGINE_TOOLS:
        require_tool(*ENGINE_TOOLS[engine])
    if engine == "festival":
        for name in [speaker] if speaker is not None else list(VOICES["festival"]):
            folder, package = FESTIVAL_VOICES[name]
            if not any((Path(d) / folder).is_dir() for d in FESTIVAL_VOICE_DIRS):
                raise SynthError(f"festival voice {name!r} not installed; install the Debian package {package!r} "
                                 f"(apt-get install {package})")


def vocal_engine(config: SynthConfig) -> str:
    """``"espeak"`` or ``"gm"``: how this config's lead vocals are made on this machine (``config.vocals``; with
    ``config.voice_engines`` each song draws its engine instead, see :func:`plan_song`)."""
    if config.vocals == "espeak":
        require_tool("espeak-ng", "espeak-ng")
        return "espeak"
    if config.vocals == "gm":
        return "gm"
    return "espeak" if shutil.which("espeak-ng") else "gm"
