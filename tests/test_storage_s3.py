"""Storage on a real S3 endpoint (moto's server) behind a real fault-injecting HTTP proxy: bounded retries,
clear errors, atomic writes and create-once commits. Nothing of demix's storage layer is mocked."""

from __future__ import annotations

import os
import tempfile
import time

import pytest
import s3fs

from tests.conftest import commit_concurrently

from demix.pipeline.batch import manifest
from demix.pipeline.io.storage import S3_MAX_ATTEMPTS, S3FS_RETRIES, StorageError, filesystem, local_copy, put_file

pytest_plugins = ["conftest_services"]

pytestmark = pytest.mark.timeout(120)


def _local_file(tmp_path, data: bytes = b"x" * 1000, name: str = "blob.bin") -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def test_slowdown_twice_then_success(s3, tmp_path):
    s3.proxy.inject("flaky.bin", status=503, code="SlowDown", times=2)
    put_file(_local_file(tmp_path), s3.uri("a/flaky.bin"))
    assert s3.proxy.count("PUT", "/a/flaky.bin") == 3, "two SlowDowns, then the upload that worked"
    assert s3.fs.cat_file(f"{s3.name}/a/flaky.bin") == b"x" * 1000


def test_persistent_503_fails_clearly_after_bounded_attempts(s3, tmp_path):
    s3.proxy.inject("down.bin", status=503, code="SlowDown")
    uri = s3.uri("a/down.bin")
    started = time.monotonic()
    with pytest.raises(StorageError) as info:
        put_file(_local_file(tmp_path), uri)
    attempts = s3.proxy.count("PUT", "/a/down.bin")
    assert uri in str(info.value) and info.value.uri == uri and info.value.stage == "write"
    assert "reduce your request rate" in str(info.value) or "SlowDown" in str(info.value)
    assert S3_MAX_ATTEMPTS <= attempts <= S3_MAX_ATTEMPTS * S3FS_RETRIES <= 10, f"{attempts} attempts: not bounded"
    assert time.monotonic() - started < 60
    assert "a/down.bin" not in s3.keys("a")


def test_access_denied_fails_fast(s3, tmp_path):
    s3.proxy.inject("denied", status=403, code="AccessDenied", message="Access Denied")
    uri = s3.uri("a/denied.bin")
    with pytest.raises(StorageError) as info:
        put_file(_local_file(tmp_path), uri)
    assert uri in str(info.value)
    assert "Access Denied" in str(info.value) or "PermissionError" in str(info.value)
    assert 1 <= s3.proxy.count("PUT", "/a/denied.bin") <= 2, "403 must not be retried"


def test_read_errors_name_the_uri_and_are_bounded(s3, tmp_path):
    s3.fs.pipe_file(f"{s3.name}/in/song.wav", b"RIFF....")
    s3.proxy.inject("/in/song.wav", status=403, code="AccessDenied", message="Access Denied", methods=("GET", "HEAD"))
    uri = s3.uri("in/song.wav")
    with pytest.raises(StorageError) as info, local_copy(uri):
        pass
    assert info.value.stage == "read" and uri in str(info.value)
    assert s3.proxy.count("GET", "/in/song.wav") + s3.proxy.count("HEAD", "/in/song.wav") <= 3


def test_connection_dropped_mid_upload_leaves_nothing(s3, tmp_path):
    s3.proxy.inject("cut.bin", drop=True)
    uri = s3.uri("a/cut.bin")
    with pytest.raises(StorageError) as info:
        put_file(_local_file(tmp_path, os.urandom(200_000)), uri)
    assert uri in str(info.value)
    # aiohttp resends once when a kept-alive connection was closed under it, hence the factor 2
    assert 1 < s3.proxy.count("PUT", "/a/cut.bin") <= 2 * S3_MAX_ATTEMPTS * S3FS_RETRIES, "retried, boundedly"
    assert s3.keys("a") == [], "a half-sent upload must not publish the key"


def test_encoder_failure_mid_track_leaves_no_stem_on_s3(s3, tmp_path, monkeypatch):
    """The model turns to NaN after its first chunk: the stem writers refuse it mid-track (stage encode).
    No stem may reach S3, not even the chunks encoded before the failure, and no local spool is left."""
    import soundfile as sf

    import demix_test_models  # noqa: F401 - registers test-gain
    from demix.models.registry import load_model
    from demix.pipeline.io import Encoding
    from demix.pipeline.engine import SeparationSettings, TrackError, plan_stems, separate_track
    from demix.pipeline.data.synth import toy_song

    src = tmp_path / "song.wav"
    sf.write(src, toy_song(3.0, 8000, seed=4)["mixture"].T, 8000)
    s3.fs.put_file(str(src), f"{s3.name}/in/song.wav")
    model = load_model("test-gain", nan_after=1)
    plan = plan_stems(model.sources)
    outputs = {s: s3.uri(f"out/song/{s}.wav") for s in plan.names}
    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))  # where staging and downloads go
    with pytest.raises(TrackError) as info:
        separate_track(
            model, s3.uri("in/song.wav"), outputs, plan=plan, encoding=Encoding("wav", "16", "none"),
            settings=SeparationSettings(segment=1.0), block_seconds=1.0,
        )
    assert info.value.stage == "encode" and model.calls >= 2
    assert s3.keys("out") == []
    assert s3.proxy.count("PUT", "/out/") == 0
    assert list(spool.iterdir()) == [], "staged stems or downloads left behind"


def _result(shard: str, n: int = 3) -> manifest.ShardResult:
    tracks = [
        manifest.TrackRow(f"t{i}", f"s3://in/t{i}.wav", 10, 1.0, 8000, 2, "ok", "m", None, "h", 0.1) for i in range(n)
    ]
    stems = [manifest.StemRow(f"t{i}", "vocals", f"s3://o/t{i}.wav", "wav", 8000, 2, 8000, 1.0, -20.0) for i in range(n)]
    return manifest.ShardResult(shard, tracks, stems, [])


def test_same_shard_committed_concurrently_on_s3(s3):
    out = s3.uri("run")
    result = _result("shard-same")
    commits = commit_concurrently(out, result, 4)
    assert len({c.attempt for c in commits}) == 1, "every caller must see the one winning commit"
    assert s3.keys("run/manifests/_commits") == ["run/manifests/_commits/shard-same.json"]
    assert len(manifest.list_commits(out)) == 1
    tables = manifest.read_manifests(out)
    assert tables["tracks"].num_rows == 3 and tables["stems"].num_rows == 3
    assert set(tables["tracks"].column("attempt").to_pylist()) == {commits[0].attempt}
    parts = {k.split("/")[4] for k in s3.keys("run/manifests/_parts/shard-same")}
    assert len(parts) == 4, "each attempt writes its own parts; the losers' are orphans"


def test_commit_whose_reply_was_lost_is_recognised_as_ours(s3):
    """The create reaches S3 but the reply is a 503: botocore retries, S3 answers 412, and the attempt
    must find its own record rather than fail or commit twice."""
    out = s3.uri("run")
    s3.proxy.inject("_commits/shard-lost.json", status=503, code="SlowDown", times=1, after_forward=True)
    won = manifest.commit_shard(out, _result("shard-lost"))
    assert s3.proxy.count("PUT", "_commits/shard-lost.json") == 2
    assert [c.attempt for c in manifest.list_commits(out)] == [won.attempt]
    assert manifest.read_manifests(out)["tracks"].num_rows == 3


def test_commit_record_denied_is_a_storage_error(s3):
    out = s3.uri("run")
    s3.proxy.inject("_commits/", status=403, code="AccessDenied", message="Access Denied")
    with pytest.raises(StorageError) as info:
        manifest.commit_shard(out, _result("shard-denied"))
    assert "_commits/shard-denied.json" in str(info.value)
    assert s3.proxy.count("PUT", "_commits/shard-denied.json") <= 2
    assert manifest.list_commits(out) == []


def test_forbidden_catalogs_are_storage_errors(s3):
    from demix.pipeline.batch.catalog import read_catalog

    s3.fs.pipe_file(f"{s3.name}/cat/list.csv", b"uri\na.wav\n")
    s3.fs.pipe_file(f"{s3.name}/music/a.wav", b"")
    s3.proxy.inject("/cat/list.csv", status=403, code="AccessDenied", message="Access Denied", methods=("GET", "HEAD"))
    with pytest.raises(StorageError) as info:
        read_catalog(s3.uri("cat/list.csv"))
    assert info.value.stage == "read" and s3.uri("cat/list.csv") in str(info.value)
    assert isinstance(info.value.__cause__, PermissionError)
    s3.proxy.inject(f"/{s3.name}", status=403, code="AccessDenied", message="Access Denied", methods=("GET", "HEAD"))
    with pytest.raises(StorageError) as info:
        read_catalog(s3.uri("music/"))
    assert info.value.stage == "read" and s3.uri("music/") in str(info.value)
    s3.proxy.reset()
    with pytest.raises(StorageError) as info:
        read_catalog(s3.uri("nothing/here.csv"))
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_a_listing_taken_before_a_write_does_not_hide_the_written_object(s3):
    """s3fs answers reads from a cached listing of the parent folder; demix turns that cache off, so an
    object written after this process listed its folder (another thread, another process) reads at once."""
    folder = s3.uri("out/manifests/_parts/shard-1/attempt-1")
    fs, path = filesystem(f"{folder}/tracks.parquet")
    fs.pipe_file(path, b"first")
    assert len(fs.find(fs._parent(path))) == 1  # a listing of the folder, as gc or a reader takes one
    elsewhere = s3fs.S3FileSystem(skip_instance_cache=True)  # another process's client
    elsewhere.pipe_file(f"{s3.name}/out/manifests/_parts/shard-1/attempt-1/stems.parquet", b"second")
    fs, path = filesystem(f"{folder}/stems.parquet")
    assert fs.cat_file(path) == b"second" and fs.info(path)["size"] == 6
