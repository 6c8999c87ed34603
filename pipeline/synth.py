"""Generated audio for demos, tests and benchmarks.

:func:`toy_song` builds a short four-stem piece from plain oscillators and noise (no soundfont needed):
a vibrato lead with harmonics (vocals), kick/snare/hat hits (drums), a low sawtooth line (bass) and
sustained chords (other). Deterministic per seed; the mixture is the exact sum of the stems.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

STEMS = ("vocals", "drums", "bass", "other")


def _env(n: int, sr: int, attack: float, decay: float) -> np.ndarray:
    t = np.arange(n) / sr
    return np.minimum(t / max(attack, 1e-4), 1.0) * np.exp(-t / decay)


def toy_song(seconds: float = 8.0, sample_rate: int = 44100, seed: int = 0) -> dict[str, np.ndarray]:
    """Four stereo stems ``{stem: (2, time)}`` float32 plus ``"mixture"`` (their sum, peak <= 0.9)."""
    rng = np.random.default_rng(seed)
    n = int(seconds * sample_rate)
    t = np.arange(n) / sample_rate
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.synth", description="write generated demo inputs")
    parser.add_argument("what", choices=["demo"])
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for p in write_demo_inputs(args.out, args.seed):
        print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
