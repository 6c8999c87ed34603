"""Toy audio without a soundfont: :func:`toy_song` (oscillators and noise), demo inputs in assorted formats and
names, and the ``make demo`` catalog."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import soundfile as sf

from demix.pipeline.data.synth.config import SynthConfig, track_name
from demix.pipeline.data.synth.dataset import synth_dataset
from demix.pipeline.stems import STEMS

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


def write_demo_catalog(folder: str | Path, *, tracks: int = 3, seconds: float = 12.0, seed: int = 0) -> Path:
    """A small catalog for ``make demo``: synthetic songs, awkward names, one corrupt file.

    Writes ``folder/songs/`` (MUSDB layout), ``folder/extra/`` (assorted formats and names), a
    truncated FLAC, and ``folder/catalog.csv`` (``uri,track_id``, uris relative to the CSV).
    Returns the CSV's path.
    """
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
