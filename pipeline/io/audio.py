"""Decode, conform and encode audio: the only module that touches audio files.

Shapes: a track is a float32 array or tensor shaped ``(channels, time)``; samples are nominally in
``[-1, 1]``.

Decoding
    :func:`open_audio` tries soundfile (libsndfile: WAV, FLAC, OGG/Vorbis/Opus, MP3, AIFF, ...) first
    and falls back to ffmpeg (M4A/AAC, WMA, and anything else ffmpeg reads). When every decoder fails,
    one :class:`AudioError` names the source and carries each decoder's message. Decoding streams:
    :meth:`AudioStream.blocks` yields bounded blocks, never the whole track. Sources that ffmpeg must
    read from bytes or a file object are first copied to a local temporary file, because MP4/M4A
    often keeps its index (``moov``) at the end, which a pipe cannot reach.

Channel policy (what every track becomes before separation)
    - as many channels as the target: kept unchanged;
    - mono: duplicated to every target channel (mono -> identical left and right);
    - any other count (stereo to mono, 5.1 or 8 channels to stereo, ...): the plain mean over all
      channels, duplicated to every target channel. This is deliberately not an ITU 5.1 downmix: the
      LFE and surround channels weigh as much as the front ones, and the result is mono-compatible.

Rate policy
    Any rate is resampled to the target rate with :func:`torchaudio.functional.resample` (default
    windowed-sinc interpolation, no-op when the rates are equal). The streaming path
    (:func:`stream_conformed`) reproduces the whole-track resample block by block, to within float
    rounding, and with exactly the same output length. That length follows torchaudio, which computes
    ``ceil(n_in * target_rate / rate)`` in float32: for tracks longer than about six minutes it can be
    one sample shorter than the exact integer ceiling.

Non-finite samples (NaN, Inf) in decoded audio raise :class:`AudioError` naming the source and the
time of the first bad sample; they are never passed on or silently zeroed.

Encoding and clipping (see :class:`Encoding`)
    - ``clip='rescale'`` (the default, as in demucs ``save_audio``): when the peak of the whole track
      times 1.01 exceeds 1, the whole track is divided by ``1.01 * peak``; otherwise it is written
      unchanged. The waveform's shape is preserved. :class:`AudioWriter` spools blocks to a local
      temporary file until :meth:`AudioWriter.close`, because the peak is known only at the end.
    - ``clip='clamp'``: each sample is clamped to ``+-(1 - 2**-15)``, the largest value 16-bit PCM holds.
    - ``clip='none'``: samples are written as they are. Only 32-bit float WAV can store values beyond
      ``[-1, 1]``; integer PCM (16/24 bit) saturates at full scale (never wraps around).
"""

from __future__ import annotations

import collections
import io
import json
import math
import numbers
import os
import re
import shutil
import struct
import subprocess
import tempfile
import threading
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import BinaryIO, Iterator

import numpy as np
import soundfile as sf
import torch
import torchaudio

from demix.pipeline.io.storage import local_copy

__all__ = [
    "AudioError",
    "AudioInfo",
    "AudioStream",
    "AudioWriter",
    "Encoding",
    "conform",
    "load_audio",
    "open_audio",
    "save_audio",
    "stream_conformed",
]

_STAGES = ("read", "decode", "encode")
_PROBE_TIMEOUT_S = 120.0
_COPY_CHUNK = 1 << 20
# Largest magnitude 16-bit PCM stores (32767 / 32768), exact in float32.
_CLAMP_LIMIT = 1.0 - 2.0**-15
_MP3_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)
# Formats whose header frame count libsndfile reports as an estimate, not a promise.
_ESTIMATED_LENGTH_FORMATS = ("MP3",)
# libsndfile reports SF_COUNT_MAX frames when the header does not say (e.g. FLAC written to a pipe).
_SF_UNKNOWN_FRAMES = 2**62
_SF_ERRORS = (sf.SoundFileError, RuntimeError, OSError, ValueError, TypeError)


class AudioError(Exception):
    """Audio that cannot be read, decoded or encoded.

    Attributes:
        source: the file, URI or name the audio came from (or goes to, for ``stage='encode'``).
        message: what went wrong, naming the source.
        stage: ``'read'``, ``'decode'`` or ``'encode'``.
        errors: decoder or encoder name -> its message, e.g. ``{'soundfile': ..., 'ffmpeg': ...}``.

    ``str(err)`` is the message followed by every decoder's message, e.g.
    ``"cannot decode 'foo.ogg': soundfile: Format not recognised; ffmpeg: Invalid data found ..."``.
    """

    def __init__(
        self, source: str, message: str, *, stage: str = "decode", errors: dict[str, str] | None = None
    ) -> None:
        if stage not in _STAGES:
            raise ValueError(f"AudioError stage must be one of {_STAGES}, got {stage!r}")
        self.source = str(source)
        self.message = message
        self.stage = stage
        self.errors = dict(errors) if errors else {}
        text = message if self.source in message else f"{self.source!r}: {message}"
        if self.errors:
            text += ": " + "; ".join(f"{name}: {msg}" for name, msg in self.errors.items())
        super().__init__(text)

    def __reduce__(self):
        # Keyword-only arguments do not survive the default exception pickling (Ray ships errors).
        return (_rebuild_audio_error, (self.source, self.message, self.stage, self.errors))


def _rebuild_audio_error(source: str, message: str, stage: str, errors: dict[str, str]) -> AudioError:
    return AudioError(source, message, stage=stage, errors=errors)


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


# --------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------


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


class _FfmpegStream(AudioStream):
    def __init__(self, ffmpeg: str, path: str, info: AudioInfo, name: str, cleanup: str | None) -> None:
        super().__init__(info, name)
        self._cmd = [
            ffmpeg, "-nostdin", "-hide_banner", "-v", "error", "-xerror", "-i", _ffmpeg_url(path),
            "-map", "0:a:0", "-f", "f32le", "-acodec", "pcm_f32le",
            "-ac", str(info.channels), "-ar", str(info.sample_rate), "pipe:1",
        ]
        self._url = _ffmpeg_url(path)
        self._cleanup = cleanup
        self._proc: subprocess.Popen | None = None
        self._stderr: collections.deque[str] = collections.deque(maxlen=40)
        self._drain: threading.Thread | None = None

    def _fail(self, done: int, message: str) -> AudioError:
        return AudioError(
            self.name, f"cannot decode {self.name!r} (ffmpeg failed after {done} frames)", stage="decode",
            errors={"ffmpeg": message},
        )

    def _blocks(self, frames: int) -> Iterator[np.ndarray]:
        channels = self.info.channels
        frame_bytes = 4 * channels
        want = frames * frame_bytes
        try:
            self._proc = subprocess.Popen(
                self._cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
        except OSError as err:
            raise self._fail(0, f"cannot run ffmpeg: {err}") from err
        self._drain = threading.Thread(target=self._read_stderr, args=(self._proc.stderr,), daemon=True)
        self._drain.start()
        done = 0
        tail = b""
        try:
            while True:
                chunk = self._proc.stdout.read(want)  # blocks until `want` bytes or end of output
                if not chunk:
                    break
                data = tail + chunk
                usable = len(data) - len(data) % frame_bytes
                tail = data[usable:]
                if usable:
                    block = np.frombuffer(data[:usable], dtype="<f4").reshape(-1, channels).T
                    done += block.shape[1]
                    yield np.ascontiguousarray(block, dtype=np.float32)
            code = self._proc.wait()
            self._drain.join()
            if code != 0:
                raise self._fail(done, self._stderr_text() or f"ffmpeg exited with code {code}")
            if done == 0:
                raise _no_frames(self.name)
        finally:
            self._stop()

    def _read_stderr(self, pipe) -> None:
        for raw in iter(pipe.readline, b""):
            self._stderr.append(raw.decode("utf-8", "replace"))

    def _stderr_text(self) -> str:
        return _one_line("".join(self._stderr).replace(f"{self._url}: ", ""))

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if self._drain is not None:
            self._drain.join()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()

    def _release(self) -> None:
        try:
            self._stop()
        finally:
            _remove(self._cleanup)


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


def _ffmpeg_url(path: str) -> str:
    # The file: protocol keeps names such as "live: take 2.m4a" from being read as a protocol.
    return "file:" + os.path.abspath(path)


def _object_name(obj) -> str:
    for attr in ("full_name", "path", "name"):
        value = getattr(obj, attr, None)
        if isinstance(value, (str, os.PathLike)) and str(value):
            return str(value)
    return f"<{type(obj).__name__}>"


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


def _open_ffmpeg(path: str, name: str, cleanup: str | None) -> tuple[AudioStream | None, str]:
    ffmpeg, ffprobe = shutil.which("ffmpeg"), shutil.which("ffprobe")
    if ffmpeg is None:
        return None, "ffmpeg not found on PATH; install ffmpeg to decode M4A/AAC and other formats libsndfile cannot read"
    if ffprobe is None:
        return None, "ffprobe not found on PATH; install ffmpeg (which ships ffprobe) to decode M4A/AAC and other formats"
    url = _ffmpeg_url(path)
    cmd = [
        ffprobe, "-v", "error", "-select_streams", "a:0",
        "-show_entries", "stream=sample_rate,channels:format=format_name", "-of", "json", url,
    ]
    try:
        res = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=_PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return None, f"ffprobe gave no answer within {_PROBE_TIMEOUT_S:.0f} s"
    except OSError as err:
        return None, f"cannot run ffprobe: {err}"
    if res.returncode != 0:
        text = res.stderr.decode("utf-8", "replace").replace(f"{url}: ", "")
        return None, _one_line(text) or f"ffprobe exited with code {res.returncode}"
    try:
        probe = json.loads(res.stdout or b"{}")
        streams = probe.get("streams") or []
        if not streams:
            return None, "no audio stream found"
        rate, channels = int(streams[0]["sample_rate"]), int(streams[0]["channels"])
        fmt = str((probe.get("format") or {}).get("format_name", "unknown"))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        return None, f"unexpected ffprobe output ({err})"
    if rate <= 0 or channels <= 0:
        return None, f"ffprobe reports {rate} Hz and {channels} channels"
    info = AudioInfo(sample_rate=rate, channels=channels, frames=None, decoder="ffmpeg", format=fmt)
    return _FfmpegStream(ffmpeg, path, info, name, cleanup), ""


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
# Channel and rate policy
# --------------------------------------------------------------------------------------------------


def _check_target(target_rate: int, target_channels: int) -> tuple[int, int]:
    return _positive_int(target_rate, "target_rate"), _positive_int(target_channels, "target_channels")


def _as_tensor(wav: np.ndarray | torch.Tensor, what: str = "audio") -> torch.Tensor:
    """A float32 tensor shaped ``(channels, time)`` sharing memory with ``wav`` where possible."""
    if isinstance(wav, np.ndarray):
        if not np.issubdtype(wav.dtype, np.floating):
            raise TypeError(f"Expected floating point {what}. Found dtype: {wav.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32))
    elif isinstance(wav, torch.Tensor):
        if not wav.is_floating_point():
            raise TypeError(f"Expected floating point {what}. Found dtype: {wav.dtype}")
        x = wav.detach().to(torch.float32)
    else:
        raise TypeError(f"Expected a numpy array or torch tensor for {what}. Found: {type(wav).__name__}")
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"Expected {what} shaped (channels, time). Found: {tuple(x.shape)}")
    return x


def _check_finite(x: torch.Tensor, offset: int, sample_rate: int, source: str, stage: str = "decode") -> None:
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        first = int((~finite).any(dim=0).nonzero()[0, 0]) + offset
        raise AudioError(
            source, f"{source!r} has non-finite samples (NaN or Inf), the first at "
            f"{first / sample_rate:.3f} s (frame {first})", stage=stage,
        )


def _mix(x: torch.Tensor, target_channels: int) -> torch.Tensor:
    """Channel policy, first half: ``(c, n) -> (target_channels or 1, n)``; 1 means 'spread later'."""
    if x.shape[0] == target_channels or x.shape[0] == 1:
        return x
    return x.mean(dim=0, keepdim=True)


def _spread(x: torch.Tensor, target_channels: int) -> torch.Tensor:
    """Channel policy, second half: duplicate a single channel to ``target_channels``."""
    if x.shape[0] == target_channels:
        return x.contiguous()
    return x.expand(target_channels, -1).contiguous()


def conform(
    wav: np.ndarray | torch.Tensor,
    sample_rate: int,
    *,
    target_rate: int,
    target_channels: int = 2,
    source: str = "<memory>",
) -> torch.Tensor:
    """Apply the channel and rate policy (module docstring) to a whole track.

    Args:
        wav: ``(channels, time)`` floating point samples.
        sample_rate: rate of ``wav`` in Hz.
        source: how errors name the audio.

    Returns:
        float32 tensor ``(target_channels, ceil(time * target_rate / sample_rate))``, on ``wav``'s device.

    Raises:
        AudioError: ``stage='decode'`` when ``wav`` holds NaN or Inf.
    """
    target_rate, target_channels = _check_target(target_rate, target_channels)
    sample_rate = _positive_int(sample_rate, "sample_rate")
    x = _as_tensor(wav)
    _check_finite(x, 0, sample_rate, source)
    x = _mix(x, target_channels)
    if sample_rate != target_rate:
        x = torchaudio.functional.resample(x, sample_rate, target_rate)
    return _spread(x, target_channels)


@lru_cache(maxsize=16)
def _resampler(orig: int, new: int) -> torchaudio.transforms.Resample:
    # Same defaults as torchaudio.functional.resample; the kernel is computed once per rate pair.
    return torchaudio.transforms.Resample(orig, new)


def _resampled_length(frames: int, orig: int, new: int) -> int:
    """Samples torchaudio's resample returns for ``frames`` input samples, reproduced exactly.

    torchaudio evaluates ``ceil(new * frames / orig)`` (rates divided by their gcd) through a float32
    tensor, so beyond about 2**24 output samples it can differ by one from the exact integer ceiling.
    """
    if orig == new:
        return frames
    g = math.gcd(orig, new)
    return int(torch.ceil(torch.as_tensor(new // g * frames / (orig // g))).long())


class _StreamResampler:
    """Resample a signal fed in blocks exactly like one torchaudio resample of the whole signal.

    torchaudio's resampler is a strided convolution: output frame ``j`` (``new`` samples after the
    rates are divided by their gcd) reads input ``[j * orig - width, (j + 1) * orig + width)``, with
    zeros outside the signal. Each call resamples a segment that starts ``ctx`` samples (a multiple of
    ``orig``) before the first pending frame and ends ``ctx`` after the last frame it can finish, and
    keeps only the frames whose whole window lies inside the segment. The first segment is preceded
    by ``ctx`` explicit zeros, which is exactly torchaudio's left padding.
    """

    def __init__(self, orig_rate: int, new_rate: int) -> None:
        self.identity = orig_rate == new_rate
        self.orig_rate, self.new_rate = orig_rate, new_rate
        g = math.gcd(orig_rate, new_rate)
        self.orig, self.new = orig_rate // g, new_rate // g
        self.n_in = 0
        if self.identity:
            return
        self._t = _resampler(orig_rate, new_rate)
        self.k = max(1, math.ceil(self._t.width / self.orig))
        self.ctx = self.k * self.orig
        self._buf: torch.Tensor | None = None  # input from global index _buf_start on
        self._buf_start = -self.ctx
        self._next = 0  # next output frame

    def feed(self, x: torch.Tensor) -> torch.Tensor | None:
        """Add ``(c, n)`` input; return the output samples that are now final, if any."""
        self.n_in += x.shape[1]
        if self.identity:
            return x
        if self._buf is None:
            self._buf = torch.cat([x.new_zeros(x.shape[0], self.ctx), x], dim=1)
        else:
            self._buf = torch.cat([self._buf, x], dim=1)
        last = self.n_in // self.orig - self.k  # frames < last have their whole window available
        if last <= self._next:
            return None
        seg = self._buf[:, self._next * self.orig - self.ctx - self._buf_start : last * self.orig + self.ctx - self._buf_start]
        out = self._t(seg)[:, self.k * self.new : (self.k + last - self._next) * self.new]
        keep = last * self.orig - self.ctx
        self._buf = self._buf[:, keep - self._buf_start :].clone()
        self._buf_start, self._next = keep, last
        return out

    def finish(self) -> torch.Tensor | None:
        """Return the remaining output; the total length equals torchaudio's for the whole signal."""
        if self.identity or self._buf is None:
            return None
        remaining = _resampled_length(self.n_in, self.orig_rate, self.new_rate) - self._next * self.new
        if remaining <= 0:
            return None
        seg = self._buf[:, self._next * self.orig - self.ctx - self._buf_start :]
        # Trailing zeros beyond torchaudio's own right padding only add frames that are cut off below.
        seg = torch.cat([seg, seg.new_zeros(seg.shape[0], self.ctx)], dim=1)
        self._buf = None
        return self._t(seg)[:, self.k * self.new : self.k * self.new + remaining]


def stream_conformed(
    stream: AudioStream,
    *,
    target_rate: int,
    target_channels: int = 2,
    block_seconds: float = 30.0,
    source: str | None = None,
) -> Iterator[torch.Tensor]:
    """Decode ``stream`` and apply the channel and rate policy block by block, in bounded memory.

    The concatenated output equals :func:`conform` of the whole track (within 1e-4, same length).

    Args:
        stream: an unread :class:`AudioStream` (its :meth:`~AudioStream.blocks` is consumed).
        block_seconds: input seconds decoded per block.
        source: how errors name the audio (default: ``stream.name``).

    Yields:
        float32 tensors ``(target_channels, n)`` at ``target_rate``, in order.

    Raises:
        AudioError: when decoding fails, a sample is NaN or Inf, or the stream holds no frames.
    """
    target_rate, target_channels = _check_target(target_rate, target_channels)
    if isinstance(block_seconds, bool) or not isinstance(block_seconds, numbers.Real) or not 0 < block_seconds < math.inf:
        raise ValueError(f"block_seconds must be a positive number, got {block_seconds!r}")
    label = source or stream.name
    frames = max(1, int(round(block_seconds * stream.info.sample_rate)))
    return _stream_conformed(stream, frames, target_rate, target_channels, label)


def _stream_conformed(
    stream: AudioStream, frames: int, target_rate: int, target_channels: int, label: str
) -> Iterator[torch.Tensor]:
    rate, channels = stream.info.sample_rate, stream.info.channels
    resampler = _StreamResampler(rate, target_rate)
    offset = 0
    for block in stream.blocks(frames):
        x = _as_tensor(block, "decoded block")
        if x.shape[0] != channels:
            raise ValueError(f"Expected decoded blocks with {channels} channels. Found: {tuple(x.shape)}")
        _check_finite(x, offset, rate, label)
        offset += x.shape[1]
        out = resampler.feed(_mix(x, target_channels))
        if out is not None and out.shape[1]:
            yield _spread(out, target_channels)
    if offset == 0:
        raise _no_frames(label)
    out = resampler.finish()
    if out is not None and out.shape[1]:
        yield _spread(out, target_channels)


def load_audio(
    source: str | os.PathLike | BinaryIO | bytes,
    *,
    target_rate: int,
    target_channels: int = 2,
    name: str | None = None,
) -> torch.Tensor:
    """Decode a whole track and conform it: float32 ``(target_channels, time)`` at ``target_rate``.

    Raises:
        AudioError: see :func:`open_audio` and :func:`stream_conformed`.
    """
    _check_target(target_rate, target_channels)
    with open_audio(source, name=name) as stream:
        parts = list(stream_conformed(stream, target_rate=target_rate, target_channels=target_channels))
    return torch.cat(parts, dim=1)


# --------------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------------

_SUBTYPES = {
    ("wav", "16"): "PCM_16",
    ("wav", "24"): "PCM_24",
    ("wav", "32f"): "FLOAT",
    ("flac", "16"): "PCM_16",
    ("flac", "24"): "PCM_24",
}


@dataclass(frozen=True)
class Encoding:
    """How stems are written.

    Attributes:
        format: ``'wav'``, ``'flac'`` or ``'mp3'``.
        bit_depth: ``'16'``, ``'24'`` or ``'32f'`` (32-bit float). FLAC takes 16 or 24 only. MP3
            ignores it (the codec decides; libsndfile's default variable bit rate).
        clip: ``'rescale'``, ``'clamp'`` or ``'none'``, see the module docstring.
    """

    format: str = "wav"
    bit_depth: str = "16"
    clip: str = "rescale"

    def __post_init__(self) -> None:
        if self.format not in ("wav", "flac", "mp3"):
            raise ValueError(f"unknown audio format {self.format!r}; expected 'wav', 'flac' or 'mp3'")
        if self.bit_depth not in ("16", "24", "32f"):
            raise ValueError(f"unknown bit depth {self.bit_depth!r}; expected the string '16', '24' or '32f'")
        if self.clip not in ("rescale", "clamp", "none"):
            raise ValueError(f"unknown clip mode {self.clip!r}; expected 'rescale', 'clamp' or 'none'")
        if self.format == "flac" and self.bit_depth == "32f":
            raise ValueError(
                "format='flac' with bit_depth='32f' is not possible: FLAC stores integer samples only; "
                "use bit_depth '16' or '24', or format 'wav' for 32-bit float"
            )

    @property
    def extension(self) -> str:
        """File extension without the dot: ``'wav'``, ``'flac'`` or ``'mp3'``."""
        return self.format

    def _soundfile_args(self) -> tuple[str, str]:
        if self.format == "mp3":
            return "MP3", "MPEG_LAYER_III"
        return self.format.upper(), _SUBTYPES[(self.format, self.bit_depth)]


def _as_numpy(block: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(block, torch.Tensor):
        if not block.is_floating_point():
            raise TypeError(f"Expected floating point audio. Found dtype: {block.dtype}")
        block = block.detach().to("cpu", torch.float32).numpy()
    elif isinstance(block, np.ndarray):
        if not np.issubdtype(block.dtype, np.floating):
            raise TypeError(f"Expected floating point audio. Found dtype: {block.dtype}")
        block = np.asarray(block, dtype=np.float32)
    else:
        raise TypeError(f"Expected a numpy array or torch tensor. Found: {type(block).__name__}")
    if block.ndim != 2:
        raise ValueError(f"Expected audio shaped (channels, time). Found: {block.shape}")
    return block


class AudioWriter:
    """Encode a track block by block, in bounded memory; a context manager.

    With ``clip='rescale'`` blocks are spooled to a local temporary file (raw float32) and encoded on
    :meth:`close`, once the peak is known. A file object that cannot seek (an object-store upload) is
    written through a local temporary file too. Leaving a ``with`` block by an exception discards the
    output (a path target is removed) instead of finishing it.

    Args:
        target: a local path or a binary file object opened for writing.
        sample_rate: rate in Hz of the blocks to be written.
        channels: channel count of the blocks to be written.
        encoding: format, bit depth and clip mode.
        source: how errors name the output (default: the target's name).

    Attributes:
        frames_written: samples per channel received so far.
        gain: factor applied by ``clip='rescale'`` (1.0 until :meth:`close`, and when no rescale was needed).

    Raises:
        ValueError: for arguments the format cannot take (e.g. MP3 at 96 kHz, or more than 2 channels).
        AudioError: ``stage='encode'`` when encoding or writing fails, or a block holds NaN or Inf.
    """

    def __init__(
        self,
        target: str | os.PathLike | BinaryIO,
        *,
        sample_rate: int,
        channels: int,
        encoding: Encoding,
        source: str | None = None,
    ) -> None:
        sample_rate, channels = _positive_int(sample_rate, "sample_rate"), _positive_int(channels, "channels")
        if not isinstance(encoding, Encoding):
            raise TypeError(f"encoding must be an Encoding, got {type(encoding).__name__}")
        if encoding.format == "mp3" and sample_rate not in _MP3_RATES:
            raise ValueError(f"MP3 cannot store {sample_rate} Hz audio; MPEG rates are {_MP3_RATES}")
        if encoding.format == "mp3" and channels > 2:
            raise ValueError(f"MP3 stores at most 2 channels, got {channels}")
        self.sample_rate, self.channels, self.encoding = sample_rate, channels, encoding
        self._target = target
        self._is_path = isinstance(target, (str, os.PathLike))
        self._target_name = os.fsdecode(os.fspath(target)) if self._is_path else _object_name(target)
        self._label = source or self._target_name
        self._integer = encoding.format != "mp3" and encoding.bit_depth != "32f"
        self.frames_written = 0
        self.gain = 1.0
        self._peak = 0.0
        self._closed = False
        self._local: str | None = None
        self._created = False  # whether this writer opened (created or truncated) a path target
        self._sink: sf.SoundFile | None = None
        self._spool = None
        if encoding.clip == "rescale":
            try:
                self._spool = tempfile.TemporaryFile(prefix="demix-spool-")
            except OSError as err:
                raise self._error("cannot create a local spool file", err) from err
        else:
            self._sink = self._open_sink()

    def _error(self, what: str, err: BaseException | None = None) -> AudioError:
        where = repr(self._target_name) if self._label == self._target_name else f"{self._label!r} -> {self._target_name!r}"
        errors = {"soundfile": _sf_message(err)} if err is not None else None
        return AudioError(self._label, f"cannot encode {where}: {what}", stage="encode", errors=errors)

    def _open_sink(self) -> sf.SoundFile:
        fmt, subtype = self.encoding._soundfile_args()
        if self._is_path:
            dest = self._target_name
        else:
            try:
                seekable = bool(self._target.seekable())
            except (AttributeError, OSError, ValueError):
                seekable = False
            if seekable:
                dest = self._target
            else:
                fd, self._local = tempfile.mkstemp(prefix="demix-encode-", suffix="." + self.encoding.extension)
                os.close(fd)
                dest = self._local
        try:
            sink = sf.SoundFile(dest, mode="w", samplerate=self.sample_rate, channels=self.channels, format=fmt, subtype=subtype)
        except _SF_ERRORS as err:
            raise self._error(f"cannot open it for writing as {fmt}/{subtype}", err) from err
        self._created = self._is_path
        return sink

    def write(self, block: np.ndarray | torch.Tensor) -> None:
        """Append ``block`` shaped ``(channels, n)``."""
        if self._closed:
            raise ValueError(f"write() on a closed AudioWriter for {self._label!r}")
        x = _as_numpy(block)
        if x.shape[0] != self.channels:
            raise ValueError(f"Expected blocks shaped ({self.channels}, time). Found: {x.shape}")
        if x.shape[1] == 0:
            return
        _check_finite(torch.from_numpy(x), self.frames_written, self.sample_rate, self._label, stage="encode")
        if self.encoding.clip == "clamp":
            x = np.clip(x, -_CLAMP_LIMIT, _CLAMP_LIMIT)
        if self._spool is not None:
            self._peak = max(self._peak, float(np.abs(x).max()))
            try:
                self._spool.write(np.ascontiguousarray(x.T).tobytes())
            except OSError as err:
                raise self._error("cannot write the local spool file", err) from err
        else:
            self._emit(x)
        self.frames_written += x.shape[1]

    def _emit(self, x: np.ndarray) -> None:
        if self._integer:
            x = np.clip(x, -1.0, 1.0)  # saturate, whatever the encoder's own clipping setting
        try:
            self._sink.write(np.ascontiguousarray(x.T))
        except _SF_ERRORS as err:
            raise self._error("the encoder failed", err) from err

    def close(self) -> None:
        """Finish the file (apply the rescale gain, write headers, upload a local copy). Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._spool is not None:
                self.gain = 1.0 / max(1.01 * self._peak, 1.0)
                self._sink = self._open_sink()
                self._spool.seek(0)
                chunk = (_COPY_CHUNK // (4 * self.channels)) * 4 * self.channels
                while True:
                    try:
                        raw = self._spool.read(chunk)
                    except OSError as err:
                        raise self._error("cannot read the local spool file", err) from err
                    if not raw:
                        break
                    x = np.frombuffer(raw, dtype=np.float32).reshape(-1, self.channels).T
                    self._emit(x * np.float32(self.gain) if self.gain != 1.0 else x)
            sink, self._sink = self._sink, None
            try:
                sink.close()
            except _SF_ERRORS as err:
                raise self._error("the encoder failed to finish", err) from err
            if self._local is not None:
                try:
                    with open(self._local, "rb") as src:
                        shutil.copyfileobj(src, self._target, _COPY_CHUNK)
                except OSError as err:
                    raise self._error("cannot copy the encoded file to the target", err) from err
        except BaseException:
            self._discard()
            raise
        finally:
            self._cleanup()

    def _cleanup(self) -> None:
        if self._spool is not None:
            self._spool.close()
            self._spool = None
        _remove(self._local)
        self._local = None

    def _discard(self) -> None:
        """Abandon the output: close the encoder, drop temporary files, remove a path target."""
        self._closed = True
        sink, self._sink = self._sink, None
        if sink is not None:
            try:
                sink.close()
            except _SF_ERRORS:
                pass  # the output is being thrown away; the original error is what matters
        self._cleanup()
        if self._created:
            _remove(self._target_name)

    def __enter__(self) -> AudioWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif not self._closed:
            self._discard()


def save_audio(
    target: str | os.PathLike | BinaryIO,
    wav: np.ndarray | torch.Tensor,
    *,
    sample_rate: int,
    encoding: Encoding = Encoding(),
) -> None:
    """Write a whole track ``wav`` shaped ``(channels, time)``; see :class:`AudioWriter`.

    Raises:
        AudioError: ``stage='encode'`` when encoding or writing fails, or ``wav`` holds NaN or Inf.
    """
    x = _as_numpy(wav)
    if encoding.clip == "rescale" and x.size and np.isfinite(x).all():
        # The peak is known already: no need to spool.
        peak = float(np.abs(x).max())
        if 1.01 * peak > 1.0:
            x = x / np.float32(1.01 * peak)
        encoding = replace(encoding, clip="none")
    with AudioWriter(target, sample_rate=sample_rate, channels=x.shape[0], encoding=encoding) as writer:
        writer.write(x)


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


def write_float_wav(path: str | os.PathLike, audio: np.ndarray, sample_rate: int) -> None:
    """32-bit float WAV with fixed bytes (libsndfile would add a PEAK chunk holding the write time)."""
    channels, frames = audio.shape
    data = np.ascontiguousarray(audio.T, dtype="<f4").tobytes()
    if len(data) > 0xFFFFFFFF - 64:
        raise AudioError(str(path), f"{path}: {frames} frames x {channels} channels is too long for a WAV file", stage="encode")
    fmt = struct.pack("<HHIIHH", 3, channels, sample_rate, sample_rate * channels * 4, channels * 4, 32)
    header = (b"RIFF" + struct.pack("<I", 4 + 24 + 12 + 8 + len(data)) + b"WAVE"
              + b"fmt " + struct.pack("<I", 16) + fmt + b"fact" + struct.pack("<II", 4, frames)
              + b"data" + struct.pack("<I", len(data)))
    with open(path, "wb") as f:
        f.write(header)
        f.write(data)
