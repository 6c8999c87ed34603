"""Vocals: sung (:func:`sing`: words moved onto the melody by TD-PSOLA; pitch, vibrato and vowel length
change, formants and consonants stay) or spoken (:func:`speak`: whole phrases with the engine's own prosody, or
each word on its note's onset), then echo and reverb. The words come from :mod:`.speech`: espeak-ng syllables on
one flat pitch (classic), or with ``SynthConfig.voice_engines`` espeak-ng, flite or festival, whose pitch marks
follow the speech's own pitch."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from scipy.fft import next_fast_len
from scipy.ndimage import median_filter

from demix.pipeline.data.synth.config import SynthConfig
from demix.pipeline.data.synth.plan import SongPlan, Sung, Voice
from demix.pipeline.data.synth.speech import engine_clips, espeak_words

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


def _vowel_frames(voiced_f: np.ndarray, rms: np.ndarray) -> tuple[int, int]:
    """The vowel: the longest run of voiced frames ``[start, end)`` (the loudest frame when none is voiced)."""
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
    return best


def _smooth_voicing(voiced: np.ndarray, n: int, sample_rate: int) -> np.ndarray:
    """The voicing mask smoothed a little (5 ms ramps) for crossfading sung and spoken parts; ``n`` samples."""
    ramp = max(1, int(0.005 * sample_rate))
    csum = np.concatenate([[0.0], np.cumsum(np.pad(voiced, (ramp // 2, ramp - ramp // 2)))])
    return (csum[ramp:] - csum[:-ramp])[:n] / ramp


def _analyse(x: np.ndarray, rate: int, sample_rate: int, male: bool) -> _Syllable:
    x = _resample(np.pad(x, (64, 64)), rate, sample_rate)
    frame = int(0.01 * sample_rate)
    nf = max(1, len(x) // frame)
    frames = x[: nf * frame].reshape(nf, frame)
    rms = np.sqrt((frames**2).mean(1))
    zcr = (np.abs(np.diff(np.sign(frames), axis=1)) > 0).mean(1) * sample_rate / 2
    voiced_f = (rms > 0.06 * rms.max()) & (zcr < 2500)
    best = _vowel_frames(voiced_f, rms)
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
    voiced = _smooth_voicing(voiced, len(x), sample_rate)
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
    """The sung vocal, ``(2, frames)``: lead (and harmony) voices, echo, reverb. The words come from espeak-ng, or
    from ``plan.voice.engine`` when the plan names one."""
    sr, n = config.sample_rate, config.frames
    rng = np.random.default_rng([config.seed, plan.index, 8])
    words = sorted({s.word for s in lead + harmony})
    if plan.voice.engine is None:  # classic
        male = plan.voice.espeak.split("+")[-1].startswith("m")
        pieces, rate = espeak_words(words, plan.voice)
        bank = {w: _analyse(p, rate, sr, male) for w, p in zip(words, pieces)}
    else:
        if plan.voice.engine == "espeak":
            pieces, rate = espeak_words(words, plan.voice)
        else:
            pieces, rate = engine_clips(plan.voice, words, spoken=False)
        bank = {w: _analyse_tracked(p, rate, sr, bool(plan.voice.female)) for w, p in zip(words, pieces)}
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
    return _vocal_bus(out, plan, sr, rng)


def _vocal_bus(out: np.ndarray, plan: SongPlan, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Echo (ping-pong, when the voice has one) and reverb of the panned voices ``out``."""
    n = out.shape[1]
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


# --- other engines, spoken vocals ------------------------------------------------------------------------------


def _analyse_tracked(x: np.ndarray, rate: int, sample_rate: int, female: bool) -> _Syllable:
    """As :func:`_analyse`, with pitch marks that follow the source's own pitch frame by frame (speech with its
    intonation, not a flat espeak-ng monotone)."""
    x = _resample(np.pad(x, (64, 64)), rate, sample_rate)
    frame = int(0.01 * sample_rate)
    nf = max(1, len(x) // frame)
    frames = np.pad(x, (0, max(0, nf * frame - len(x))))[: nf * frame].reshape(nf, frame)
    rms = np.sqrt((frames**2).mean(1))
    zcr = (np.abs(np.diff(np.sign(frames), axis=1)) > 0).mean(1) * sample_rate / 2
    voiced_f = (rms > 0.06 * max(rms.max(), 1e-12)) & (zcr < 2500)
    best = _vowel_frames(voiced_f, rms)
    a, b = best[0] * frame, best[1] * frame
    lo_f, hi_f = (90.0, 450.0) if female else (55.0, 260.0)
    win = 4 * frame
    lag_lo, lag_hi = int(sample_rate / hi_f), min(int(sample_rate / lo_f), win - 2)
    period_f = np.full(nf, np.nan)
    idx = np.flatnonzero(voiced_f)
    if len(idx) and len(x) > win and lag_hi > lag_lo:
        starts = np.clip(idx * frame + frame // 2 - win // 2, 0, len(x) - win)
        segs = x[starts[:, None] + np.arange(win)]
        segs = (segs - segs.mean(1, keepdims=True)) * np.hanning(win)
        size = _fast_len(2 * win)
        ac = np.fft.irfft(np.abs(np.fft.rfft(segs, size, axis=1)) ** 2, size, axis=1)[:, :win]
        lags = lag_lo + np.argmax(ac[:, lag_lo:lag_hi], axis=1)
        period_f[idx] = median_filter(lags.astype(np.float64), size=5, mode="nearest")
    in_vowel = period_f[best[0]:best[1]]
    in_vowel = in_vowel[np.isfinite(in_vowel)]
    known = np.flatnonzero(np.isfinite(period_f))
    period = float(np.median(in_vowel)) if len(in_vowel) else (
        float(np.median(period_f[known])) if len(known) else sample_rate / (200.0 if female else 120.0))
    if len(known):
        local = np.interp(np.arange(len(x)), known * frame + frame / 2, period_f[known])
    else:
        local = np.full(len(x), period)
    voiced = np.repeat(voiced_f.astype(np.float64), frame)
    voiced = np.pad(voiced, (0, max(0, len(x) - len(voiced))))[: len(x)]
    anchor = a + int(np.argmax(x[a:b])) if b > a else int(np.argmax(x))
    marks = [anchor]
    for direction in (1, -1):
        pos = float(anchor)
        while True:
            step = local[int(np.clip(round(pos), 0, len(x) - 1))]
            pos += direction * step
            c = int(round(pos))
            if c < 0 or c >= len(x):
                break
            if voiced[c] > 0:
                half = max(1, int(step * 0.2))
                w0, w1 = max(0, c - half), min(len(x), c + half + 1)
                c = w0 + int(np.argmax(x[w0:w1]))
                pos = float(c)
            marks.append(c)
    voiced = _smooth_voicing(voiced, len(x), sample_rate)
    return _Syllable(x, np.array(sorted(set(marks))), period, voiced, (a, b))


def _phrases(notes: Sequence[Sung], gap_s: float = 0.3, most: int = 8) -> list[list[Sung]]:
    """The lead's notes grouped into phrases: a new one after a rest of ``gap_s`` or ``most`` words."""
    out: list[list[Sung]] = []
    for note in sorted(notes, key=lambda s: s.start):
        if out and note.start - (out[-1][-1].start + out[-1][-1].dur) < gap_s and len(out[-1]) < most:
            out[-1].append(note)
        else:
            out.append([note])
    return out


def _place(mono: np.ndarray, y: np.ndarray, start: int, limit: int, sample_rate: int) -> None:
    """Add ``y`` at ``start``, cut (with a 30 ms fade) where it would run past ``limit``."""
    limit = min(limit, len(mono))
    if start >= limit:
        return
    if start < 0:
        y, start = y[-start:], 0
    if start + len(y) > limit:
        y = y[: limit - start].copy()
        fade = min(len(y), int(0.03 * sample_rate))
        y[len(y) - fade:] *= np.linspace(1, 0, fade)
    mono[start:start + len(y)] += y


def speak(lead: list[Sung], plan: SongPlan, config: SynthConfig) -> np.ndarray:
    """The spoken vocal, ``(2, frames)``, on the lead's timing: ``plan.voice.style`` "spoken" says each phrase
    with the engine's own prosody from its first note on; "rapped" says each word on its note's onset. Then the
    same pan, echo and reverb as :func:`sing`."""
    sr, n = config.sample_rate, config.frames
    rng = np.random.default_rng([config.seed, plan.index, 8])
    mono = np.zeros(n)
    if plan.voice.style == "rapped":
        notes = sorted(lead, key=lambda s: s.start)
        words = sorted({s.word for s in notes})
        clips, rate = engine_clips(plan.voice, words, spoken=True)
        bank = {w: _resample(c, rate, sr) for w, c in zip(words, clips)}
        for k, note in enumerate(notes):
            nxt = notes[k + 1].start if k + 1 < len(notes) else config.seconds
            start = int(round((note.start - 0.02) * sr))
            limit = int(round(min(nxt + 0.05, note.start + max(note.dur * 1.3, 0.25)) * sr))
            _place(mono, bank[note.word] * (note.vel / 100.0) ** 1.5, start, limit, sr)
    else:
        phrases = _phrases(lead)
        clips, rate = engine_clips(plan.voice, [" ".join(s.word for s in p) for p in phrases], spoken=True)
        for k, (phrase, clip) in enumerate(zip(phrases, clips)):
            nxt = phrases[k + 1][0].start if k + 1 < len(phrases) else config.seconds
            vel = float(np.mean([s.vel for s in phrase]))
            start = int(round(phrase[0].start * sr))
            _place(mono, _resample(clip, rate, sr) * (vel / 100.0) ** 1.5, start, int(round((nxt + 0.2) * sr)), sr)
    pan = plan.voice.pan
    out = np.stack([np.sqrt(0.5 * (1 - pan)) * mono, np.sqrt(0.5 * (1 + pan)) * mono])
    return _vocal_bus(out, plan, sr, rng)
