"""Decode audio: :func:`open_audio`, :func:`audio_info` and :func:`read_slice`.

Shapes: a track is a float32 array shaped ``(channels, time)``; samples are nominally in ``[-1, 1]``.

:func:`open_audio` tries soundfile (libsndfile: WAV, FLAC, OGG/Vorbis/Opus, MP3, AIFF, ...) first and falls
back to ffmpeg (M4A/AAC, WMA, and anything else ffmpeg reads; :mod:`demix.pipeline.io.ffmpeg`). When every
decoder fails, one :class:`AudioError` names the source and carries each decoder's message. Decoding
streams: :meth:`AudioStream.blocks` yields bounded blocks, never the whole track. Sources that ffmpeg must
read from bytes or a file object are first copied to a local temporary file, because MP4/M4A often keeps
its index (``moov``) at the end, which a pipe cannot reach.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import tempfile
from typing import BinaryIO, Iterator

import numpy as np
import soundfile as sf

from demix.pipeline.io.ffmpeg import _open_ffmpeg
from demix.pipeline.io.storage import local_copy
from demix.pipeline.io.stream import (
    _COPY_CHUNK, _SF_ERRORS, AudioError, AudioInfo, AudioStream, _no_frames, _object_name, _remove, _sf_message,
)

__all__ = ["AudioError", "AudioInfo", "AudioStream", "audio_info", "open_audio", "read_slice"]

# Formats whose header frame count libsndfile reports as an estimate, not a promise.
_ESTIMATED_LENGTH_FORMATS = ("MP3",)
# libsndfile reports SF_COUNT_MAX frames when the header does not say (e.g. FLAC written to a pipe).
_SF_UNKNOWN_FRAMES = 2**62


class _SoundfileStream(AudioStream):
    def __init__(self, handle: sf.SoundFile, name: str, cleanup: str | None) -> None:
        frames = int(handle.frames)
        info = AudioInfo(
            sample_rate=int(handle.samplerate), channels=int(handle.channels),
            frames=None if frames >= _SF_UNKNOWN_FRAMES else frames, decoder="soundfile", format=str(handle.format),
        )
        super().__init__(info, name)
        # soundfile seeks back to "where it was + frames read" after every read of a seekable file.
        # libsndfile 1.2.2 seeks MP3 wrongly (past ~8k frames a seek lands on silence), so chunked MP3
        # reads came back with long runs of zeros. Reading strictly sequentially needs no seek at all;
        # hiding seekability makes soundfile skip that bookkeeping (its reads then stop at end of file).
        handle.seekable = lambda: False
        self._handle = handle
        self._cleanup = cleanup

    def _blocks(self, frames: int) -> Iterator[np.ndarray]:
        done = 0
        while True:
            try:
                data = self._handle.read(frames, dtype="float32", always_2d=True)
            except _SF_ERRORS as err:
                raise AudioError(
                    self.name, f"cannot decode {self.name!r} after {done} frames", stage="decode",
                    errors={"soundfile": _sf_message(err)},
                ) from err
            if data.shape[0] == 0:
                break
            done += data.shape[0]
            yield np.ascontiguousarray(data.T)
        if done == 0:
            raise _no_frames(self.name)
        expected = self.info.frames
        if expected and done < expected and self.info.format not in _ESTIMATED_LENGTH_FORMATS:
            raise AudioError(
                self.name, f"{self.name!r} is truncated: its header declares {expected} frames, "
                f"only {done} could be decoded", stage="decode",
            )

    def _release(self) -> None:
        try:
            self._handle.close()
        finally:
            _remove(self._cleanup)


def _seekable_at_start(obj) -> bool:
    try:
        return bool(obj.seekable()) and obj.tell() == 0
    except (AttributeError, OSError, ValueError):
        return False


def _suffix(name: str) -> str:
    ext = os.path.splitext(name)[1]
    return ext if re.fullmatch(r"\.[A-Za-z0-9]{1,8}", ext) else ""


def _spool(chunks, name: str) -> str:
    """Copy a byte source to a local temporary file (for ffmpeg, which needs to seek); return its path."""
    fd, path = tempfile.mkstemp(prefix="demix-audio-", suffix=_suffix(name))
    try:
        with os.fdopen(fd, "wb") as out:
            if isinstance(chunks, (bytes, bytearray, memoryview)):
                out.write(chunks)
            else:
                shutil.copyfileobj(chunks, out, _COPY_CHUNK)
    except OSError as err:
        _remove(path)
        raise AudioError(name, f"cannot read {name!r}: {err}", stage="read") from err
    return path


def _open_soundfile(obj, name: str, cleanup: str | None) -> tuple[AudioStream | None, str]:
    try:
        handle = sf.SoundFile(obj)
    except _SF_ERRORS as err:
        return None, _sf_message(err)
    if handle.frames == 0:
        handle.close()
        _remove(cleanup)
        raise _no_frames(name)
    return _SoundfileStream(handle, name, cleanup), ""


def open_audio(source: str | os.PathLike | BinaryIO | bytes, *, name: str | None = None) -> AudioStream:
    """Open ``source`` for block-wise decoding at its native rate and channel count.

    Args:
        source: a local path, the encoded bytes, or a binary file object (a seekable one, such as an
            fsspec file, is read in place; any other is first copied to a local temporary file).
        name: how errors name the source (default: the path, the file object's name, ``'<bytes>'``).

    Returns:
        An :class:`AudioStream`; close it (or use ``with``).

    Raises:
        AudioError: ``stage='read'`` when the source cannot be read, ``stage='decode'`` when no
            decoder accepts it (with every decoder's message) or it holds no audio frames.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        label = name or "<bytes>"
        data = bytes(source)
        if not data:
            raise _no_frames(label)
        return _open_any(label, sf_input=io.BytesIO(data), path=None, spool_from=data)
    if isinstance(source, (str, os.PathLike)):
        path = os.fsdecode(os.fspath(source))
        label = name or path
        try:
            size = os.stat(path).st_size
            if not os.path.isdir(path):
                open(path, "rb").close()  # unreadable (permissions) is a read error, not a decode error
        except OSError as err:
            raise AudioError(label, f"cannot read {label!r}: {err.strerror or err}", stage="read") from err
        if os.path.isdir(path):
            raise AudioError(label, f"cannot read {label!r}: it is a directory", stage="read")
        if size == 0:
            raise _no_frames(label)
        return _open_any(label, sf_input=path, path=path, spool_from=None)
    if hasattr(source, "read"):
        label = name or _object_name(source)
        if not _seekable_at_start(source):
            path = _spool(source, label)
            try:
                if os.path.getsize(path) == 0:
                    raise _no_frames(label)
                return _open_any(label, sf_input=path, path=path, spool_from=None, cleanup=path)
            except BaseException:
                _remove(path)
                raise
        try:
            empty = not source.read(1)
            source.seek(0)
        except (OSError, ValueError) as err:
            raise AudioError(label, f"cannot read {label!r}: {err}", stage="read") from err
        if empty:
            raise _no_frames(label)
        return _open_any(label, sf_input=source, path=None, spool_from=source)
    raise TypeError(f"open_audio expects a path, bytes or a binary file object, got {type(source).__name__}")


def _open_any(label: str, *, sf_input, path: str | None, spool_from, cleanup: str | None = None) -> AudioStream:
    """Try soundfile on ``sf_input``, then ffmpeg on ``path`` (or on a local copy of ``spool_from``)."""
    errors: dict[str, str] = {}
    stream, errors["soundfile"] = _open_soundfile(sf_input, label, cleanup)
    if stream is not None:
        return stream
    own = None
    if path is None:
        if hasattr(spool_from, "seek"):
            try:
                spool_from.seek(0)
            except (OSError, ValueError) as err:
                raise AudioError(label, f"cannot read {label!r}: {err}", stage="read") from err
        path = own = _spool(spool_from, label)
    try:
        stream, errors["ffmpeg"] = _open_ffmpeg(path, label, own or cleanup)
    except BaseException:
        _remove(own)
        raise
    if stream is not None:
        return stream
    _remove(own)
    raise AudioError(label, f"cannot decode {label!r}", stage="decode", errors=errors)


# --------------------------------------------------------------------------------------------------
# Slices: the one way every reader (datasets, evaluation, remix, exports) reads part of a file
# --------------------------------------------------------------------------------------------------


def audio_info(uri: str) -> AudioInfo:
    """What the decoder reports about ``uri`` (a local path or any fsspec URI), without decoding it.

    Raises:
        StorageError: the URI cannot be read. AudioError: no decoder accepts it.
    """
    with local_copy(uri) as path, open_audio(path, name=uri) as stream:
        return stream.info


def read_slice(uri: str, start_s: float = 0.0, duration_s: float | None = None) -> tuple[np.ndarray, int]:
    """Decode ``duration_s`` seconds of ``uri`` from ``start_s`` (to the end when ``None``) at the file's own
    rate and channel count: ``(float32 (channels, frames), sample_rate)``. Fewer frames come back when the
    file ends first (none past its end). ``uri`` is a local path or any fsspec URI (copied to a local
    temp file first). Formats libsndfile seeks exactly are read in place; others (MP3, whose seeks
    libsndfile 1.2.2 gets wrong, and everything only ffmpeg decodes) are decoded from the start.

    Raises:
        ValueError: a negative start or duration. StorageError: the URI cannot be read.
        AudioError: the file cannot be decoded.
    """
    if start_s < 0 or (duration_s is not None and duration_s < 0):
        raise ValueError(f"read_slice of {uri!r}: start and duration must be >= 0. Found: {start_s}, {duration_s}")
    with local_copy(uri) as path, open_audio(path, name=uri) as stream:
        rate, channels = stream.info.sample_rate, stream.info.channels
        start = round(start_s * rate)
        stop = None if duration_s is None else start + round(duration_s * rate)
        if isinstance(stream, _SoundfileStream) and stream.info.format not in _ESTIMATED_LENGTH_FORMATS:
            try:
                data, _ = sf.read(path, start=start, stop=stop, dtype="float32", always_2d=True)
            except _SF_ERRORS as err:
                raise AudioError(uri, f"cannot decode {uri!r}", stage="decode", errors={"soundfile": _sf_message(err)}) from err
            return np.ascontiguousarray(data.T), rate
        parts, at = [], 0
        for block in stream.blocks(1 << 16):
            lo, hi = max(start - at, 0), block.shape[1] if stop is None else min(stop - at, block.shape[1])
            if hi > lo:
                parts.append(block[:, lo:hi])
            at += block.shape[1]
            if stop is not None and at >= stop:
                break
        return (np.concatenate(parts, axis=1) if parts else np.zeros((channels, 0), np.float32)), rate
