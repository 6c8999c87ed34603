"""Sung vocals: espeak-ng syllables moved onto the melody by TD-PSOLA (pitch, vibrato and vowel length change;
formants and consonants stay), then echo and reverb."""

from __future__ import annotations

import io
import math
import subprocess
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import soundfile as sf
from scipy.fft import next_fast_len

from demix.pipeline.data.synth.config import SynthConfig, SynthError, require_tool
from demix.pipeline.data.synth.plan import SongPlan, Sung, Voice

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
    exe = require_tool("espeak-ng", "espeak-ng")

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


def sing(lead: list[Sung], harmony: list[Sung], plan: SongPlan, config: SynthConfig) -> np.ndarray:
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
