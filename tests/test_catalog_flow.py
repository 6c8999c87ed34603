"""The separate-catalog flow end to end through the real services: Prefect's ephemeral API, a local Ray
instance and an S3 endpoint (moto's server behind a fault-injecting proxy), one of each per session.

Models come from the registry by name in every Ray worker: ``test-gain`` (tests/demix_test_models.py,
8 kHz, known answer, optional delay / crash / NaN) through ``RunSpec.registry_module``, and the
registry's own ``unet`` in a small configuration.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from demix.pipeline.batch import manifest
from demix.pipeline.data.synth import toy_song

pytest_plugins = ["conftest_services"]

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[1]
TEST_MODEL = {"model": "test-gain", "registry_module": "demix_test_models"}


@pytest.fixture
def flow_env(ray_cluster, prefect_api):
    """Ray and Prefect are up; returns ``(ray address, Prefect API URL)``."""
    return ray_cluster, prefect_api


def run_flow(catalog: str, out: str, **overrides) -> dict:
    from demix.flows.separate_catalog import separate_catalog

    kwargs = {
        **TEST_MODEL, "settings": {"segment": 1.0}, "workers_count": 1, "shard_size": 2, "progress": False,
        **overrides,
    }
    return separate_catalog(catalog=catalog, out=out, **kwargs)


def _song(seconds: float, rate: int, seed: int, mono: bool = False) -> np.ndarray:
    mix = toy_song(seconds, rate, seed=seed)["mixture"]
    return (mix.mean(0) if mono else mix.T).astype(np.float32)


def _encoded(seconds: float, rate: int, seed: int, fmt: str, mono: bool = False) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, _song(seconds, rate, seed, mono), rate, format=fmt)
    return buf.getvalue()


GOOD = {
    "Café \"quoted\" (live) 'take 2'.wav": lambda: _encoded(2.0, 22050, 1, "WAV"),
    "space name [x].flac": lambda: _encoded(2.0, 16000, 2, "FLAC", mono=True),
    "ünïcödé 日本 (demo).ogg": lambda: _encoded(2.0, 22050, 3, "OGG"),
}
BAD = {
    "zero bytes.wav": lambda: b"",
    "random.mp3": lambda: np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
    "truncated.flac": lambda: (lambda d: d[: len(d) * 2 // 5])(_encoded(2.0, 16000, 4, "FLAC")),
    "text file.ogg": lambda: b"hello, I am a text file, not Ogg Vorbis\n",
}


def _stem_frames(fs, key: str) -> tuple[int, int, int]:
    data, rate = sf.read(io.BytesIO(fs.cat_file(key)), dtype="float32", always_2d=True)
    return rate, data.shape[1], data.shape[0]


@pytest.mark.parametrize("kind", ["csv", "folder"])
def test_mixed_catalog_on_s3(kind, s3, flow_env):
    """Good files with awkward names next to broken ones, catalog and outputs on S3: one decode failure
    row per bad file, stems and rows for every good one, nothing written outside OUT."""
    fs = s3.fs
    for name, make in {**GOOD, **BAD}.items():
        fs.pipe_file(f"{s3.name}/cat/{name}", make())
    escape_id = "../../escape"
    if kind == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["uri", "track_id"])
        for i, name in enumerate(sorted({**GOOD, **BAD})):
            writer.writerow([name, escape_id if i == 0 else ""])  # relative to the table's folder
        fs.pipe_file(f"{s3.name}/cat/catalog.csv", buf.getvalue().encode())
        catalog = s3.uri("cat/catalog.csv")
    else:
        catalog = s3.uri("cat/")
    out = s3.uri("out")

    summary = run_flow(catalog, out, shard_size=3)

    assert summary["catalog_tracks"] == 7 and summary["skipped_already_committed"] == 0
    assert (summary["ok_now"], summary["failed_now"]) == (3, 4), summary["failures"]
    assert (summary["committed_ok_total"], summary["committed_failed_total"]) == (3, 4)
    tables = manifest.read_manifests(out)
    tracks = tables["tracks"].to_pylist()
    assert len(tracks) == len({t["track_id"] for t in tracks}) == 7
    by_uri = {t["source_uri"]: t for t in tracks}
    assert set(by_uri) == {s3.uri(f"cat/{n}") for n in {**GOOD, **BAD}}
    assert {u for u, t in by_uri.items() if t["status"] == "ok"} == {s3.uri(f"cat/{n}") for n in GOOD}
    failures = tables["failures"].to_pylist()
    assert sorted(f["source_uri"] for f in failures) == sorted(s3.uri(f"cat/{n}") for n in BAD), "one row per bad file"
    assert {f["stage"] for f in failures} == {"decode"}, failures
    assert all(f["message"] and f["error_type"] == "AudioError" for f in failures)
    assert sorted(f["source_uri"] for f in summary["failures"]) == sorted(f["source_uri"] for f in failures)

    stems = tables["stems"].to_pylist()
    ok_ids = {t["track_id"] for t in tracks if t["status"] == "ok"}
    assert sorted((s["track_id"], s["stem"]) for s in stems) == sorted(
        (tid, stem) for tid in ok_ids for stem in ("vocals", "drums", "bass", "other")
    )
    for s in stems:
        assert re.fullmatch(rf"{re.escape(out)}/stems/{s['track_id']}/[0-9a-f]{{16}}/[0-9TZ]{{16}}-[0-9a-f]{{10}}/{s['stem']}.wav", s["uri"])
        assert _stem_frames(fs, s["uri"]) == (8000, 2, 16000) == (s["sample_rate"], s["channels"], s["num_frames"])
    if kind == "csv":
        assert "-..-escape" in ok_ids, "the user's id, made safe"
    keys = s3.keys()
    written = [k for k in keys if not k.startswith("cat/")]
    assert written and all(k.startswith("out/") for k in written), "every output key under OUT"
    assert not [k for k in written if k.endswith(".part") or "/.demix-" in k], "no temporary keys"
    stem_keys = {k for k in written if k.startswith("out/stems/")}
    assert stem_keys == {s["uri"][len(s3.uri()) + 1 :] for s in stems}, "no stem of a failed track"
    assert {k.rsplit("/", 1)[1] for k in written if k.startswith("out/manifests/") and "/_" not in k} == {
        "tracks.parquet", "stems.parquet", "failures.parquet",
    }


def test_credentials_never_leak(s3, flow_env, capfd):
    """Canary credentials (the session's AWS_* variables) appear in no log line, no output, no Prefect
    flow run parameter or log, and no byte of the manifests."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    secret, key_id = os.environ["AWS_SECRET_ACCESS_KEY"], os.environ["AWS_ACCESS_KEY_ID"]
    assert secret.startswith("CANARY") and "CANARY" in key_id
    fs = s3.fs
    fs.pipe_file(f"{s3.name}/in/good.wav", _encoded(2.0, 8000, 5, "WAV"))
    fs.pipe_file(f"{s3.name}/in/bad.ogg", b"not audio")
    s3.proxy.inject("/out/stems/", status=403, code="AccessDenied", message="Access Denied", times=1)
    out = s3.uri("out")

    state = run_flow(s3.uri("in"), out, progress=True, return_state=True)
    summary = state.result()
    assert summary["catalog_tracks"] == 2 and summary["failed_now"] == 2, summary
    assert {f["stage"] for f in summary["failures"]} == {"decode", "write"}, "the denied stem write is a failure row"
    APILogHandler().flush()
    captured = capfd.readouterr()
    text = captured.out + captured.err
    for canary in (secret, key_id):
        assert canary not in text

    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs()
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    assert flow_run_id in {r.id for r in runs}
    assert logs, "the flow's logs reach the Prefect API"
    stored = json.dumps([r.parameters for r in runs], default=str) + "\n".join(log.message for log in logs)
    assert "out" in json.dumps(next(r.parameters for r in runs if r.id == flow_run_id))
    for canary in (secret, key_id):
        assert canary not in stored

    keys = [k for k in s3.keys("out") if k.endswith((".parquet", ".json"))]
    assert any("_commits/" in k for k in keys) and any(k.endswith("failures.parquet") for k in keys)
    for key in keys:
        blob = fs.cat_file(f"{s3.name}/{key}")
        for canary in (secret, key_id):
            assert canary.encode() not in blob, key


def test_commit_retried_by_the_flow_once_s3_gives_up(s3, flow_env):
    """The commit record's PUT meets SlowDown until botocore and s3fs give up (a bounded number of
    requests); the flow's commit task retries and its next attempt commits. One commit record."""
    from demix.pipeline.io.storage import S3_MAX_ATTEMPTS, S3FS_RETRIES

    s3.fs.pipe_file(f"{s3.name}/in/good.wav", _encoded(2.0, 8000, 8, "WAV"))
    budget = S3_MAX_ATTEMPTS * S3FS_RETRIES
    s3.proxy.inject("/out/manifests/_commits/", status=503, code="SlowDown", times=budget)
    out = s3.uri("out")
    summary = run_flow(s3.uri("in"), out)
    assert summary["ok_now"] == 1 and summary["committed_ok_total"] == 1
    assert s3.proxy.count("PUT", "/out/manifests/_commits/") == budget + 1
    (commit,) = manifest.list_commits(out)
    attempts = {k.split("/")[4] for k in s3.keys("out/manifests/_parts")}
    assert len(attempts) == 2 and commit.attempt in attempts, "the failed attempt's parts are orphans"
    _assert_each_track_once(out, 1)


@pytest.mark.parametrize("fault", ["missing", "forbidden"])
def test_permanent_errors_fail_the_flow_without_retries(fault, s3, flow_env):
    """A missing or forbidden catalog fails the run at the first attempt with a StorageError naming it
    (no Prefect retry: none could fix it)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from demix.pipeline.io.storage import StorageError

    catalog = s3.uri("cat/list.csv")
    if fault == "forbidden":
        s3.fs.pipe_file(f"{s3.name}/cat/list.csv", b"uri\na.wav\n")
        s3.proxy.inject("/cat/list.csv", status=403, code="AccessDenied", message="Access Denied", methods=("GET", "HEAD"))
    state = run_flow(catalog, s3.uri("out"), return_state=True)
    assert state.is_failed()
    with pytest.raises(StorageError) as info:
        state.result()
    assert catalog in str(info.value) and info.value.stage == "read"
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    plan_runs = [t for t in task_runs if t.task_key.startswith("plan")]
    assert len(plan_runs) == 1 and plan_runs[0].run_count == 1, "a permanent error must not be retried"
    assert s3.proxy.count("HEAD", "/cat/list.csv") + s3.proxy.count("GET", "/cat/list.csv") <= 2
    assert s3.keys("out") == []


def _local_catalog(folder: Path, n: int, seconds: float = 2.0, rate: int = 8000) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"track {i:02d}.wav"
        sf.write(path, _song(seconds, rate, seed=10 + i), rate)
        paths.append(path)
    return paths


def _assert_each_track_once(out: str, n: int) -> dict:
    tables = manifest.read_manifests(out)
    tracks = tables["tracks"].to_pylist()
    assert len(tracks) == len({t["track_id"] for t in tracks}) == n
    assert all(t["status"] == "ok" for t in tracks), tables["failures"].to_pylist()
    stems = tables["stems"].to_pylist()
    assert len(stems) == len({(s["track_id"], s["stem"]) for s in stems}) == 4 * n
    committed = [tid for c in manifest.list_commits(out) for tid in c.track_ids]
    assert sorted(committed) == sorted(t["track_id"] for t in tracks), "each track in exactly one commit"
    consolidated = pq.read_table(os.path.join(out, "manifests", "tracks.parquet"))
    assert consolidated.num_rows == n
    return tables


def test_separator_actor_killed_mid_run(tmp_path, flow_env):
    """The first forward call anywhere kills its actor process (os._exit): Ray restarts the actor and
    retries its batch; every track is still separated and recorded exactly once."""
    _local_catalog(tmp_path / "in", 4)
    marker = tmp_path / "died-once"
    out = str(tmp_path / "out")
    summary = run_flow(str(tmp_path / "in"), out, model_options={"die_marker": str(marker)})
    assert marker.exists(), "the actor did not die: the test proves nothing"
    assert summary["ok_now"] == 4 and summary["failed_now"] == 0
    _assert_each_track_once(out, 4)


def test_track_that_always_kills_its_actor_becomes_a_failure_row(tmp_path, flow_env):
    """A track whose every attempt kills the separator process (think: a decoder segfault) is given up
    after a bounded number of attempts and recorded as failed; the run ends and the others succeed."""
    from demix.pipeline.batch.workers import MAX_ATTEMPTS_PER_TRACK

    folder = tmp_path / "in"
    folder.mkdir()
    for i, peak in enumerate([0.3, 0.95, 0.3]):
        song = _song(2.0, 8000, seed=20 + i)
        sf.write(folder / f"t{i}.wav", song * (peak / np.abs(song).max()), 8000)
    out = str(tmp_path / "out")
    summary = run_flow(str(folder), out, model_options={"die_above": 0.6}, shard_size=3)
    assert (summary["ok_now"], summary["failed_now"]) == (2, 1), summary["failures"]
    (failure,) = summary["failures"]
    assert failure["source_uri"].endswith("t1.wav") and failure["stage"] == "separate"
    assert failure["error_type"] == "WorkerDied"
    rows = manifest.read_manifests(out)["failures"].to_pylist()
    assert [r["attempts"] for r in rows] == [MAX_ATTEMPTS_PER_TRACK]
    assert len(manifest.list_commits(out)) == 1, "the shard holding the bad track is committed"


def test_flow_sigkilled_halfway_then_rerun(tmp_path, flow_env):
    """SIGKILL the whole flow process once a shard is committed; the rerun completes the catalog,
    skips (and does not rewrite) what was committed, and records every track once."""
    ray_address, api_url = flow_env
    n = 6
    _local_catalog(tmp_path / "in", n)
    out = tmp_path / "out"
    params = dict(
        catalog=str(tmp_path / "in"), out=str(out), **TEST_MODEL, model_options={"delay_s": 0.4},
        settings={"segment": 1.0}, workers_count=1, shard_size=1, progress=False,
    )
    code = (
        "import json, sys\n"
        "from demix.flows.separate_catalog import separate_catalog\n"
        "separate_catalog(**json.loads(sys.argv[1]), ray_address=sys.argv[2])\n"
    )
    env = dict(os.environ, PREFECT_API_URL=api_url, PYTHONPATH=os.environ["PYTHONPATH"])
    log = open(tmp_path / "killed-run.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-c", code, json.dumps(params), ray_address], cwd=ROOT, env=env,
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    commits_dir = out / "manifests" / "_commits"
    deadline = time.monotonic() + 180
    try:
        while not (commits_dir.is_dir() and any(p.suffix == ".json" for p in commits_dir.iterdir())):
            assert proc.poll() is None, (tmp_path / "killed-run.log").read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "no shard was committed in time"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        log.close()
    assert proc.returncode == -signal.SIGKILL

    before = manifest.list_commits(str(out))
    done = {tid for c in before for tid in c.track_ids}
    assert 1 <= len(done) < n, "the run must be killed halfway"
    stamps = {p: p.stat().st_mtime_ns for tid in done for p in (out / "stems" / tid).rglob("*.*")}
    assert len(stamps) == 4 * len(done)

    summary = run_flow(**params)

    assert summary["skipped_already_committed"] == len(done)
    assert summary["processed_now"] == summary["ok_now"] == n - len(done)
    tables = _assert_each_track_once(str(out), n)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps, "committed stems were rewritten"
    for t in tables["tracks"].to_pylist():
        if t["track_id"] in done:
            assert t["attempt"] in {c.attempt for c in before}, "a committed track was recomputed"

    again = run_flow(**params)  # a third run finds nothing to do
    assert (again["skipped_already_committed"], again["processed_now"]) == (n, 0)
    assert len(manifest.list_commits(str(out))) == n


def test_source_names_cannot_write_outside_out(tmp_path, flow_env):
    """A catalog naming ``../../etc/x.wav`` and a track id ``../../etc/x``: stems land under OUT only
    (with the registry's own shipped ``unet``, loaded and hash-checked by name in the Ray workers)."""
    base = tmp_path / "a" / "b"
    base.mkdir(parents=True)
    (tmp_path / "etc").mkdir()
    sf.write(tmp_path / "etc" / "x.wav", _song(1.0, 44100, 6), 44100)
    sf.write(base / "good.wav", _song(1.0, 44100, 7), 44100)
    (base / "cat.csv").write_text(
        "uri,track_id\n../../etc/x.wav,\ngood.wav,../../etc/x\n../../../../../../../../../../etc/x.wav,\n"
    )
    out = base / "out"
    before = {p for p in tmp_path.rglob("*")}
    etc_before = set(os.listdir("/etc"))

    summary = run_flow(
        str(base / "cat.csv"), str(out), model="unet", registry_module=None, settings={"segment": 1.0},
    )

    assert (summary["ok_now"], summary["failed_now"]) == (2, 1), summary["failures"]
    assert [f["stage"] for f in summary["failures"]] == ["read"]
    created = {p for p in tmp_path.rglob("*")} - before
    assert created and all(p == out or out in p.parents for p in created), sorted(map(str, created - {out}))
    assert set(os.listdir("/etc")) == etc_before
    tracks = manifest.read_manifests(str(out))["tracks"].to_pylist()
    ids = {t["track_id"] for t in tracks}
    assert "-..-etc-x" in ids and all("/" not in i and not i.startswith(".") for i in ids)
    assert {p.name for p in (out / "stems").iterdir()} == {t["track_id"] for t in tracks if t["status"] == "ok"}


def test_a_track_failing_again_counts_its_attempts(tmp_path, flow_env):
    """A corrupt file fails in each run: its failure row says how many runs tried it."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "good.wav").write_bytes(_encoded(2.0, 8000, 9, "WAV"))
    (folder / "corrupt.flac").write_bytes(b"fLaC but not really")
    out = str(tmp_path / "out")
    first = run_flow(str(folder), out)
    second = run_flow(str(folder), out)
    assert (first["ok_now"], first["failed_now"]) == (1, 1)
    assert (second["skipped_already_committed"], second["failed_now"]) == (1, 1)
    (row,) = pq.read_table(second["manifests"]["failures"]).to_pylist()
    assert row["source_uri"] == str(folder / "corrupt.flac") and row["attempts"] == 2
