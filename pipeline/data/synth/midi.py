"""Standard MIDI Files for fluidsynth: one part per channel, stems one after another in time slots."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from demix.pipeline.data.synth.plan import Note

class Part(NamedTuple):
    channel: int
    program: int
    pan: int
    reverb: int
    modulation: int
    notes: list[Note]


def _vlq(value: int) -> bytes:
    out = [value & 0x7F]
    value >>= 7
    while value:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    return bytes(reversed(out))


def midi_file(slots: Sequence[Sequence[Part]], slot_s: int) -> bytes:
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
