"""The notes of one planned song: drums, bass, accompaniment ("other"), the sung melody, its harmony and
backing choir, gathered as MIDI parts per stem by :func:`compose_song`."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from demix.pipeline.data.synth.config import SynthConfig
from demix.pipeline.data.synth.midi import Part
from demix.pipeline.data.synth.plan import BASS_FIGURES, GROOVES, SCALES, Chord, Instrument, Note, Section, SongPlan, Sung
from demix.pipeline.stems import STEMS

_GHOSTS = {"funk": (7, 9, 15), "hiphop": (13,)}
_TOMS = (50, 48, 47, 45, 43, 41)
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
    groove = GROOVES[plan.drum_style]
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
    scale = SCALES[plan.mode]
    short = plan.bass_program in (36, 37)  # slap basses
    for section, bar, j in _section_bars(plan, "bass"):
        figure = plan.bass_figure
        if section.name in ("intro", "outro"):
            figure = "whole" if rng.random() < 0.5 else "half"
        chord = plan.chords[bar]
        nxt = plan.chords[bar + 1] if bar + 1 < len(plan.chords) else chord
        root = 28 + (plan.key + chord.root - 28) % 12 + plan.bass_shift  # E1..D#2 (classic)
        next_root = 28 + (plan.key + nxt.root - 28) % 12 + plan.bass_shift
        for step, length, what in BASS_FIGURES[figure]:
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


def _comp_bar(plan: SongPlan, rng: np.random.Generator, bar: int, role: str, comp: Sequence[int], voicing: list[int],
              dyn: int) -> list[Note]:
    """One bar of a "comp" or "stab" part: the voicing struck on each step of the rhythm ``comp``."""
    notes: list[Note] = []
    step_s = plan.bar_s / 16
    for k, step in enumerate(comp):
        nxt = comp[k + 1] if k + 1 < len(comp) else 16
        dur = (nxt - step) * step_s * (0.35 if role == "stab" else 0.85)
        vel = rng.normal((100 if role == "stab" else 80) + dyn + (6 if step % 4 == 0 else 0), 5)
        for p in voicing:
            notes.append(Note(plan.time(bar, step) + float(rng.normal(0, 0.003)), dur, p, _vel(vel)))
    return notes


def _strum_bar(plan: SongPlan, rng: np.random.Generator, bar: int, chord: Chord, strum: Sequence[int], power: bool,
               dyn: int) -> list[Note]:
    """One bar of a strummed guitar: a (power) chord shape, down strokes on the beats, up strokes between."""
    notes: list[Note] = []
    step_s = plan.bar_s / 16
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
    return notes


def _accompaniment(plan: SongPlan, inst: Instrument, rng: np.random.Generator, melody_sections: set[str]) -> list[Note]:
    notes: list[Note] = []
    comp = _COMP_RHYTHMS[int(rng.integers(len(_COMP_RHYTHMS)))]
    strum = _STRUM_RHYTHMS[int(rng.integers(len(_STRUM_RHYTHMS)))]
    center = float(rng.uniform(58, 66)) + plan.other_shift
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
            notes += _comp_bar(plan, rng, bar, inst.role, comp, voicing, dyn)
        elif inst.role == "strum":
            notes += _strum_bar(plan, rng, bar, chord, strum, power, dyn)
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
    scale = SCALES[plan.mode]
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
            tunes[section.name] = _tune(plan, rng, section, plan.voice.low, plan.voice.high,
                                        density[section.name] * plan.melody_density)
        for bar, step, length, pitch, word in tunes[section.name]:
            if bar >= section.bars:
                continue
            start = plan.time(section.start_bar + bar, step) + float(rng.normal(0, 0.008))
            vel = _vel(rng.normal(96 if section.name == "chorus" else 88, 6))
            notes.append(Sung(max(0.0, start), length * step_s * 0.92, pitch, vel, word))
    return notes


def _harmony(plan: SongPlan, lead: list[Sung]) -> list[Sung]:
    """A third above the lead (a scale step pair) in choruses."""
    scale = SCALES[plan.mode]
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


def compose_song(plan: SongPlan, config: SynthConfig, engine: str) -> tuple[dict[str, list[Part]], list[Sung], list[Sung]]:
    """MIDI parts per stem (left-out stems get none) and the sung lead and harmony (espeak engine only)."""

    def rng(k: int) -> np.random.Generator:
        return np.random.default_rng([config.seed, plan.index, k])

    melody_sections = {s.name for s in plan.sections if "vocals" in s.active}
    parts: dict[str, list[Part]] = {s: [] for s in STEMS}
    if plan.presence["drums"]:
        parts["drums"].append(Part(9, plan.drum_kit, plan.pans["drums"], plan.sends["drums"], 0, _drums(plan, rng(2))))
    if plan.presence["bass"]:
        parts["bass"].append(Part(0, plan.bass_program, plan.pans["bass"], plan.sends["bass"], 0, _bass(plan, rng(3))))
    if plan.presence["other"]:
        for k, inst in enumerate(plan.other):
            notes = _accompaniment(plan, inst, rng(4 + k), melody_sections if plan.presence["vocals"] else set())
            parts["other"].append(Part(1 + k, inst.program, inst.pan, inst.reverb, 0, notes))
    lead: list[Sung] = []
    harmony: list[Sung] = []
    if plan.presence["vocals"]:
        lead = _melody(plan, rng(6))
        harmony = _harmony(plan, lead) if plan.voice.harmony else []
        if engine == "gm":
            pan = int(64 + 63 * plan.voice.pan)
            parts["vocals"].append(Part(3, plan.voice.gm_program, pan, plan.sends["vocals"], 50,
                                         [Note(n.start, n.dur, n.pitch, n.vel) for n in lead]))
            if harmony:
                parts["vocals"].append(Part(4, plan.voice.gm_program, 40, plan.sends["vocals"], 50,
                                             [Note(n.start, n.dur, n.pitch, n.vel) for n in harmony]))
            lead, harmony = [], []
        if plan.voice.backing is not None:
            parts["vocals"].append(Part(5, plan.voice.backing, 64, plan.sends["vocals"], 0, _choir(plan, rng(7))))
    # keep what starts inside the clip, cut what runs past its end
    end = config.seconds
    for stem in parts:
        parts[stem] = [p._replace(notes=[n._replace(start=max(0.0, n.start), dur=min(n.dur, end - max(0.0, n.start)))
                                         for n in p.notes if n.start < end - 0.02]) for p in parts[stem]]
    lead = [n for n in lead if n.start < end - 0.05]
    harmony = [n for n in harmony if n.start < end - 0.05]
    return parts, lead, harmony
