"""What the voice engines say: words and phrases as mono clips from espeak-ng, flite or festival (the latter two
built from recordings of human speakers). :func:`espeak_words` says words on one flat pitch (classic's sung
vocal); :func:`engine_clips` has ``voice.engine`` say texts, silence trimmed. :mod:`.voice` moves the clips onto
the melody (sung) or the lead's timing (spoken, rapped)."""

from __future__ import annotations

import io
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import soundfile as sf

from demix.pipeline.data.synth.config import SynthError, require_engine, require_tool
from demix.pipeline.data.synth.plan import Voice


def espeak_words(words: Sequence[str], voice: Voice) -> tuple[list[np.ndarray], int]:
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


def _trim(x: np.ndarray, rate: int) -> np.ndarray:
    """``x`` without its leading and trailing silence (10 ms kept before, 20 ms after the sound)."""
    hop = max(1, int(0.005 * rate))
    nb = len(x) // hop
    if nb == 0:
        return x
    frames = np.abs(x[: nb * hop]).reshape(nb, hop).max(1)
    loud = np.flatnonzero(frames > 3e-3 * max(frames.max(), 1e-9))
    if not len(loud):
        return x
    return x[max(0, (loud[0] - 2) * hop):(loud[-1] + 5) * hop]


def _stretch(voice: Voice) -> float:
    """flite's and festival's duration stretch for ``voice.speed`` (espeak-ng words per minute)."""
    return round(160.0 / max(voice.speed, 60), 3)


def _read_mono(path: Path) -> tuple[np.ndarray, int]:
    x, rate = sf.read(path, dtype="float32")
    return (x if x.ndim == 1 else x.mean(1)), rate


def _unwrap(x: np.ndarray) -> np.ndarray:
    """Undo 16-bit wrap-around (a jump of about two full scales between two samples, which festival's diphone
    voices write now and then on loud vowels: a click); peak kept at most 1."""
    if len(x) < 2 or float(np.abs(np.diff(x)).max()) <= 1.0:
        return x
    y = np.unwrap(x.astype(np.float64), discont=1.0, period=2.0)
    return (y / max(1.0, float(np.abs(y).max()))).astype(np.float32)


def _espeak_say(texts: Sequence[str], voice: Voice) -> tuple[list[np.ndarray], int]:
    """Each text spoken by espeak-ng with its own intonation."""
    exe = require_tool("espeak-ng", "espeak-ng")
    out, rate = [], 22050
    for text in texts:
        cmd = [exe, "--stdout", "-v", voice.espeak, "-s", str(voice.speed), "-p", str(voice.pitch), text]
        proc = subprocess.run(cmd, capture_output=True)
        if proc.returncode != 0 or not proc.stdout:
            raise SynthError(f"espeak-ng failed (exit {proc.returncode}): {proc.stderr.decode(errors='replace').strip()[-300:]}")
        x, rate = sf.read(io.BytesIO(proc.stdout), dtype="float32")
        out.append(x if x.ndim == 1 else x.mean(1))
    return out, rate


def _flite_say(texts: Sequence[str], voice: Voice) -> tuple[list[np.ndarray], int]:
    require_engine("flite")
    out, rate = [], 16000
    with tempfile.TemporaryDirectory(prefix="demix-flite-") as tmp:
        for k, text in enumerate(texts):
            wav = Path(tmp) / f"{k}.wav"
            cmd = ["flite", "-voice", str(voice.speaker), "--setf", f"duration_stretch={_stretch(voice)}",
                   "-t", text, "-o", str(wav)]
            proc = subprocess.run(cmd, capture_output=True, stdin=subprocess.DEVNULL)
            if proc.returncode != 0 or not wav.is_file():
                raise SynthError(f"flite failed (exit {proc.returncode}): {proc.stderr.decode(errors='replace').strip()[-300:]}")
            x, rate = _read_mono(wav)
            out.append(x)
    return out, rate


def _festival_say(texts: Sequence[str], voice: Voice) -> tuple[list[np.ndarray], int]:
    """All texts in one ``festival -b`` run (one start, one voice load)."""
    require_engine("festival", voice.speaker)
    out, rate = [], 16000
    with tempfile.TemporaryDirectory(prefix="demix-festival-") as tmp:
        lines = [f"(voice_{voice.speaker})", f"(Parameter.set 'Duration_Stretch {_stretch(voice)})"]
        wavs = [Path(tmp) / f"{k}.wav" for k in range(len(texts))]
        for text, wav in zip(texts, wavs):
            clean = "".join(c for c in text if c.isalnum() or c in " ',.")
            lines.append(f'(utt.save.wave (utt.synth (Utterance Text "{clean}")) "{wav}" \'riff)')
        script = Path(tmp) / "say.scm"
        script.write_text("\n".join(lines) + "\n")
        proc = subprocess.run(["festival", "-b", str(script)], capture_output=True, stdin=subprocess.DEVNULL)
        missing = [w for w in wavs if not w.is_file()]
        if proc.returncode != 0 or missing:
            message = (proc.stderr + proc.stdout).decode(errors="replace").strip()[-300:]
            raise SynthError(f"festival failed (exit {proc.returncode}, {len(missing)} of {len(wavs)} texts unsaid): {message}")
        for wav in wavs:
            x, rate = _read_mono(wav)
            out.append(_unwrap(x))
    return out, rate


def engine_clips(voice: Voice, texts: Sequence[str], spoken: bool) -> tuple[list[np.ndarray], int]:
    """Each of ``texts`` said by ``voice.engine`` (espeak, flite or festival) with ``voice.speaker``, silence
    trimmed; mono float32 at the returned rate."""
    if voice.engine == "espeak":
        clips, rate = _espeak_say(texts, voice) if spoken else espeak_words(texts, voice)
    elif voice.engine == "flite":
        clips, rate = _flite_say(texts, voice)
    elif voice.engine == "festival":
        clips, rate = _festival_say(texts, voice)
    else:
        raise SynthError(f"voice engine {voice.engine!r} cannot speak")
    return [_trim(c, rate) for c in clips], rate
