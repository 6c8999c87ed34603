"""The musical vocabulary a song plan draws from (:mod:`.plan` makes the choices): scales and chord
progressions, song forms and how often each stem plays in each section, drum grooves and the GM kits that suit
them, bass figures, accompaniment families and lead programs, and the arrangements of the varied profiles."""

from __future__ import annotations

SCALES = {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 10),
          "dorian": (0, 2, 3, 5, 7, 9, 10), "mixolydian": (0, 2, 4, 5, 7, 9, 10)}
BASE_MODE = {"major": "major", "minor": "minor", "dorian": "minor", "mixolydian": "major"}  # progressions
# chord progressions as scale degrees (0 = tonic), one chord per bar
PROGRESSIONS = {
    "major": ((0, 4, 5, 3), (0, 5, 3, 4), (5, 3, 0, 4), (0, 3, 4, 3), (1, 4, 0, 0), (0, 3, 0, 4), (3, 4, 0, 5), (0, 2, 3, 4)),
    "minor": ((0, 5, 2, 6), (0, 3, 4, 0), (0, 6, 5, 6), (0, 5, 3, 4), (0, 3, 6, 2), (5, 6, 0, 0), (0, 4, 5, 6)),
}
# song form; a clip starts at the intro, the first verse or the first chorus and runs on from there
FORM = (("intro", (2, 4)), ("verse", (8,)), ("chorus", (8,)), ("verse", (8,)), ("chorus", (8,)), ("bridge", (4, 8)),
         ("chorus", (8,)), ("chorus", (8,)))
REPEAT_FORM = (("verse", (8,)), ("chorus", (8,)), ("bridge", (4, 8)), ("chorus", (8,)))
# chance that a stem plays in a section (a stem left out of the track never plays)
ACTIVITY = {
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
KITS = {"rock": (0, 8, 16), "pop": (0, 8), "dance": (24, 25), "half": (0, 8, 16), "funk": (0, 8, 32),
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
FAMILIES = {
    "keys": ((0, 1, 2, 4, 5, 7, 11), ("comp", "arp", "pad", "comp")),
    "guitar": ((24, 25, 26, 27, 28, 29, 30), ("strum", "strum", "arp", "comp")),
    "strings": ((48, 49, 50, 44, 45, 46), ("pad",)),
    "pad": ((88, 89, 90, 92, 94, 95), ("pad",)),
    "brass": ((61, 62, 63, 56, 60), ("stab", "pad")),
    "organ": ((16, 17, 18, 19), ("pad", "comp")),
}
FAMILY_SHARE = (0.3, 0.3, 0.12, 0.1, 0.08, 0.1)  # keys and guitars most often, as in pop and rock
LEADS = (80, 81, 29, 30, 65, 66, 73, 56, 11, 22)  # square, saw, overdrive, distortion, saxes, flute, trumpet, vibes, harmonica
# varied plans (SynthConfig.varied): how much each non-vocal stem plays per arrangement, and its melody density
ARRANGEMENTS = {"sparse": (0.55, 0.6), "normal": (1.0, 1.0), "dense": (1.3, 1.25)}  # (activity scale, melody)
ARRANGEMENT_SHARE = (0.3, 0.4, 0.3)
