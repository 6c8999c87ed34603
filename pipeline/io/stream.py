"""What every decoder returns and every audio error is: :class:`AudioError`, :class:`AudioInfo`, :class:`AudioStream`.

Shared by :mod:`demix.pipeline.io.decode`, :mod:`demix.pipeline.io.ffmpeg`, :mod:`demix.pipeline.io.conform`
and :mod:`demix.pipeline.io.encode` (which import these names from here; other packages import them from
:mod:`demix.pipeline.io`).

Non-finite samples (NaN, Inf) in decoded audio raise :class:`AudioError` naming the source and the
time of the first bad sample; they are never passed on or silently zeroed.
"""

from __future__ import annotations

import math
import numbers
import os
import re
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import soundfile as sf
import torch

from demix.pipeline.errors import StagedError

__all__ = ["AudioError", "AudioInfo", "AudioStream"]

_STAGES = ("read", "decode", "encode")
_COPY_CHUNK = 1 << 20
_SF_ERRORS = (sf.SoundFileError, RuntimeError, OSError, ValueError, TypeError)


class AudioError(StagedError):
    """Audio that cannot be read, decoded or encoded.

    Attributes:
        source: the file, URI or name the audio came from (or goes to, for ``stage='encode'``).
        message: what went wrong, naming the source.
        stage: ``'read'``, ``'decode'`` or ``'encode'``.
        errors: decoder or encoder name -> its message, e.g. ``{'soundfile': ..., 'ffmpeg': ...}``.

    ``str(err)`` is the message followed by every decoder's message, e.g.
    ``"cannot decode 'foo.ogg': soundfile: Format not recognised; ffmpeg: Invalid data found ..."``.
    Pickles whole (:class:`~demix.pipeline.errors.StagedError`), so Ray ships it intact.
    """

    stages = _STAGES

    def __init__(
        self, source: str, message: str, *, stage: str = "decode", errors: dict[str, str] | None = None
    ) -> None:
        if stage not in _STAGES:
            raise ValueError(f"AudioError stage must be one of {_STAGES}, got {stage!r}")
        source = str(source)
        self.message = message
        self.errors = dict(errors) if errors else {}
        text = message if source in message else f"{source!r}: {message}"
        if self.errors:
            text += ": " + "; ".join(f"{name}: {msg}" for name, msg in self.errors.items())
        super().__init__(text, source=source, stage=stage)


@dataclass(frozen=True)
class AudioInfo:
    """What a decoder reports about a source, before any conversion.

    Attributes:
        sample_rate: native rate in Hz.
        channels: native channel count.
        frames: samples per channel from the header, or None when unknown (ffmpeg, FLAC written to a
            pipe). For MP3
            libsndfile's count can be an estimate; the decoded length is what counts.
        decoder: ``'soundfile'`` or ``'ffmpeg'``.
        format: container as the decoder names it: ``'WAV'``, ``'FLAC'``, ``'OGG'``, ``'MP3'`` (soundfile)
            or ffmpeg's demuxer name such as ``'mov,mp4,m4a,3gp,3g2,mj2'``.
    """

    sample_rate: int
    channels: int
    frames: int | None
    decoder: str
    format: str

    @property
    def duration(self) -> float | None:
        """Length in seconds, or None when :attr:`frames` is unknown."""
        return None if self.frames is None else self.frames / self.sample_rate


class AudioStream:
    """An opened audio source, decoded block by block at its native rate and channel count.

    Use as a context manager (or call :meth:`close`, which is idempotent). :meth:`blocks` may be
    iterated once.

    Attributes:
        info: what the decoder reports.
        name: the source's name used in errors.
    """

    def __init__(self, info: AudioInfo, name: str) -> None:
        self.info = info
        self.name = name
        self._closed = False
        self._started = False

    def blocks(self, frames: int) -> Iterator[np.ndarray]:
        """Yield the audio in order as float32 arrays shaped ``(channels, n)`` with ``1 <= n <= frames``.

        Raises:
            AudioError: (from the iteration) when decoding fails part way or no frame was decoded.
        """
        frames = _positive_int(frames, "frames")
        if self._closed:
            raise ValueError(f"audio stream {self.name!r} is closed")
        if self._started:
            raise RuntimeError(f"blocks() of audio stream {self.name!r} may be iterated only once")
        self._started = True
        return self._blocks(frames)

    def _blocks(self, frames: int) -> Iterator[np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        """Release the decoder, its process and temporary files. Safe to call more than once."""
        if not self._closed:
            self._closed = True
            self._release()

    def _release(self) -> None:
        pass

    def __enter__(self) -> AudioStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.info})"


def _no_frames(name: str) -> AudioError:
    return AudioError(name, f"{name!r} contains no audio frames", stage="decode")


def _one_line(text: str, limit: int = 500) -> str:
    """Squash a decoder's (possibly multi-line) message into one stable line."""
    text = re.sub(r" @ 0x[0-9a-fA-F]+\]", "]", text)
    line = " / ".join(part.strip().rstrip(".") for part in text.splitlines() if part.strip())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _sf_message(err: BaseException) -> str:
    return _one_line(getattr(err, "error_string", None) or str(err) or type(err).__name__)


def _positive_int(value, what: str) -> int:
    """``value`` as a plain int (numpy integers welcome); ValueError unless it is an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def _remove(path: str | None) -> None:
    if path is not None:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def _object_name(obj) -> str:
    for attr in ("full_name", "path", "name"):
        value = getattr(obj, attr, None)
        if isinstance(value, (str, os.PathLike)) and str(value):
            return str(value)
    return f"<{type(obj).__name__}>"


def _check_finite(x: torch.Tensor, offset: int, sample_rate: int, source: str, stage: str = "decode") -> None:
    if x.device.type == "cpu" and x.dtype == torch.float32:
        # fast path: one read-only pass in numpy (max/min propagate NaN and show +-Inf), no temporary
        # tensors and no OpenMP team (torch.isfinite(x).all() is eq + abs + ne + and + all over x)
        a = x.detach().numpy()
        if a.size == 0 or (math.isfinite(float(a.max())) and math.isfinite(float(a.min()))):
            return
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        first = int((~finite).any(dim=0).nonzero()[0, 0]) + offset
        raise AudioError(
            source, f"{source!r} has non-finite samples (NaN or Inf), the first at "
            f"{first / sample_rate:.3f} s (frame {first})", stage=stage,
        )
