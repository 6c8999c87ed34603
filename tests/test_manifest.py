"""The commit protocol and consolidated reads on local disk, and catalogs (ids, tables, shards)."""

from __future__ import annotations

import json
import os
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import commit_concurrently

from demix.pipeline.batch import manifest
from demix.pipeline.batch.catalog import CatalogError, make_shards, read_catalog, safe_track_id, track_id_for
from demix.pipeline.batch.manifest import FailureRow, ShardResult, StemRow, TrackRow
from demix.pipeline.io.storage import StorageError


def _track(tid: str, status: str = "ok", settings_hash: str = "h1") -> TrackRow:
    return TrackRow(tid, f"/in/{tid}.wav", 100, 2.0, 44100, 2, status, "unet", "abc", settings_hash, 0.5)


def _stems(tid: str) -> list[StemRow]:
    return [
        StemRow(tid, s, f"/out/stems/{tid}/{s}.wav", "wav", 44100, 2, 88200, 2.0, -20.0, True, 0.9, [{"start_s": 0.0, "end_s": 1.5}])
        for s in ("vocals", "drums")
    ]


def _result(shard: str, ok: list[str] = (), failed: list[str] = (), settings_hash: str = "h1") -> ShardResult:
    result = ShardResult(shard)
    for tid in ok:
        result.tracks.append(_track(tid, "ok", settings_hash))
        result.stems.extend(_stems(tid))
    for tid in failed:
        result.tracks.append(_track(tid, "failed", settings_hash))
        result.failures.append(FailureRow(tid, f"/in/{tid}.wav", "decode", "AudioError", "bad"))
    return result


# --- the commit protocol -----------------------------------------------------------------------


def test_commit_writes_parts_then_one_record_and_reads_back(tmp_path):
    out = str(tmp_path / "out")
    commit = manifest.commit_shard(out, _result("shard-a", ok=["t1", "t2"], failed=["t3"]))
    record = json.loads((tmp_path / "out/manifests/_commits/shard-a.json").read_text())
    assert record["attempt"] == commit.attempt and record["track_ids"] == ["t1", "t2", "t3"]
    assert all(not p.startswith("/") and p.startswith("_parts/shard-a/") for p in record["parts"].values()), (
        "parts are named relative to OUT/manifests"
    )
    tables = manifest.read_manifests(out)
    assert tables["tracks"].schema == manifest.TRACKS_SCHEMA
    assert tables["stems"].schema == manifest.STEMS_SCHEMA
    assert tables["failures"].schema == manifest.FAILURES_SCHEMA
    assert tables["tracks"].column("track_id").to_pylist() == ["t1", "t2", "t3"]
    assert tables["tracks"].column("status").to_pylist() == ["ok", "ok", "failed"]
    assert set(tables["tracks"].column("shard_id").to_pylist()) == {"shard-a"}
    assert tables["stems"].num_rows == 4
    assert tables["stems"].column("active_segments").to_pylist()[0] == [{"start_s": 0.0, "end_s": 1.5}]
    assert tables["failures"].column("track_id").to_pylist() == ["t3"]
    written = manifest.write_consolidated(out, tables)
    assert pq.read_table(written["tracks"]).num_rows == 3
    assert not list((tmp_path / "out").rglob(".demix-*")), "temporary files left behind"


def test_empty_output_root_reads_as_empty_tables(tmp_path):
    out = str(tmp_path / "nothing")
    assert manifest.list_commits(out) == []
    tables = manifest.read_manifests(out)
    assert all(t.num_rows == 0 for t in tables.values())
    assert manifest.committed_ok(out, "h1") == set()


def test_ok_beats_failed_whatever_the_order(tmp_path):
    out = str(tmp_path)
    manifest.commit_shard(out, _result("s1", ok=["t1"], failed=["t2"]))
    manifest.commit_shard(out, _result("s2", failed=["t1"], ok=["t2"]))  # later: t1 failed, t2 ok
    tables = manifest.read_manifests(out)
    assert dict(zip(*(tables["tracks"].column(c).to_pylist() for c in ("track_id", "status")))) == {"t1": "ok", "t2": "ok"}
    assert tables["failures"].num_rows == 0, "a failure of a track that is ok elsewhere is not reported"
    assert sorted({r["track_id"] for r in tables["stems"].to_pylist()}) == ["t1", "t2"]
    assert tables["stems"].num_rows == 4, "stems of exactly one attempt per track"


def test_latest_commit_wins_between_equals(tmp_path):
    out = str(tmp_path)
    first = manifest.commit_shard(out, _result("s1", ok=["t1"], failed=["t9"]))
    time.sleep(0.01)
    second = manifest.commit_shard(out, _result("s2", ok=["t1"], failed=["t9"]))
    tables = manifest.read_manifests(out)
    assert tables["tracks"].num_rows == 2
    assert set(tables["tracks"].column("attempt").to_pylist()) == {second.attempt}
    assert set(tables["stems"].column("attempt").to_pylist()) == {second.attempt}
    assert tables["failures"].column("attempt").to_pylist() == [second.attempt]
    assert first.attempt != second.attempt


def test_orphan_attempts_are_ignored(tmp_path):
    out = str(tmp_path)
    won = manifest.commit_shard(out, _result("s1", ok=["t1"]))
    # an attempt that wrote its parts and died before its commit record (the record of s1 exists)
    lost = manifest.commit_shard(out, _result("s1", failed=["t1", "t2"]))
    assert lost.attempt == won.attempt, "the second attempt of a committed shard gets the winner back"
    # an attempt of another shard that never got to its commit record at all
    orphan = tmp_path / "manifests/_parts/s9/20200101T000000-dead/tracks.parquet"
    orphan.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([], schema=manifest.TRACKS_SCHEMA), orphan)
    assert len(list((tmp_path / "manifests/_parts/s1").iterdir())) == 2
    tables = manifest.read_manifests(out)
    assert tables["tracks"].column("track_id").to_pylist() == ["t1"]
    assert tables["tracks"].column("status").to_pylist() == ["ok"]
    assert tables["failures"].num_rows == 0
    assert manifest.committed_ok(out, "h1") == {"t1"}


def test_committed_ok_is_per_settings_hash(tmp_path):
    out = str(tmp_path)
    manifest.commit_shard(out, _result("s1", ok=["t1", "t2"], failed=["t3"], settings_hash="h1"))
    manifest.commit_shard(out, _result("s2", ok=["t3", "t4"], settings_hash="h2"))
    assert manifest.committed_ok(out, "h1") == {"t1", "t2"}
    assert manifest.committed_ok(out, "h2") == {"t3", "t4"}
    assert manifest.committed_ok(out, "other") == set()


def test_same_shard_committed_concurrently_on_local_disk(tmp_path):
    out = str(tmp_path)
    result = _result("shard-x", ok=["t1", "t2"], failed=["t3"])
    commits = commit_concurrently(out, result, 6)
    assert len({c.attempt for c in commits}) == 1, "every caller sees the single winner"
    assert [p.name for p in (tmp_path / "manifests/_commits").iterdir()] == ["shard-x.json"]
    tables = manifest.read_manifests(out)
    assert tables["tracks"].num_rows == 3 and tables["stems"].num_rows == 4 and tables["failures"].num_rows == 1
    assert len(list((tmp_path / "manifests/_parts/shard-x").iterdir())) == 6


def test_output_root_spelled_differently_or_with_glob_characters(tmp_path, monkeypatch):
    root = tmp_path / "runs [1] *take?"
    manifest.commit_shard(str(root), _result("s1", ok=["t1"]))
    manifest.commit_shard(str(root), _result("s2", ok=["t2"]))
    assert manifest.read_manifests(str(root))["tracks"].num_rows == 2
    monkeypatch.chdir(tmp_path)  # a relative spelling of the same root reads the same commits
    assert manifest.committed_ok("runs [1] *take?", "h1") == {"t1", "t2"}
    moved = tmp_path / "moved"
    root.rename(moved)
    assert manifest.read_manifests(str(moved))["tracks"].num_rows == 2, "an output root can be moved"


def test_unwritable_output_root_is_a_storage_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(StorageError):
        manifest.commit_shard(str(blocker / "out"), _result("s1", ok=["t1"]))


# --- catalogs ----------------------------------------------------------------------------------


def test_track_ids_are_stable_safe_and_distinct():
    a = track_id_for("s3://bucket/Café \"x\" (live) 'take 2'.wav")
    assert a == track_id_for("s3://bucket/Café \"x\" (live) 'take 2'.wav")
    assert a.startswith("Cafe-x-live-take-2-") and len(a.rsplit("-", 1)[1]) == 12
    assert a != track_id_for("s3://other/Café \"x\" (live) 'take 2'.wav"), "same name, another place"
    for uri in ("../../etc/x.wav", "/music/../../etc/passwd", "s3://b/..", "s3://b/日本語.flac", "/m/.hidden.wav"):
        tid = track_id_for(uri)
        assert "/" not in tid and "\\" not in tid and not tid.startswith(".") and tid not in ("", ".", "..")


@pytest.mark.parametrize(
    ("given", "expected"),
    [("abc", "abc"), ("../../etc/x", "-..-etc-x"), ("/abs/path", "abs-path"), (".hidden", "hidden"), ("a b/c", "a-b-c"), (42, "42")],
)
def test_user_ids_are_made_safe(given, expected):
    assert safe_track_id(given) == expected
    assert "/" not in safe_track_id(given) and not safe_track_id(given).startswith(".")


@pytest.mark.parametrize("given", ["", "..", "///", "."])
def test_user_ids_without_usable_characters_are_refused(given):
    with pytest.raises(CatalogError):
        safe_track_id(given)


def test_csv_and_parquet_catalogs_resolve_relative_uris(tmp_path, monkeypatch):
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat/music").mkdir()
    rows = [
        {"uri": "music/a.wav", "track_id": "alpha"},
        {"uri": "../elsewhere/b.flac", "track_id": None},
        {"uri": "/abs/c.ogg", "track_id": ""},
        {"uri": "s3://bucket/d.mp3", "track_id": "../../etc/x"},
    ]
    table = pa.Table.from_pylist(rows, schema=pa.schema([("uri", pa.string()), ("track_id", pa.string())]))
    pq.write_table(table, tmp_path / "cat/list.parquet")
    (tmp_path / "cat/list.csv").write_text(
        "uri,track_id\nmusic/a.wav,alpha\n../elsewhere/b.flac,\n/abs/c.ogg,\ns3://bucket/d.mp3,../../etc/x\n"
    )
    monkeypatch.chdir(tmp_path)
    expected = {
        "alpha": str(tmp_path / "cat/music/a.wav"),
        track_id_for(str(tmp_path / "elsewhere/b.flac")): str(tmp_path / "elsewhere/b.flac"),
        track_id_for("/abs/c.ogg"): "/abs/c.ogg",
        "-..-etc-x": "s3://bucket/d.mp3",
    }
    for name in ("cat/list.parquet", "cat/list.csv", str(tmp_path / "cat/list.csv")):
        tracks = read_catalog(name)
        assert {t.track_id: t.uri for t in tracks} == expected, name
        assert [t.track_id for t in tracks] == sorted(expected)


def test_folder_catalog_ids_do_not_depend_on_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "m/sub").mkdir(parents=True)
    for name in ("a.wav", "sub/b.flac", "notes.txt"):
        (tmp_path / "m" / name).write_bytes(b"")
    absolute = read_catalog(str(tmp_path / "m"))
    monkeypatch.chdir(tmp_path)
    assert read_catalog("m") == absolute == read_catalog("./m/")
    assert sorted(t.uri for t in absolute) == [str(tmp_path / "m/a.wav"), str(tmp_path / "m/sub/b.flac")]


def test_catalog_errors(tmp_path):
    (tmp_path / "dup.csv").write_text("uri,track_id\na.wav,same\nb.wav,same\n")
    with pytest.raises(CatalogError, match="duplicate track_id 'same'"):
        read_catalog(str(tmp_path / "dup.csv"))
    (tmp_path / "nouri.csv").write_text("path\na.wav\n")
    with pytest.raises(CatalogError, match="no 'uri' column"):
        read_catalog(str(tmp_path / "nouri.csv"))
    (tmp_path / "empty.csv").write_text("uri\na.wav\n\"\"\n")
    with pytest.raises(CatalogError, match="empty 'uri'"):
        read_catalog(str(tmp_path / "empty.csv"))
    with pytest.raises(StorageError):
        read_catalog(str(tmp_path / "missing.csv"))
    with pytest.raises(StorageError):
        read_catalog(str(tmp_path / "missing-folder"))
    (tmp_path / "same.csv").write_text("uri\na.wav\na.wav\n")
    assert len(read_catalog(str(tmp_path / "same.csv"))) == 1, "a row listed twice is one track"


def test_shards_have_stable_ids_within_a_run_and_new_ids_across_runs(tmp_path):
    for i in range(7):
        (tmp_path / f"{i}.wav").write_bytes(b"")
    tracks = read_catalog(str(tmp_path))
    shards = make_shards(tracks, 3, run_id="run-1")
    assert [len(s.tracks) for s in shards] == [3, 3, 1]
    assert [t for s in shards for t in s.tracks] == tracks
    assert [s.shard_id for s in shards] == [s.shard_id for s in make_shards(tracks, 3, run_id="run-1")]
    assert not {s.shard_id for s in shards} & {s.shard_id for s in make_shards(tracks, 3, run_id="run-2")}
    assert len({s.shard_id for s in shards}) == 3 and all(s.shard_id.startswith("shard-") for s in shards)
    assert make_shards([], 3) == []
    with pytest.raises(ValueError):
        make_shards(tracks, 0)
    assert os.sep not in "".join(s.shard_id for s in shards)


def test_csv_ids_are_text_and_bad_tables_are_catalog_errors(tmp_path):
    (tmp_path / "ids.csv").write_text("uri,track_id\na.wav,007\nb.wav,7\nc.wav,1e3\n")
    assert [t.track_id for t in read_catalog(str(tmp_path / "ids.csv"))] == ["007", "1e3", "7"]
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really parquet")
    with pytest.raises(CatalogError, match="cannot be parsed"):
        read_catalog(str(tmp_path / "bad.parquet"))


def test_a_committed_part_that_vanished_is_a_read_error_naming_it(tmp_path):
    out = str(tmp_path)
    commit = manifest.commit_shard(out, _result("s1", ok=["t1"]))
    (tmp_path / "manifests" / commit.parts["stems"]).unlink()
    with pytest.raises(StorageError) as info:
        manifest.read_manifests(out)
    assert info.value.stage == "read" and commit.parts["stems"] in str(info.value)


def test_integer_columns_stay_integers_in_pandas_with_failed_rows(tmp_path):
    """A failed track has no sample rate: pandas turned int32 with nulls into float64 (44100.0)."""
    import pandas as pd

    out = str(tmp_path)
    manifest.commit_shard(out, _result("s1", ok=["t1"]))
    failed = _result("s2", failed=["t2"])
    failed.tracks[0].sample_rate = failed.tracks[0].channels = failed.tracks[0].source_bytes = None
    manifest.commit_shard(out, failed)
    written = manifest.write_consolidated(out, manifest.read_manifests(out))
    tracks = pd.read_parquet(written["tracks"])
    for column in ("sample_rate", "channels", "source_bytes"):
        assert pd.api.types.is_integer_dtype(tracks[column]), f"{column}: {tracks[column].dtype}"
    assert tracks["sample_rate"].tolist()[0] == 44100 and pd.isna(tracks["sample_rate"].tolist()[1])
    assert pq.read_schema(written["tracks"]).field("sample_rate").type == pa.int32()


def test_parts_written_with_float_columns_still_read(tmp_path):
    """A part whose sample_rate/channels were written as float64 reads back as int32."""
    out = str(tmp_path)
    commit = manifest.commit_shard(out, _result("s1", ok=["t1"]))
    part = tmp_path / "manifests" / commit.parts["tracks"]
    old = pq.read_table(part)
    for column in ("sample_rate", "channels"):
        old = old.set_column(old.schema.get_field_index(column), column, old.column(column).cast(pa.float64()))
    pq.write_table(old, part)
    tracks = manifest.read_manifests(out)["tracks"]
    assert tracks.schema.field("sample_rate").type == pa.int32()
    assert tracks.select(["sample_rate", "channels"]).to_pylist() == [{"sample_rate": 44100, "channels": 2}]


def test_failure_attempts_count_every_committed_failure_of_a_track(tmp_path):
    out = str(tmp_path)
    manifest.commit_shard(out, _result("s1", failed=["t1", "t2"]))
    manifest.commit_shard(out, _result("s1", failed=["t1"]))  # a retry of the same shard: not an attempt
    manifest.commit_shard(out, _result("s2", failed=["t1"]))
    died = _result("s3", failed=["t1"])
    died.failures[0].attempts = 4  # a worker that died 4 times in one run
    manifest.commit_shard(out, died)
    failures = {r["track_id"]: r["attempts"] for r in manifest.read_manifests(out)["failures"].to_pylist()}
    assert failures == {"t1": 6, "t2": 1}
    manifest.commit_shard(out, _result("s4", ok=["t1"]))
    assert [r["track_id"] for r in manifest.read_manifests(out)["failures"].to_pylist()] == ["t2"]
