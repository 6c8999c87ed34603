"""A committed catalog run written without Ray (real stems, real commits through the manifest layer) and
a small MUSDB-layout dataset, for the report tests (tests/test_report*.py)."""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf

from demix.pipeline.batch import manifest
from demix.pipeline.data.synth import toy_song
from demix.pipeline.io import join
from demix.pipeline.io.pages import publish
from demix.pipeline.stems import STEMS

RATE = 8000


def _wav(audio: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio.T, RATE, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def committed_run(out: str, *, ok: int = 3, failed: int = 2, seconds: float = 20.0) -> dict:
    """Commit ``ok`` separated tracks (a source mixture and four stems each, WAV at 8 kHz, with presence
    verdicts and active segments) and ``failed`` failures (one of them with a message holding HTML) under
    the output root ``out`` (local path or ``s3://``). Returns ``{"ok": ids, "failed": source URIs}``."""
    result = manifest.ShardResult(shard_id="shard-0")
    ids = []
    for i in range(ok):
        tid = f"track {i} <ok> é"
        song = toy_song(seconds, RATE, seed=i)
        source = join(out, "sources", f"song {i}.wav")
        publish(source, _wav(song["mixture"]))
        result.tracks.append(manifest.TrackRow(tid, source, 1000, seconds, RATE, 2, "ok", "test-gain", None, "h" * 16, 1.5 + i))
        for j, stem in enumerate(STEMS):
            uri = join(out, "stems", tid, "h" * 16, "a1", f"{stem}.wav")
            publish(uri, _wav(song[stem]))
            present = j != 3 or i % 2 == 0
            segments = [{"start_s": 2.0 + j, "end_s": 9.0 + j}, {"start_s": 14.0, "end_s": 18.5}] if present else []
            result.stems.append(manifest.StemRow(
                tid, stem, uri, "wav", RATE, 2, int(seconds * RATE), seconds, -20.0, present, 0.9 if present else 0.1, segments,
            ))
        ids.append(tid)
    bad = []
    for i in range(failed):
        source = join(out, "sources", f"broken {i}.mp3")
        result.tracks.append(manifest.TrackRow(f"bad {i}", source, 10, None, None, None, "failed", "test-gain", None, "h" * 16, 0.1))
        result.failures.append(manifest.FailureRow(f"bad {i}", source, "decode", "AudioError", f"cannot decode <em>{i}</em> | x"))
        bad.append(source)
    manifest.commit_shard(out, result)
    return {"ok": ids, "failed": bad}


def musdb_dataset(root, tracks: int = 3, seconds: float = 4.0, rate: int = 22050) -> None:
    """``tracks`` MUSDB-layout folders of toy songs under ``root`` (a pathlib folder)."""
    for i in range(tracks):
        folder = root / f"Song {i} - Artist"
        folder.mkdir(parents=True)
        song = toy_song(seconds, rate, seed=20 + i)
        for name in ("mixture", *STEMS):
            sf.write(folder / f"{name}.wav", song[name].T, rate, subtype="FLOAT")
