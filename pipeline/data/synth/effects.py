"""Per-stem effects and gain automation for the varied profiles (:data:`~.config.PROFILES`): every song draws a
chain per stem (:func:`plan_effects`) and slow gain curves (:func:`plan_automation`); :func:`apply_effects` and
:func:`apply_automation` run on each stem *before* the mix, so the mixture stays the exact sum of the stems.

The chain, in order: high-pass and low-pass filters (Butterworth), an EQ of low/high shelves and peaking
biquads (RBJ cookbook), then saturation (tanh, cubic soft clip or asymmetric tanh, with drive and dry/wet) and
compression (an envelope follower with attack and release, peak-linked) in either order, stereo width, and a
reverb: convolution with a synthetic room (early reflections, a decorrelated stereo noise tail that decays
exponentially with its RT60, faster above a crossover, after a pre-delay). Stems of one song often share one room.
Only numpy and scipy."""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import signal

from demix.pipeline.stems import STEMS

Effect = Mapping[str, object]


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def _room(rng: np.random.Generator, strength: float) -> dict[str, object]:
    rt60 = _log_uniform(rng, 0.15, 0.4 + 2.6 * strength)
    return {"type": "reverb", "rt60": round(rt60, 3), "predelay_ms": round(float(rng.uniform(0, 60)), 1),
            "hf_ratio": round(float(rng.uniform(0.25, 0.8)), 3), "crossover_hz": round(_log_uniform(rng, 1500, 6000), 1),
            "reflections": int(rng.integers(3, 12)), "ir_seed": int(rng.integers(2**31))}


def plan_effects(rng: np.random.Generator, strength: float, presence: Mapping[str, bool]) -> dict[str, tuple[Effect, ...]]:
    """A random chain per present stem (left-out stems get none). ``strength`` (0..1) scales how often each effect
    is used and how far it goes. Every value is a plain number or string (JSON-ready)."""
    s = float(strength)
    song_room = _room(rng, s)
    out: dict[str, tuple[Effect, ...]] = {}
    for stem in STEMS:
        chain: list[dict[str, object]] = []
        if rng.random() < 0.5 * s:
            chain.append({"type": "highpass", "freq": round(_log_uniform(rng, 20, 40 + 260 * s), 1)})
        if rng.random() < 0.35 * s:
            chain.append({"type": "lowpass", "freq": round(_log_uniform(rng, 16000 - 12000 * s, 18000), 1)})
        for kind, lo, hi in (("lowshelf", 60, 400), ("highshelf", 2000, 10000)):
            if rng.random() < 0.45 * s:
                chain.append({"type": kind, "freq": round(_log_uniform(rng, lo, hi), 1),
                              "gain_db": round(float(rng.uniform(-8, 8) * s), 2)})
        for _ in range(int(rng.integers(0, 4)) if rng.random() < 0.8 * s else 0):
            chain.append({"type": "peak", "freq": round(_log_uniform(rng, 80, 9000), 1),
                          "gain_db": round(float(rng.uniform(-10, 10) * s), 2), "q": round(_log_uniform(rng, 0.4, 5.0), 3)})
        dynamics: list[dict[str, object]] = []
        if rng.random() < (0.45 if stem != "vocals" else 0.3) * s:
            dynamics.append({"type": "saturate", "kind": str(rng.choice(["tanh", "soft", "asym"])),
                             "drive_db": round(float(rng.uniform(2, 6 + 18 * s)), 2),
                             "mix": round(float(rng.uniform(0.3, 1.0)), 3)})
        if rng.random() < 0.7 * s:
            dynamics.append({"type": "compress", "threshold_db": round(float(rng.uniform(-6 - 20 * s, -3)), 2),
                             "ratio": round(_log_uniform(rng, 1.5, 2 + 8 * s), 3),
                             "attack_ms": round(_log_uniform(rng, 0.5, 40), 3),
                             "release_ms": round(_log_uniform(rng, 30, 500), 2)})
        if len(dynamics) == 2 and rng.random() < 0.5:
            dynamics.reverse()
        chain += dynamics
        if rng.random() < 0.3 * s:
            chain.append({"type": "width", "width": round(float(rng.uniform(0.0, 1.6)), 3)})
        if rng.random() < (0.85 if stem == "vocals" else 0.6) * max(s, 0.3):
            room = song_room if rng.random() < 0.6 else _room(rng, s)
            chain.append({**room, "wet_db": round(float(rng.uniform(-24, -14 + 10 * s)), 2)})
        if presence.get(stem, False):
            out[stem] = tuple(chain)
    return out


def plan_automation(rng: np.random.Generator, seconds: float,
                    presence: Mapping[str, bool]) -> dict[str, tuple[tuple[float, float], ...]]:
    """Slow gain curves, ``(seconds, dB)`` points joined smoothly, per present stem and for the whole mix
    (``"mix"``, applied to every stem alike): rides of a few dB, now and then a fade in or out."""
    out: dict[str, tuple[tuple[float, float], ...]] = {}
    for stem in (*STEMS, "mix"):
        depth = float(rng.uniform(1.0, 7.0 if stem != "mix" else 4.0))
        points, t, level = [], 0.0, float(rng.uniform(-depth, depth))
        while True:
            points.append((round(t, 3), round(level, 2)))
            if t >= seconds:
                break
            t = min(seconds, t + float(rng.uniform(1.0, 4.0)))
            level = float(np.clip(level + rng.normal(0, depth / 1.5), -depth, depth))
        for fade_in in (True, False):  # now and then a fade in or out
            if rng.random() < 0.15:
                at = float(rng.uniform(0.5, min(3.0, seconds / 3)))
                at = at if fade_in else seconds - at
                level = round(float(np.interp(at, [p for p, _ in points], [v for _, v in points])), 2)
                if fade_in:
                    points = [(0.0, -24.0), (round(at, 3), level)] + [(p, v) for p, v in points if p > at]
                else:
                    points = [(p, v) for p, v in points if p < at] + [(round(at, 3), level), (round(seconds, 3), -24.0)]
        if stem == "mix" or presence.get(stem, False):
            out[stem] = tuple(points)
    return out


def gain_curve(points: Sequence[tuple[float, float]], frames: int, sample_rate: int) -> np.ndarray:
    """The linear gain ``(frames,)`` of automation ``points``: dB joined by smoothstep between points."""
    times = np.array([p[0] for p in points], dtype=np.float64)
    values = np.array([p[1] for p in points], dtype=np.float64)
    t = np.arange(frames) / sample_rate
    if len(points) == 1:
        return np.full(frames, 10 ** (values[0] / 20))
    k = np.clip(np.searchsorted(times, t, side="right") - 1, 0, len(times) - 2)
    span = np.maximum(times[k + 1] - times[k], 1e-9)
    u = np.clip((t - times[k]) / span, 0.0, 1.0)
    u = u * u * (3 - 2 * u)
    return 10 ** ((values[k] + (values[k + 1] - values[k]) * u) / 20)


def apply_automation(x: np.ndarray, points: Sequence[tuple[float, float]], sample_rate: int) -> np.ndarray:
    return x * gain_curve(points, x.shape[-1], sample_rate)


# --- the effects ----------------------------------------------------------------------------------------------


def _nyquist_safe(freq: float, sample_rate: int) -> float:
    return float(min(max(freq, 10.0), 0.45 * sample_rate))


def _biquad(kind: str, freq: float, gain_db: float, q: float, sample_rate: int) -> np.ndarray:
    """RBJ cookbook peaking / shelving biquad as one second-order section."""
    a = 10 ** (gain_db / 40)
    w0 = 2 * math.pi * _nyquist_safe(freq, sample_rate) / sample_rate
    cos, sin = math.cos(w0), math.sin(w0)
    if kind == "peak":
        alpha = sin / (2 * q)
        b = (1 + alpha * a, -2 * cos, 1 - alpha * a)
        den = (1 + alpha / a, -2 * cos, 1 - alpha / a)
    else:  # shelves with slope 1
        alpha = sin / 2 * math.sqrt(2)
        sq = 2 * math.sqrt(a) * alpha
        if kind == "lowshelf":
            b = (a * ((a + 1) - (a - 1) * cos + sq), 2 * a * ((a - 1) - (a + 1) * cos), a * ((a + 1) - (a - 1) * cos - sq))
            den = ((a + 1) + (a - 1) * cos + sq, -2 * ((a - 1) + (a + 1) * cos), (a + 1) + (a - 1) * cos - sq)
        else:
            b = (a * ((a + 1) + (a - 1) * cos + sq), -2 * a * ((a - 1) + (a + 1) * cos), a * ((a + 1) + (a - 1) * cos - sq))
            den = ((a + 1) - (a - 1) * cos + sq, 2 * ((a - 1) - (a + 1) * cos), (a + 1) - (a - 1) * cos - sq)
    return np.array([[*(v / den[0] for v in b), 1.0, den[1] / den[0], den[2] / den[0]]])


def _saturate(x: np.ndarray, kind: str, drive_db: float, mix: float) -> np.ndarray:
    peak = float(np.abs(x).max())
    if peak <= 0:
        return x
    u = x / peak
    g = 10 ** (drive_db / 20)
    if kind == "tanh":
        y = np.tanh(g * u) / math.tanh(g)
    elif kind == "soft":
        v = np.clip(g * u, -1.0, 1.0)
        y = (1.5 * v - 0.5 * v**3)
    else:  # asymmetric: even harmonics
        bias = 0.25
        y = (np.tanh(g * u + bias) - math.tanh(bias)) / math.tanh(g)
        y -= y.mean(axis=-1, keepdims=True)
    return peak * ((1 - mix) * u + mix * y)


def _compress(x: np.ndarray, sample_rate: int, threshold_db: float, ratio: float, attack_ms: float,
              release_ms: float) -> np.ndarray:
    """Feed-forward compressor on a peak-linked envelope (hop of about 0.7 ms), threshold relative to the stem's
    loudest 50 ms."""
    hop = max(1, sample_rate // 1500)
    n = x.shape[-1]
    nb = -(-n // hop)
    mono = np.pad(np.abs(x).max(axis=0), (0, nb * hop - n))
    env = mono.reshape(nb, hop).max(axis=1)
    level = 20 * np.log10(env + 1e-9)
    win = max(1, int(0.05 * sample_rate / hop))
    loud = np.convolve(env**2, np.full(win, 1.0 / win), mode="same")
    top = 10 * math.log10(float(loud.max()) + 1e-18)
    over = np.maximum(level - (top + threshold_db), 0.0) * (1 - 1 / ratio)
    att = math.exp(-hop / max(1e-6, attack_ms * 1e-3 * sample_rate))
    rel = math.exp(-hop / max(1e-6, release_ms * 1e-3 * sample_rate))
    # y[k] = c y[k-1] + (1 - c) over[k] with c = att while the reduction rises, rel while it falls
    reduction = np.empty(nb)
    y = 0.0
    for k, target in enumerate(over.tolist()):
        c = att if target > y else rel
        y = c * y + (1 - c) * target
        reduction[k] = y
    gain = 10 ** (-np.interp(np.arange(n), np.arange(nb) * hop + hop / 2, reduction) / 20)
    return x * gain


@functools.lru_cache(maxsize=16)
def _room_ir(sample_rate: int, rt60: float, predelay_ms: float, hf_ratio: float, crossover_hz: float,
             reflections: int, ir_seed: int) -> np.ndarray:
    """A stereo room impulse response ``(2, length)`` with unit energy per channel."""
    rng = np.random.default_rng(ir_seed)
    length = int(min(1.1 * rt60, 4.0) * sample_rate) + 1
    t = np.arange(length) / sample_rate
    noise = rng.standard_normal((2, length))
    sos = signal.butter(2, _nyquist_safe(crossover_hz, sample_rate), btype="low", fs=sample_rate, output="sos")
    low = signal.sosfilt(sos, noise, axis=-1)
    high = noise - low
    tail = low * np.exp(-6.9 * t / rt60) + high * np.exp(-6.9 * t / (rt60 * hf_ratio))
    onset = np.clip(t / 0.01, 0, 1)  # the diffuse tail builds up over 10 ms
    tail *= onset
    early = np.zeros((2, length))
    for _ in range(reflections):
        d = int(rng.uniform(0.003, 0.08) * sample_rate)
        if d < length:
            early[:, d] += rng.choice([-1.0, 1.0], size=2) * rng.uniform(0.3, 1.0) * math.exp(-6.9 * d / sample_rate / rt60)
    ir = tail / np.sqrt((tail**2).sum(axis=-1, keepdims=True)) + 0.5 * early
    ir /= np.sqrt((ir**2).sum(axis=-1, keepdims=True)) + 1e-12
    return np.pad(ir, ((0, 0), (int(predelay_ms * 1e-3 * sample_rate), 0)))


def _reverb(x: np.ndarray, sample_rate: int, effect: Effect) -> np.ndarray:
    ir = _room_ir(sample_rate, float(effect["rt60"]), float(effect["predelay_ms"]), float(effect["hf_ratio"]),
                  float(effect["crossover_hz"]), int(effect["reflections"]), int(effect["ir_seed"]))
    mid = x.mean(axis=0)
    wet = signal.fftconvolve(mid[None, :], ir, axes=-1)[:, : x.shape[-1]]
    return x + wet * 10 ** (float(effect["wet_db"]) / 20)


def apply_effects(x: np.ndarray, chain: Sequence[Effect], sample_rate: int) -> np.ndarray:
    """Run ``chain`` (from :func:`plan_effects`) on one stem ``(2, frames)``; float64 out."""
    y = np.asarray(x, dtype=np.float64)
    for effect in chain:
        kind = effect["type"]
        if kind in ("highpass", "lowpass"):
            sos = signal.butter(2, _nyquist_safe(float(effect["freq"]), sample_rate), btype=kind[:-4],
                                fs=sample_rate, output="sos")
            y = signal.sosfilt(sos, y, axis=-1)
        elif kind in ("peak", "lowshelf", "highshelf"):
            sos = _biquad(kind, float(effect["freq"]), float(effect["gain_db"]), float(effect.get("q", 0.707)),
                          sample_rate)
            y = signal.sosfilt(sos, y, axis=-1)
        elif kind == "saturate":
            y = _saturate(y, str(effect["kind"]), float(effect["drive_db"]), float(effect["mix"]))
        elif kind == "compress":
            y = _compress(y, sample_rate, float(effect["threshold_db"]), float(effect["ratio"]),
                          float(effect["attack_ms"]), float(effect["release_ms"]))
        elif kind == "width":
            mid, side = 0.5 * (y[0] + y[1]), 0.5 * (y[0] - y[1]) * float(effect["width"])
            y = np.stack([mid + side, mid - side])
        elif kind == "reverb":
            y = _reverb(y, sample_rate, effect)
        else:
            raise ValueError(f"unknown effect {kind!r}")
    if not np.all(np.isfinite(y)):
        raise ValueError(f"effect chain gave non-finite audio: {[e['type'] for e in chain]}")
    return y
