"""demix.pipeline.io (decode, conform, encode): decoding, the channel and rate policy, streaming resample, encoding and clipping.

All audio is generated in tmp_path (soundfile, numpy, and ffmpeg's lavfi source for AAC); no network.
"""

from __future__ import annotations

import io
import math
import pickle
import shutil
import subprocess
from pathlib import Path

import fsspec
import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio

from demix.pipeline.io.conform import conform, load_audio, stream_conformed
from demix.pipeline.io.decode import AudioError, AudioInfo, AudioStream, open_audio
from demix.pipeline.io.encode import AudioWriter, Encoding, save_audio
from demix.pipeline.io.storage import StorageError

SR = 44100
needs_ffmpeg = pytest.mark.skipif(
    shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None, reason="ffmpeg not installed"
)


def sine(freq: float = 440.0, seconds: float = 1.0, sr: int = SR, channels: int = 2, amp: float = 0.5) -> np.ndarray:
    """float32 (channels, time) sine."""
    t = np.arange(int(round(seconds * sr))) / sr
    return np.tile(amp * np.sin(2 * np.pi * freq * t), (channels, 1)).astype(np.float32)


def write(path, wav: np.ndarray, sr: int = SR, **kw) -> str:
    sf.write(str(path), wav.T, sr, **kw)
    return str(path)


def peak_hz(x: torch.Tensor | np.ndarray, sr: int) -> float:
    x = np.asarray(x, dtype=np.float64)
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spec) * sr / len(x))


def decode_all(source, frames: int = 4096, **kw) -> tuple[AudioInfo, np.ndarray]:
    with open_audio(source, **kw) as stream:
        return stream.info, np.concatenate(list(stream.blocks(frames)), axis=1)


def make_aac(path, seconds: float = 1.0, sr: int = SR) -> str:
    subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i",
         f"sine=frequency=440:duration={seconds}:sample_rate={sr}", "-c:a", "aac", str(path)],
        check=True,
    )
    return str(path)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The convolutions here are small: thread start-up costs more than it saves on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class ArrayStream(AudioStream):
    """An in-memory AudioStream, to drive stream_conformed with exact block sizes."""

    def __init__(self, wav: np.ndarray, sr: int, block: int | None = None) -> None:
        super().__init__(AudioInfo(sr, wav.shape[0], wav.shape[1], "soundfile", "WAV"), "<array>")
        self._wav, self._block = wav, block

    def _blocks(self, frames: int):
        step = self._block or frames
        for i in range(0, self._wav.shape[1], step):
            yield self._wav[:, i : i + step]


# ------------------------------------------------------------------ channel and rate policy


def test_mono_becomes_identical_stereo(tmp_path):
    path = write(tmp_path / "mono.wav", sine(channels=1), subtype="FLOAT")
    out = load_audio(path, target_rate=SR)
    assert out.dtype == torch.float32 and out.shape == (2, SR)
    assert torch.equal(out[0], out[1])
    assert torch.allclose(out[0], torch.from_numpy(sine(channels=1)[0]))


def test_six_channels_downmix_to_mean(tmp_path):
    rng = np.random.default_rng(0)
    wav = (0.2 * rng.standard_normal((6, 4000))).astype(np.float32)
    path = write(tmp_path / "surround.wav", wav, subtype="FLOAT")
    out = load_audio(path, target_rate=SR)
    mean = torch.from_numpy(wav.mean(axis=0))
    assert out.shape == (2, 4000)
    assert torch.allclose(out[0], mean, atol=1e-6) and torch.equal(out[0], out[1])
    assert torch.allclose(load_audio(path, target_rate=SR, target_channels=1)[0], mean, atol=1e-6)
    assert torch.allclose(conform(wav, SR, target_rate=SR)[1], mean, atol=1e-6)


def test_stereo_kept_and_conform_accepts_tensors():
    wav = torch.stack([torch.linspace(-1, 1, 100), torch.zeros(100)])
    out = conform(wav, SR, target_rate=SR)
    assert torch.equal(out, wav)
    with pytest.raises(ValueError, match=r"\(channels, time\)"):
        conform(torch.zeros(100), SR, target_rate=SR)


@pytest.mark.parametrize("rate", [8000, 96000])
def test_resample_to_44100_keeps_length_and_pitch(tmp_path, rate):
    n = int(1.5 * rate)
    path = write(tmp_path / f"s{rate}.wav", sine(seconds=1.5, sr=rate), rate, subtype="FLOAT")
    out = load_audio(path, target_rate=SR)
    assert out.shape == (2, math.ceil(n * SR / rate))
    assert abs(peak_hz(out[0], SR) - 440.0) < 1.5  # FFT bin is 0.67 Hz


def test_non_finite_sample_names_file_and_time(tmp_path):
    wav = sine(seconds=1.0)
    wav[1, 22050] = np.nan
    path = write(tmp_path / "bad nan.wav", wav, subtype="FLOAT")
    with pytest.raises(AudioError, match=r"bad nan\.wav") as info:
        load_audio(path, target_rate=48000)
    assert info.value.stage == "decode" and "0.500 s" in str(info.value)
    wav[1, 22050] = np.inf
    with pytest.raises(AudioError, match="0.500 s"):
        conform(wav, SR, target_rate=SR, source="x")


# ------------------------------------------------------------------ decoding


def test_24bit_and_float_wav(tmp_path):
    wav = sine(amp=0.9)
    _, pcm24 = decode_all(write(tmp_path / "a24.wav", wav, subtype="PCM_24"))
    assert np.abs(pcm24 - wav).max() <= 2.0**-23
    info, flt = decode_all(write(tmp_path / "af.wav", wav, subtype="FLOAT"))
    assert np.array_equal(flt, wav)
    assert info == AudioInfo(SR, 2, SR, "soundfile", "WAV")


@pytest.mark.parametrize(
    "ext,kw",
    [("flac", {}), ("ogg", {"format": "OGG", "subtype": "VORBIS"}), ("mp3", {"format": "MP3", "subtype": "MPEG_LAYER_III"})],
)
def test_compressed_formats_decode(tmp_path, ext, kw):
    wav = sine()
    path = write(tmp_path / f"a.{ext}", wav, **kw)
    info, out = decode_all(path, frames=1000)
    assert info.decoder == "soundfile" and info.format == ext.upper() and info.channels == 2
    # block-wise decoding equals one whole read (libsndfile 1.2.2 mis-seeks MP3; we never seek)
    assert np.array_equal(out, sf.read(path, dtype="float32", always_2d=True)[0].T)
    assert abs(out.shape[1] - SR) <= 2 * 1152
    n = min(out.shape[1], SR)
    assert np.corrcoef(out[0, :n], wav[0, :n])[0, 1] > 0.9


def test_zero_byte_and_header_only_files(tmp_path):
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(AudioError, match=r"'.*empty\.wav' contains no audio frames"):
        open_audio(empty)
    with pytest.raises(AudioError, match="contains no audio frames"):
        open_audio(b"", name="blob")
    header_only = write(tmp_path / "header.wav", np.zeros((2, 0), np.float32))
    with pytest.raises(AudioError, match="contains no audio frames"):
        open_audio(header_only)


def test_missing_file_is_a_read_error(tmp_path):
    with pytest.raises(AudioError, match="nope.wav") as info:
        open_audio(tmp_path / "nope.wav")
    assert info.value.stage == "read"


@needs_ffmpeg
def test_random_bytes_and_text_named_ogg_report_every_decoder(tmp_path):
    noise = tmp_path / "noise.mp3"
    noise.write_bytes(np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    text = tmp_path / "song.ogg"
    text.write_text("this is not audio\n" * 10)
    for path in (noise, text):
        with pytest.raises(AudioError) as info:
            decode_all(path)
        err = info.value
        assert err.stage == "decode" and err.source == str(path)
        assert set(err.errors) >= {"soundfile", "ffmpeg"}
        assert str(path) in str(err) and "soundfile: " in str(err) and "; ffmpeg: " in str(err)
    assert "Format not recognised" in err.errors["soundfile"]


def test_truncated_flac_raises_audio_error(tmp_path):
    # Decision: a FLAC cut short is corrupt input, never a silently shorter stem.
    data = Path(write(tmp_path / "full.flac", sine(seconds=2.0))).read_bytes()
    cut = tmp_path / "cut.flac"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(AudioError, match="cut.flac") as info:
        load_audio(cut, target_rate=SR)
    assert info.value.stage == "decode"
    assert "soundfile" in info.value.errors or "is truncated" in str(info.value)


@needs_ffmpeg
def test_flac_without_length_in_header(tmp_path):
    # ffmpeg writing FLAC to a pipe cannot go back to fill in the total: libsndfile reports SF_COUNT_MAX
    path = tmp_path / "piped.flac"
    with open(path, "wb") as out:
        subprocess.run(
            ["ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi", "-i", "sine=duration=0.5:sample_rate=44100", "-f", "flac", "pipe:1"],
            stdout=out, check=True,
        )
    info, out = decode_all(path)
    assert info.frames is None and info.decoder == "soundfile" and out.shape == (1, 22050)


@needs_ffmpeg
def test_m4a_decodes_through_ffmpeg(tmp_path):
    path = make_aac(tmp_path / "tone.m4a", seconds=1.0)
    with open_audio(path) as stream:
        assert stream.info.decoder == "ffmpeg" and stream.info.frames is None
        assert stream.info.sample_rate == SR and stream.info.channels == 1 and "mp4" in stream.info.format
        out = np.concatenate(list(stream.blocks(1000)), axis=1)
    assert abs(out.shape[1] - SR) <= 1024  # one AAC frame of priming
    assert abs(peak_hz(out[0], SR) - 440) < 2
    # bytes and file objects go through a local copy (MP4 keeps its index at the end)
    data = Path(path).read_bytes()
    assert np.array_equal(decode_all(data, name="tone.m4a")[1], out)
    with open(path, "rb") as fh:
        assert np.array_equal(decode_all(fh)[1], out)


@needs_ffmpeg
def test_ffmpeg_error_mid_stream_surfaces_from_blocks(tmp_path):
    data = bytearray(Path(make_aac(tmp_path / "long.m4a", seconds=6.0)).read_bytes())
    mid = len(data) // 2
    data[mid : mid + 3000] = bytes((i * 7) % 256 for i in range(3000))
    bad = tmp_path / "bad.m4a"
    bad.write_bytes(bytes(data))
    got = 0
    with open_audio(bad) as stream, pytest.raises(AudioError, match=r"bad\.m4a.*ffmpeg: ") as info:
        for block in stream.blocks(4096):
            got += block.shape[1]
    assert got > 0 and info.value.errors.keys() == {"ffmpeg"}


@needs_ffmpeg
def test_missing_ffmpeg_is_named(tmp_path, monkeypatch):
    path = make_aac(tmp_path / "tone.m4a", seconds=0.2)
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(AudioError, match="ffmpeg not found on PATH; install ffmpeg") as info:
        open_audio(path)
    assert "soundfile" in info.value.errors


@needs_ffmpeg
@pytest.mark.parametrize("ext", ["wav", "m4a"])
def test_awkward_file_names(tmp_path, ext):
    name = tmp_path / f"it's \"live\" (take 2) – café: naïve ümlaut.{ext}"
    if ext == "wav":
        write(name, sine(seconds=0.2))
    else:
        shutil.copy(make_aac(tmp_path / "plain.m4a", seconds=0.2), name)
    info, out = decode_all(name)
    assert info.decoder == ("soundfile" if ext == "wav" else "ffmpeg") and out.shape[1] > 0.15 * SR
    bad = tmp_path / f"it's \"bad\" (1) – café: ü.{ext}"
    bad.write_bytes(b"garbage" * 100)
    with pytest.raises(AudioError) as err:
        open_audio(bad)
    assert repr(str(bad)) in str(err.value)


def test_file_objects_and_bytes(tmp_path):
    wav = sine(seconds=0.3)
    path = write(tmp_path / "a.flac", wav)
    ref = decode_all(path)[1]
    with open(path, "rb") as fh:
        info, out = decode_all(fh)
    assert np.array_equal(out, ref) and info.format == "FLAC"
    assert np.array_equal(decode_all(Path(path).read_bytes())[1], ref)
    fs = fsspec.filesystem("memory")
    fs.pipe("/bucket/a.flac", Path(path).read_bytes())
    with fs.open("/bucket/a.flac", "rb") as fh:
        assert np.array_equal(decode_all(fh)[1], ref)

    class Pipe(io.RawIOBase):  # not seekable: copied to a local temp file first
        def __init__(self, data):
            self._src = io.BytesIO(data)

        def readable(self):
            return True

        def readinto(self, buf):
            chunk = self._src.read(len(buf))
            buf[: len(chunk)] = chunk
            return len(chunk)

    assert np.array_equal(decode_all(Pipe(Path(path).read_bytes()), name="pipe.flac")[1], ref)
    with pytest.raises(TypeError):
        open_audio(123)


def test_blocks_only_once_and_close_idempotent(tmp_path):
    stream = open_audio(write(tmp_path / "a.wav", sine(seconds=0.1)))
    assert sum(b.shape[1] for b in stream.blocks(1000)) == 4410
    with pytest.raises(RuntimeError):
        stream.blocks(1000)
    stream.close()
    stream.close()


# ------------------------------------------------------------------ streaming resample


@pytest.mark.parametrize("rates", [(44100, 48000), (48000, 44100), (8000, 44100), (96000, 44100), (44100, 44100)])
@pytest.mark.parametrize("block", [1, 997, 4096, 44101, 10**6])
def test_streaming_resample_matches_whole_file(rates, block):
    orig, new = rates
    rng = np.random.default_rng(2)
    seconds = 0.1 if block == 1 else 0.6  # one-sample blocks: short, to keep the suite fast
    wav = (0.3 * rng.standard_normal((2, int(seconds * orig) + 17))).astype(np.float32)
    whole = torchaudio.functional.resample(torch.from_numpy(wav), orig, new)
    parts = list(stream_conformed(ArrayStream(wav, orig, block), target_rate=new))
    out = torch.cat(parts, dim=1)
    assert out.shape == whole.shape == (2, math.ceil(wav.shape[1] * new / orig))
    assert (out - whole).abs().max() <= 1e-4
    assert torch.allclose(out, conform(wav, orig, target_rate=new), atol=1e-4)


@pytest.mark.parametrize("block_seconds", [0.0173, 0.5, 30.0])
def test_stream_conformed_from_file_matches_conform(tmp_path, block_seconds):
    wav = sine(freq=1000, seconds=1.3, sr=48000, channels=1)
    path = write(tmp_path / "a.wav", wav, 48000, subtype="FLOAT")
    with open_audio(path) as stream:
        parts = list(stream_conformed(stream, target_rate=SR, block_seconds=block_seconds))
    assert all(p.shape[0] == 2 for p in parts)
    out = torch.cat(parts, dim=1)
    assert torch.allclose(out, conform(wav, 48000, target_rate=SR), atol=1e-4)


def test_streaming_length_follows_torchaudio_on_long_tracks():
    # torchaudio rounds ceil(n * new / orig) through float32: here one below the exact ceiling.
    n = 16_199_982
    whole = torchaudio.functional.resample(torch.zeros(1, n), 48000, 44100)
    stream = ArrayStream(np.zeros((1, n), np.float32), 48000)
    total = sum(p.shape[1] for p in stream_conformed(stream, target_rate=44100, target_channels=1))
    assert total == whole.shape[1] == math.ceil(n * 147 / 160) - 1


def test_stream_without_frames_raises():
    with pytest.raises(AudioError, match="no audio frames"):
        list(stream_conformed(ArrayStream(np.zeros((2, 0), np.float32), SR), target_rate=SR))
    with pytest.raises(ValueError):
        stream_conformed(ArrayStream(np.zeros((2, 5), np.float32), SR), target_rate=SR, block_seconds=0)


# ------------------------------------------------------------------ encoding


@pytest.mark.parametrize(
    "fmt,depth,tol", [("wav", "16", 2.0**-15), ("wav", "24", 2.0**-23), ("wav", "32f", 0.0), ("flac", "16", 2.0**-15), ("flac", "24", 2.0**-23)]
)
def test_lossless_round_trip(tmp_path, fmt, depth, tol):
    wav = sine(amp=0.8) * np.linspace(0.1, 1, SR, dtype=np.float32)
    enc = Encoding(format=fmt, bit_depth=depth, clip="none")
    target = tmp_path / f"out.{enc.extension}"
    save_audio(target, torch.from_numpy(wav), sample_rate=SR, encoding=enc)
    info, out = decode_all(target)
    assert info.format == fmt.upper() and out.shape == wav.shape
    assert np.abs(out - wav).max() <= tol


def test_mp3_round_trip(tmp_path):
    wav = sine(seconds=1.0)
    save_audio(tmp_path / "out.mp3", wav, sample_rate=SR, encoding=Encoding(format="mp3"))
    info, out = decode_all(tmp_path / "out.mp3")
    assert info.format == "MP3" and abs(out.shape[1] - SR) <= 2 * 1152
    n = min(out.shape[1], SR)
    assert np.corrcoef(out[0, :n], wav[0, :n])[0, 1] > 0.9
    with pytest.raises(ValueError, match="MP3"):
        AudioWriter(tmp_path / "x.mp3", sample_rate=96000, channels=2, encoding=Encoding(format="mp3"))


def test_encoding_validation():
    with pytest.raises(ValueError, match="flac.*32f"):
        Encoding(format="flac", bit_depth="32f")
    for kw in ({"format": "ogg"}, {"bit_depth": 16}, {"clip": "soft"}):
        with pytest.raises(ValueError):
            Encoding(**kw)
    assert Encoding().extension == "wav" and Encoding(format="flac").extension == "flac"


def test_rescale_spools_blocks_and_keeps_shape(tmp_path):
    wav = sine(seconds=1.0, amp=1.0) * np.linspace(0.1, 2.0, SR, dtype=np.float32)  # peak 2.0 at the end
    enc = Encoding(bit_depth="32f", clip="rescale")
    with AudioWriter(tmp_path / "r.wav", sample_rate=SR, channels=2, encoding=enc, source="stem vocals") as w:
        for i in range(0, SR, 1000):
            w.write(wav[:, i : i + 1000])
    assert w.frames_written == SR and w.gain == pytest.approx(1 / (1.01 * np.abs(wav).max()))
    out = sf.read(tmp_path / "r.wav", dtype="float32", always_2d=True)[0].T
    assert np.abs(out).max() <= 1.0
    mask = np.abs(wav) > 1e-3
    ratio = out[mask] / wav[mask]
    assert np.allclose(ratio, ratio[0], rtol=1e-5)
    save_audio(tmp_path / "s.wav", wav, sample_rate=SR, encoding=enc)
    assert np.allclose(sf.read(tmp_path / "s.wav", dtype="float32")[0].T, out, atol=1e-6)
    quiet = sine(amp=0.5)
    save_audio(tmp_path / "q.wav", quiet, sample_rate=SR, encoding=enc)
    assert np.array_equal(sf.read(tmp_path / "q.wav", dtype="float32")[0].T, quiet)


def test_clamp_and_none(tmp_path):
    wav = np.array([[0.5, 2.0, -3.0, 1.0, -0.25]] * 2, dtype=np.float32)
    save_audio(tmp_path / "c.wav", wav, sample_rate=SR, encoding=Encoding(bit_depth="32f", clip="clamp"))
    clamped = sf.read(tmp_path / "c.wav", dtype="float32")[0].T
    assert np.abs(clamped).max() < 1.0 and clamped[0, 1] > 0.9999 and clamped[0, 2] < -0.9999
    assert clamped[0, 0] == 0.5 and clamped[0, 4] == -0.25
    save_audio(tmp_path / "n.wav", wav, sample_rate=SR, encoding=Encoding(bit_depth="32f", clip="none"))
    assert np.array_equal(sf.read(tmp_path / "n.wav", dtype="float32")[0].T, wav)
    save_audio(tmp_path / "n16.wav", wav, sample_rate=SR, encoding=Encoding(bit_depth="16", clip="none"))
    saturated = sf.read(tmp_path / "n16.wav", dtype="float32")[0].T
    assert saturated[0, 1] > 0.999 and saturated[0, 2] == -1.0  # saturates, never wraps around


def test_writer_errors_and_targets(tmp_path):
    enc = Encoding(clip="none")
    with pytest.raises(AudioError, match="non-finite") as info:
        save_audio(tmp_path / "nan.wav", np.full((2, 10), np.nan, np.float32), sample_rate=SR, encoding=enc)
    assert info.value.stage == "encode"
    assert not (tmp_path / "nan.wav").exists()  # a failed write leaves nothing behind
    with pytest.raises(AudioError, match="missing-dir") as info:
        AudioWriter(tmp_path / "missing-dir" / "a.wav", sample_rate=SR, channels=2, encoding=enc)
    assert info.value.stage == "encode"
    with AudioWriter(tmp_path / "w.wav", sample_rate=SR, channels=2, encoding=enc) as w:
        with pytest.raises(ValueError, match=r"\(2, time\)"):
            w.write(np.zeros((1, 10), np.float32))

    class Upload(io.RawIOBase):  # write-only, not seekable, like an object-store upload
        def __init__(self):
            self.data = bytearray()

        def writable(self):
            return True

        def write(self, b):
            self.data += b
            return len(b)

    buf = io.BytesIO()
    save_audio(buf, sine(seconds=0.1), sample_rate=SR, encoding=Encoding(format="wav", bit_depth="24"))
    assert decode_all(buf.getvalue())[1].shape == (2, 4410)
    up = Upload()
    save_audio(up, sine(seconds=0.1), sample_rate=SR, encoding=Encoding(format="flac"))
    assert sf.info(io.BytesIO(bytes(up.data))).frames == 4410


def test_audio_error_pickles_and_names_source():
    err = AudioError("s3://b/x.ogg", "cannot decode 's3://b/x.ogg'", errors={"soundfile": "a", "ffmpeg": "b"})
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err) == "cannot decode 's3://b/x.ogg': soundfile: a; ffmpeg: b"
    assert again.errors == err.errors and again.stage == "decode" and again.source == "s3://b/x.ogg"
    assert "x.wav" in str(AudioError("x.wav", "broken", stage="read"))


@pytest.mark.parametrize(
    "err",
    [
        AudioError("s3://b/x.ogg", "cannot decode 's3://b/x.ogg'", stage="read", errors={"soundfile": "a"}),
        AudioError("x.wav", "broken", stage="encode"),
        StorageError("s3://b/out/x.wav", "ClientError: AccessDenied", stage="read"),
        StorageError("/tmp/out.json", "PermissionError: denied"),
    ],
)
def test_staged_errors_pickle_round_trip(err):
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is type(err)
    assert str(again) == str(err) and again.args == err.args
    assert vars(again) == vars(err)
    assert again.stage == err.stage and again.source == err.source
    if isinstance(err, StorageError):
        assert isinstance(again, OSError)
        assert (again.uri, again.detail) == (err.uri, err.detail)
        assert str(again) == f"{err.stage} {err.uri}: {err.detail}"
    else:
        assert (again.message, again.errors) == (err.message, err.errors)


# ------------------------------------------------------------------ MP3 options (issue 15, item 9)


@pytest.mark.parametrize("kbps", [128, 320])
def test_mp3_bitrate_is_what_was_asked(tmp_path, kbps):
    """A 10 s MP3 at ``mp3_bitrate`` K kbit/s has about that size (constant bit rate)."""
    rng = np.random.default_rng(0)
    noise = (0.3 * rng.standard_normal((2, 10 * SR))).astype(np.float32)  # hard to compress: VBR would differ
    target = tmp_path / f"{kbps}.mp3"
    save_audio(target, noise, sample_rate=SR, encoding=Encoding(format="mp3", mp3_bitrate=kbps))
    rate = target.stat().st_size * 8 / 10 / 1000
    assert rate == pytest.approx(kbps, rel=0.10)
    quiet = tmp_path / f"quiet{kbps}.mp3"
    save_audio(quiet, noise * 1e-3, sample_rate=SR, encoding=Encoding(format="mp3", mp3_bitrate=kbps))
    assert quiet.stat().st_size * 8 / 10 / 1000 == pytest.approx(kbps, rel=0.10), "not constant bit rate"


def test_mp3_defaults_and_refused_options():
    enc = Encoding(format="mp3")
    assert enc.mp3_bitrate == 320 and enc.bit_depth is None
    assert Encoding().bit_depth == "16" and Encoding(format="flac").bit_depth == "16" and Encoding().mp3_bitrate is None
    with pytest.raises(ValueError, match="mp3.*bit.depth|bit.depth.*mp3") as info:
        Encoding(format="mp3", bit_depth="24")
    assert "--bit-depth" in str(info.value) and "--format" in str(info.value)
    with pytest.raises(ValueError, match="--mp3-bitrate"):
        Encoding(format="wav", mp3_bitrate=128)
    with pytest.raises(ValueError, match="bit rate"):
        Encoding(format="mp3", mp3_bitrate=100)


def test_encoding_flags_round_trip():
    import argparse

    from demix.pipeline.io.encode import add_encoding_flags, encoding_kwargs

    parser = argparse.ArgumentParser()
    add_encoding_flags(parser)
    assert Encoding(**encoding_kwargs(parser.parse_args([]))) == Encoding("wav", "16", "rescale")
    assert Encoding(**encoding_kwargs(parser.parse_args(["--format", "mp3", "--mp3-bitrate", "192"]))).mp3_bitrate == 192
    with pytest.raises(ValueError, match="--bit-depth"):
        Encoding(**encoding_kwargs(parser.parse_args(["--format", "mp3", "--bit-depth", "24"])))


class _Unseekable(io.RawIOBase):
    def __init__(self) -> None:
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.data += bytes(b)
        return len(b)


@pytest.mark.parametrize("target", ["path", "seekable", "unseekable"])
@pytest.mark.parametrize("fmt", ["wav", "flac"])
def test_rescale_of_a_late_loud_block_to_any_target(tmp_path, target, fmt):
    """A loud block late in the track scales the whole track, whatever the target: a path, a seekable
    file object or an unseekable stream."""
    quiet, loud = sine(seconds=0.5, amp=0.4), sine(seconds=0.5, amp=1.8)
    enc = Encoding(format=fmt, clip="rescale")
    sink = {"path": tmp_path / f"r.{fmt}", "seekable": io.BytesIO(), "unseekable": _Unseekable()}[target]
    with AudioWriter(sink, sample_rate=SR, channels=2, encoding=enc) as w:
        w.write(quiet)
        w.write(loud)
    data = sink if target == "path" else io.BytesIO(sink.getvalue() if target == "seekable" else bytes(sink.data))
    out = sf.read(data, dtype="float32", always_2d=True)[0].T
    expected = np.concatenate([quiet, loud], axis=1) / (1.01 * 1.8)
    assert out.shape == expected.shape and np.abs(out - expected).max() < 2e-4
    direct = io.BytesIO()
    with AudioWriter(direct, sample_rate=SR, channels=2, encoding=enc) as w:
        w.write(quiet)
    assert w.gain == 1.0 and np.abs(sf.read(io.BytesIO(direct.getvalue()), dtype="float32")[0].T - quiet).max() < 2e-4
