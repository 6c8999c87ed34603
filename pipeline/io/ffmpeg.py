"""The ffmpeg decoder: M4A/AAC, WMA and anything else libsndfile cannot read (see :mod:`demix.pipeline.io.decode`).

ffprobe reports the first audio stream's rate and channel count; ffmpeg then streams raw float32 samples
through a pipe, with its stderr drained on a thread so that a failure can be reported in one line.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import threading
from typing import Iterator

import numpy as np

from demix.pipeline.io.stream import AudioError, AudioInfo, AudioStream, _no_frames, _one_line, _remove

_PROBE_TIMEOUT_S = 120.0


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
            # own session: the terminal's Ctrl-C is for demix to handle (it stops this process itself)
            self._proc = subprocess.Popen(
                self._cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
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


def _ffmpeg_url(path: str) -> str:
    # The file: protocol keeps names such as "live: take 2.m4a" from being read as a protocol.
    return "file:" + os.path.abspath(path)


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
        res = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=_PROBE_TIMEOUT_S, start_new_session=True)
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
