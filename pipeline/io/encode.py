"""Encode audio: :class:`Encoding`, :class:`AudioWriter`, :func:`save_audio`, :func:`write_float_wav`.

Shapes: blocks and tracks are float32 arrays or tensors shaped ``(channels, time)``.

Encoding and clipping (see :class:`Encoding`)
    - ``clip='rescale'`` (the default, as in demucs ``save_audio``): when the peak of the whole track
      times 1.01 exceeds 1, the whole track is divided by ``1.01 * peak``; otherwise it is written
      unchanged. The waveform's shape is preserved. :class:`AudioWriter` spools blocks to a local
      temporary file until :meth:`AudioWriter.close`, because the peak is known only at the end.
    - ``clip='clamp'``: each sample is clamped to ``+-(1 - 2**-15)``, the largest value 16-bit PCM holds.
    - ``clip='none'``: samples are written as they are. Only 32-bit float WAV can store values beyond
      ``[-1, 1]``; integer PCM (16/24 bit) saturates at full scale (never wraps around).

Blocks holding NaN or Inf raise :class:`~demix.pipeline.io.stream.AudioError` (``stage='encode'``).
"""

from __future__ import annotations

import math
import os
import shutil
import struct
import tempfile
from dataclasses import asdict, dataclass, replace
from typing import BinaryIO

import numpy as np
import soundfile as sf
import torch

from demix.pipeline.io.stream import (
    _COPY_CHUNK, _SF_ERRORS, AudioError, _check_finite, _object_name, _positive_int, _remove, _sf_message,
)

__all__ = ["MP3_BITRATES", "AudioWriter", "Encoding", "save_audio", "write_float_wav"]

# Largest magnitude 16-bit PCM stores (32767 / 32768), exact in float32.
_CLAMP_LIMIT = 1.0 - 2.0**-15
_MP3_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)

_SUBTYPES = {
    ("wav", "16"): "PCM_16",
    ("wav", "24"): "PCM_24",
    ("wav", "32f"): "FLOAT",
    ("flac", "16"): "PCM_16",
    ("flac", "24"): "PCM_24",
}


MP3_BITRATES = (32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320)
"""Bit rates (kbit/s) ``mp3_bitrate`` takes: those of MPEG-1 Layer III (sample rates of 32 kHz and up)."""


@dataclass(frozen=True)
class Encoding:
    """How stems are written.

    Attributes:
        format: ``'wav'``, ``'flac'`` or ``'mp3'``.
        bit_depth: ``'16'``, ``'24'`` or ``'32f'`` (32-bit float) for WAV and FLAC (FLAC takes 16 or 24
            only); ``None`` means 16 there. MP3 has no bit depth: it must stay ``None``.
        clip: ``'rescale'``, ``'clamp'`` or ``'none'``, see the module docstring.
        mp3_bitrate: MP3 only: constant bit rate in kbit/s, one of :data:`MP3_BITRATES`; ``None`` means
            320 (as demucs' ``--mp3-bitrate``). At sample rates below 32 kHz MPEG-2 caps Layer III at
            160 kbit/s (64 below 16 kHz), and a higher rate is lowered to that cap.
    """

    format: str = "wav"
    bit_depth: str | None = None
    clip: str = "rescale"
    mp3_bitrate: int | None = None

    def __post_init__(self) -> None:
        if self.format not in ("wav", "flac", "mp3"):
            raise ValueError(f"unknown audio format {self.format!r}; expected 'wav', 'flac' or 'mp3'")
        if self.bit_depth is not None and self.bit_depth not in ("16", "24", "32f"):
            raise ValueError(f"unknown bit depth {self.bit_depth!r}; expected the string '16', '24' or '32f'")
        if self.clip not in ("rescale", "clamp", "none"):
            raise ValueError(f"unknown clip mode {self.clip!r}; expected 'rescale', 'clamp' or 'none'")
        if self.format == "mp3":
            self._check_mp3()
            return
        if self.mp3_bitrate is not None:
            raise ValueError(
                f"mp3_bitrate (--mp3-bitrate) applies to format 'mp3' only, not to format={self.format!r} (--format {self.format})"
            )
        if self.bit_depth is None:
            object.__setattr__(self, "bit_depth", "16")
        if self.format == "flac" and self.bit_depth == "32f":
            raise ValueError(
                "format='flac' with bit_depth='32f' is not possible: FLAC stores integer samples only; "
                "use bit_depth '16' or '24', or format 'wav' for 32-bit float"
            )

    def _check_mp3(self) -> None:
        if self.bit_depth is not None:
            raise ValueError(
                f"bit_depth={self.bit_depth!r} (--bit-depth) does not apply to format='mp3' (--format mp3): MP3 has "
                "no bit depth; choose its bit rate with mp3_bitrate (--mp3-bitrate KBPS)"
            )
        if self.mp3_bitrate is None:
            object.__setattr__(self, "mp3_bitrate", 320)
        if isinstance(self.mp3_bitrate, bool) or self.mp3_bitrate not in MP3_BITRATES:
            raise ValueError(f"MP3 bit rate {self.mp3_bitrate!r} kbit/s is not an MPEG Layer III bit rate; expected one of {MP3_BITRATES}")

    def hash_fields(self) -> dict:
        """The fields that change the written files, for settings hashes (unset ones left out, so adding
        an option does not change the hash of runs that never used it)."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @property
    def extension(self) -> str:
        """File extension without the dot: ``'wav'``, ``'flac'`` or ``'mp3'``."""
        return self.format

    def _soundfile_args(self) -> tuple[str, str]:
        if self.format == "mp3":
            return "MP3", "MPEG_LAYER_III"
        return self.format.upper(), _SUBTYPES[(self.format, self.bit_depth)]


def _mp3_compression_level(kbps: int, sample_rate: int) -> float:
    """libsndfile's ``compression_level`` that makes LAME write ``kbps`` at constant bit rate.

    libsndfile (>= 1.1, ``mpeg_l3_encode.c``) maps a level ``c`` in [0, 1] linearly onto the MPEG
    version's bit-rate range, ``int(hi - c * (hi - lo))``: [32, 320] from 32 kHz, [8, 160] from 16 kHz,
    [8, 64] below. Half a kbit/s of margin keeps the truncation on ``kbps``; rates above ``hi`` become ``hi``.
    """
    lo, hi = (32, 320) if sample_rate >= 32000 else (8, 160) if sample_rate >= 16000 else (8, 64)
    return min(1.0, max(0.0, (hi - kbps - 0.5) / (hi - lo)))


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


def _interleave(x: np.ndarray) -> np.ndarray:
    """Planar ``(channels, n)`` -> C-contiguous frames ``(n, channels)`` for libsndfile. One column copy
    per channel: about 8x faster than ``np.ascontiguousarray(x.T)`` for stereo."""
    frames = x.T
    if frames.flags.c_contiguous:
        return frames
    out = np.empty(frames.shape, np.float32)
    for c in range(x.shape[0]):
        out[:, c] = x[c]
    return out


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
        # 'rescale': the gain is known only at the end, so blocks are spooled (float32, local disk) and
        # encoded on close. (Encoding at once while the peak allowed a gain of 1 was tried: a mastered mix
        # reaches full scale somewhere in nearly every track, and the encoding done before was wasted.)
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
        mp3 = {}
        if self.encoding.format == "mp3":
            mp3 = {"bitrate_mode": "CONSTANT", "compression_level": _mp3_compression_level(self.encoding.mp3_bitrate, self.sample_rate)}
        try:
            sink = sf.SoundFile(dest, mode="w", samplerate=self.sample_rate, channels=self.channels, format=fmt, subtype=subtype, **mp3)
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
        # one read-only pass each gives the peak and finiteness (max/min propagate NaN, show +-Inf)
        hi, lo = float(x.max()), float(x.min())
        if not (math.isfinite(hi) and math.isfinite(lo)):
            _check_finite(torch.from_numpy(x), self.frames_written, self.sample_rate, self._label, stage="encode")
        if self.encoding.clip == "clamp":
            x = np.clip(x, -_CLAMP_LIMIT, _CLAMP_LIMIT)
            hi, lo = min(hi, _CLAMP_LIMIT), max(lo, -_CLAMP_LIMIT)
        if self._spool is not None:
            self._peak = max(self._peak, hi, -lo)
            try:
                self._spool.write(_interleave(x))
            except OSError as err:
                raise self._error("cannot write the local spool file", err) from err
        else:
            self._emit(x)
        self.frames_written += x.shape[1]

    def _emit(self, x: np.ndarray) -> None:
        """Encode planar ``(channels, n)`` samples. 'rescale' output is within 1 / 1.01 and 'clamp' within
        ``_CLAMP_LIMIT`` of zero by construction; only 'none' may exceed full scale and needs the saturation."""
        if self._integer and self.encoding.clip == "none":
            x = np.clip(x, -1.0, 1.0)  # saturate, whatever the encoder's own clipping setting
        try:
            self._sink.write(_interleave(x))
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


def add_encoding_flags(parser) -> None:
    """The options of :class:`Encoding` (``--format``, ``--bit-depth``, ``--mp3-bitrate``, ``--clip-mode``); read
    them back with :func:`encoding_kwargs`. ``parser`` is a parser or an argument group."""
    parser.add_argument("--format", choices=("wav", "flac", "mp3"), default="wav", help="output format (default: wav)")
    parser.add_argument("--bit-depth", choices=("16", "24", "32f"), help="PCM depth for wav/flac; 32f = float (wav only; default: 16); not for mp3")
    parser.add_argument(
        "--mp3-bitrate", type=int, choices=MP3_BITRATES, metavar="KBPS",
        help="mp3 only: constant bit rate in kbit/s, an MPEG rate from 32 to 320: 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320 (default: 320)",
    )
    parser.add_argument("--clip-mode", choices=("rescale", "clamp", "none"), default="rescale", help="how to avoid clipping (default: rescale)")


def encoding_kwargs(args) -> dict:
    """``Encoding(**encoding_kwargs(args))`` from the options :func:`add_encoding_flags` declared."""
    return {"format": args.format, "bit_depth": args.bit_depth, "clip": args.clip_mode, "mp3_bitrate": args.mp3_bitrate}
