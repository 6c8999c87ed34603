"""Immutable stems, all-or-none commits and ``demix gc`` (issue 11): a committed row points at exactly
the bytes it describes; a track whose 3rd stem fails leaves nothing a manifest reader can reach; gc
removes orphans, uncommitted parts and superseded attempts, never what a current row references, also
while a run writes into the same output (locally and on S3 through moto); old-layout output stays
readable."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from demix.pipeline.batch import manifest
from demix.pipeline.batch.gc import CLOCK_SLACK_S, GcError, RunLease, apply_gc, plan_gc
from demix.pipeline.batch.manifest import ShardResult, StemRow, TrackRow
from demix.pipeline.io import filesystem, join

pytest_plugins = ["conftest_services"]
pytestmark = pytest.mark.timeout(420)

BIN = Path(sys.executable).parent
SOURCES = ("vocals", "drums", "bass", "other")


@pytest.fixture
def flow_env(ray_cluster, prefect_api):
    return ray_cluster, prefect_api


def run_flow(catalog: str, out: str, **overrides) -> dict:
    from demix.flows.separate_catalog import separate_catalog

    kwargs = {
        "model": "test-gain", "registry_module": "demix_test_models", "settings": {"segment": 1.0},
        "workers_count": 1, "shard_size": 2, "progress": False, "presence": "none", **overrides,
    }
    return separate_catalog(catalog=catalog, out=out, **kwargs)


def _tone(seconds: float, freq: float, rate: int = 8000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return np.stack([0.3 * np.sin(2 * np.pi * freq * t), 0.2 * np.sin(2 * np.pi * 1.5 * freq * t)], 1).astype(np.float32)


def _catalog(folder: Path, n: int, seconds: float = 1.5) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        sf.write(folder / f"song{i}.wav", _tone(seconds, 200.0 + 50 * i), 8000)
    return str(folder)


def _s3_catalog(s3, n: int, seconds: float = 1.5) -> str:
    import io

    for i in range(n):
        buf = io.BytesIO()
        sf.write(buf, _tone(seconds, 200.0 + 50 * i), 8000, format="WAV")
        s3.fs.pipe_file(f"{s3.name}/in/song{i}.wav", buf.getvalue())
    return s3.uri("in")


def _digest(uri: str) -> str:
    fs, path = filesystem(uri)
    fs.invalidate_cache()
    return hashlib.sha256(fs.cat_file(path)).hexdigest()


def _exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    fs.invalidate_cache()
    return fs.exists(path)


def _stem_files(out: str) -> set[str]:
    fs, path = filesystem(join(out, "stems"))
    fs.invalidate_cache()
    try:
        return set(fs.find(path))
    except FileNotFoundError:
        return set()


def _current_readable(out: str, n: int) -> dict:
    """Every track has one current ok row whose 4 stems exist and decode; returns the tables."""
    tables = manifest.read_manifests(out)
    tracks = tables["tracks"].to_pylist()
    assert len(tracks) == n and all(t["status"] == "ok" for t in tracks), tracks
    stems = tables["stems"].to_pylist()
    assert len(stems) == 4 * n
    for s in stems:
        fs, path = filesystem(s["uri"])
        with fs.open(path, "rb") as f:
            assert sf.info(f).frames == s["num_frames"] > 0
    return tables


def test_force_writes_a_new_attempt_and_gc_keeps_the_newest(tmp_path, flow_env):
    catalog, out = _catalog(tmp_path / "in", 3), str(tmp_path / "out")
    run_flow(catalog, out)
    first = {s["uri"]: _digest(s["uri"]) for s in manifest.read_manifests(out)["stems"].to_pylist()}
    assert len(first) == 12

    again = run_flow(catalog, out)
    assert (again["skipped_already_committed"], again["processed_now"]) == (3, 0), "same settings: skipped"
    forced = run_flow(catalog, out, force=True)
    assert forced["ok_now"] == 3

    tables = _current_readable(out, 3)
    second = {s["uri"] for s in tables["stems"].to_pylist()}
    assert not second & set(first), "--force wrote new keys"
    assert {u: _digest(u) for u in first} == first, "the first attempt's bytes are untouched"
    history = tables["history_tracks"].to_pylist()
    assert len(history) == 6 and sum(r["current"] for r in history) == 3
    assert {r["attempt"] for r in history if r["current"]} == {r["attempt"] for r in tables["tracks"].to_pylist()}
    assert pq_rows(out, "history/stems.parquet") == 24, "the history is written beside the current view"

    assert plan_gc(out, keep=2, grace_s=0).removals == [], "two attempts kept: nothing to remove"
    plan = plan_gc(out, keep=1, grace_s=0)
    assert {r.uri for r in plan.removals} == set(first)
    assert {r.reason for r in plan.removals} == {"superseded attempt"}
    assert apply_gc(plan) == sum(r.bytes for r in plan.removals) > 0
    assert not any(_exists(u) for u in first)
    tables = _current_readable(out, 3)
    assert {s["uri"] for s in tables["stems"].to_pylist()} == second
    assert len(tables["history_tracks"]) == 3 and pq_rows(out, "history/tracks.parquet") == 3
    assert run_flow(catalog, out)["processed_now"] == 0, "gc did not make committed tracks look undone"


def pq_rows(out: str, name: str) -> int:
    import pyarrow.parquet as pq

    return pq.read_table(join(manifest.manifests_root(out), name)).num_rows


def test_a_failure_on_stem_three_of_four_leaves_nothing_reachable(s3, flow_env):
    catalog, out = _s3_catalog(s3, 1), s3.uri("out")
    s3.proxy.inject("/bass.wav", status=403, code="AccessDenied", message="Access Denied", times=None)

    summary = run_flow(catalog, out)

    assert summary["failed_now"] == 1 and [f["stage"] for f in summary["failures"]] == ["write"]
    tables = manifest.read_manifests(out)
    assert tables["stems"].num_rows == 0 and tables["history_stems"].num_rows == 0
    orphans = {k for k in s3.keys("out/stems/")}
    assert sorted(k.rsplit("/", 1)[1] for k in orphans) == ["drums.wav", "vocals.wav"], "uploaded before the failure"
    time.sleep(CLOCK_SLACK_S + 1.5)  # past gc's clock slack and S3's whole-second modification times
    plan = plan_gc(out, grace_s=0)
    assert {r.uri.split(s3.name + "/", 1)[1] for r in plan.removals} == orphans
    assert {r.reason for r in plan.removals} == {"orphaned stem"}
    apply_gc(plan)
    assert s3.keys("out/stems/") == []

    s3.proxy.reset()
    assert run_flow(catalog, out)["ok_now"] == 1, "the rerun completes"
    _current_readable(out, 1)


def _plant(out: str, old: bool) -> list[str]:
    """An orphaned stem and an uncommitted part, as a killed attempt leaves them."""
    planted = [join(out, "stems", "ghost", "0" * 16, "20200101T000000Z-dead", "vocals.wav"),
               join(out, "manifests", "_parts", "shard-ghost", "20200101T000000-dead", "tracks.parquet")]
    for uri in planted:
        fs, path = filesystem(uri)
        fs.makedirs(os.path.dirname(path), exist_ok=True)
        fs.pipe_file(path, b"left by a dead attempt")
        if old and not uri.startswith("s3://"):
            os.utime(path, (time.time() - 7200, time.time() - 7200))
    return planted


@pytest.mark.parametrize("where", ["local", "s3"])
def test_gc_beside_a_run_writing_into_the_same_output(where, tmp_path, request, flow_env):
    if where == "s3":
        s3 = request.getfixturevalue("s3")
        catalog, out = _s3_catalog(s3, 4), s3.uri("out")
    else:
        catalog, out = _catalog(tmp_path / "in", 4), str(tmp_path / "out")
    run_flow(catalog, out, shard_size=4)
    old_stems = {s["uri"] for s in manifest.read_manifests(out)["stems"].to_pylist()}
    planted = _plant(out, old=True)
    time.sleep(2.0 + 2.0)  # older than the run by more than gc's clock slack (2 s) and S3's 1 s resolution

    done = threading.Event()
    result: dict = {}

    def forced_run() -> None:
        try:
            result["summary"] = run_flow(catalog, out, force=True, model_options={"delay_s": 0.4}, shard_size=1)
        finally:
            done.set()

    runner = threading.Thread(target=forced_run)
    runner.start()
    collected, removed = 0, set()
    while not done.is_set():
        plan = plan_gc(out, grace_s=0)
        removed |= {r.uri for r in plan.removals}
        apply_gc(plan)
        collected += 1
        time.sleep(0.2)
    runner.join()
    assert result.get("summary", {}).get("ok_now") == 4, result
    assert collected >= 3, "gc ran while the run was writing"
    tables = _current_readable(out, 4)
    assert not (removed & {s["uri"] for s in tables["stems"].to_pylist()}), "gc removed a stem the run then committed"
    assert all(not _exists(u) for u in planted), "the dead attempt's files were collected during the run"

    plan = plan_gc(out, grace_s=0)  # what the collections during the run had not seen superseded yet
    assert {r.uri for r in plan.removals} <= old_stems and {r.reason for r in plan.removals} <= {"superseded attempt"}
    apply_gc(plan)
    assert _stem_files_uris(out) == {s["uri"] for s in _current_readable(out, 4)["stems"].to_pylist()}
    assert not (old_stems & _stem_files_uris(out))


def _stem_files_uris(out: str) -> set[str]:
    fs, _ = filesystem(out)
    return {fs.unstrip_protocol(p) if out.startswith("s3://") else p for p in _stem_files(out)}


def _old_layout(out: Path, tid: str, settings_hash: str) -> list[str]:
    """A track committed by the layout before immutable stems: ``stems/<track_id>/<stem>.wav``."""
    uris = []
    for k, stem in enumerate(SOURCES):
        path = out / "stems" / tid / f"{stem}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, _tone(1.0, 300.0 + k), 8000)
        uris.append(str(path))
    track = TrackRow(tid, f"/in/{tid}.wav", 100, 1.0, 8000, 2, "ok", "test-gain", None, settings_hash, 0.1)
    stems = [StemRow(tid, s, u, "wav", 8000, 2, 8000, 1.0, -20.0) for s, u in zip(SOURCES, uris)]
    manifest.commit_shard(str(out), ShardResult(f"shard-old-{tid}", [track], stems, []))
    return uris


def test_old_layout_stays_readable_and_collectable(tmp_path):
    out = tmp_path / "out"
    old = _old_layout(out, "t1", "h1")
    stray = out / "stems" / "t2" / "vocals.wav"  # an old-layout stem of a track that then failed
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"half")
    os.utime(stray, (time.time() - 7200, time.time() - 7200))

    tables = manifest.read_manifests(str(out))
    assert [s["uri"] for s in tables["stems"].to_pylist()] == sorted(old, key=lambda u: Path(u).stem)
    assert manifest.committed_ok(str(out), "h1") == {"t1"}, "a rerun with the same settings skips it"
    plan = plan_gc(str(out), grace_s=0)
    assert [(r.uri, r.reason) for r in plan.removals] == [(str(stray), "orphaned stem")]
    apply_gc(plan)
    assert all(Path(u).exists() for u in old) and not stray.exists()

    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    with pytest.raises(GcError, match="outside this output"):
        plan_gc(str(moved), grace_s=0)

    new = join(str(out), "stems", "t1", "h2", "20261202T000000Z-new", "vocals.wav")
    Path(new).parent.mkdir(parents=True)
    sf.write(new, _tone(1.0, 500.0), 8000)
    track = TrackRow("t1", "/in/t1.wav", 100, 1.0, 8000, 2, "ok", "test-gain", None, "h2", 0.1)
    manifest.commit_shard(str(out), ShardResult("shard-new", [track], [StemRow("t1", "vocals", new, "wav", 8000, 2, 8000, 1.0, -20.0)], []))
    plan = plan_gc(str(out), grace_s=0)
    assert {r.uri for r in plan.removals} == set(old) and {r.reason for r in plan.removals} == {"superseded attempt"}


def test_leases_protect_a_running_run_and_stale_ones_go(tmp_path):
    out = str(tmp_path / "out")
    fresh = join(out, "stems", "t9", "h", "a", "vocals.wav")
    Path(fresh).parent.mkdir(parents=True)
    Path(fresh).write_bytes(b"being written")
    with RunLease(out, run_id="live-run") as lease:
        os.utime(fresh, None)
        plan = plan_gc(out, grace_s=0)
        assert plan.live_runs == ["live-run"] and plan.removals == [] and plan.protected == 1
        assert Path(lease.alive_uri).exists()
    assert not Path(lease.started_uri).exists(), "the lease goes with the run"
    assert plan_gc(out, grace_s=0).removals == [], "younger than the clock slack"
    time.sleep(CLOCK_SLACK_S + 0.5)
    assert [r.uri for r in plan_gc(out, grace_s=0).removals] == [fresh]

    dead = RunLease(out, run_id="dead-run")
    dead.__enter__()
    dead._stop.set()
    dead._thread.join()
    past = time.time() - 3600
    os.utime(dead.alive_uri, (past, past))
    os.utime(dead.started_uri, (past, past))
    plan = plan_gc(out, grace_s=0)
    assert plan.live_runs == [] and {r.reason for r in plan.removals} == {"stale lease", "orphaned stem"}
    apply_gc(plan)
    assert not Path(dead.started_uri).exists() and not Path(fresh).exists()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_lease_between_its_two_first_writes_is_live(where, tmp_path, request):
    """A run has written ``<id>.json`` and not yet ``<id>.alive`` (or only the latter survives): the
    collector must neither call it stale nor collect the run's unreferenced files."""
    out = request.getfixturevalue("s3").uri("out") if where == "s3" else str(tmp_path / "out")
    lease = RunLease(out, run_id="starting")
    being_written = join(out, "stems", "t1", "h", "a", "vocals.wav")
    for uri, data in ((lease.started_uri, b"{}"), (being_written, b"not committed yet")):
        fs, path = filesystem(uri)
        fs.makedirs(os.path.dirname(path), exist_ok=True)
        fs.pipe_file(path, data)
    time.sleep(CLOCK_SLACK_S + 1.5)
    plan = plan_gc(out, grace_s=0)
    assert plan.live_runs == ["starting"] and plan.removals == [] and plan.protected == 1

    fs, path = filesystem(lease.started_uri)
    fs.rm_file(path)
    alive_fs, alive_path = filesystem(lease.alive_uri)
    alive_fs.pipe_file(alive_path, b"1")
    plan = plan_gc(out, grace_s=0)
    assert plan.live_runs == ["starting"] and plan.removals == [], "a heartbeat alone: its start unknown, all kept"


def test_gc_command_dry_run_then_remove(tmp_path):
    out = tmp_path / "out"
    _old_layout(out, "t1", "h1")
    orphan = out / "stems" / "t1" / "h9" / "20260101T000000Z-x" / "drums.wav"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"x" * 1000)
    os.utime(orphan, (time.time() - 7200, time.time() - 7200))
    demix = [str(BIN / "demix"), "gc", str(out)]

    dry = subprocess.run([*demix, "--dry-run"], capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0, dry.stderr
    assert f"would remove {orphan} (1000 bytes, orphaned stem)" in dry.stdout
    assert "would free 1000 bytes" in dry.stdout and orphan.exists()

    done = subprocess.run(demix, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"removing {orphan}" in done.stdout and "freed 1000 bytes" in done.stdout
    assert not orphan.exists() and not orphan.parent.parent.exists(), "emptied folders go too"
    assert (out / "stems" / "t1" / "vocals.wav").exists()

    bad = subprocess.run([*demix, "--keep", "0"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--keep must be >= 1" in bad.stderr
