"""Settings of a synthetic dataset, its file names, and the tools and soundfont synthesis needs."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
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


def require_tool(name: str, package: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise SynthError(f"{name!r} not found on PATH; install the Debian package {package!r} (apt-get install {package})")
    return found


def vocal_engine(config: SynthConfig) -> str:
    """``"espeak"`` or ``"gm"``: how this config's lead vocals are made on this machine."""
    if config.vocals == "espeak":
        require_tool("espeak-ng", "espeak-ng")
        return "espeak"
    if config.vocals == "gm":
        return "gm"
    return "espeak" if shutil.which("espeak-ng") else "gm"
