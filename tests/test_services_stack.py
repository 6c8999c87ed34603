"""The scale-out stack started for real (issue 11): a Prefect server with its own database, the catalog
flow deployed from infra/prefect.yaml onto a ``process`` work pool and picked up by a ``prefect
worker``, a Ray cluster of two node processes joined with ``ray_address``, S3 served by moto's server;
everything on 127.0.0.1 (tests/services_stack.py starts and stops the processes).

One catalog run goes through the whole stack; the second Ray node is stopped while it runs. The run
then finishes on the head or fails saying why, and a rerun through the deployment completes: every
track committed exactly once, every stem readable, and the canary credentials nowhere in what the
Prefect server holds (the runs' parameters and logs through its API, the bytes of its database).
"""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest
import soundfile as sf

from demix.pipeline.batch import manifest
from services_stack import POOL, Stack, wait_until

pytest_plugins = ["conftest_services"]

pytestmark = [pytest.mark.services, pytest.mark.timeout(600)]

N_TRACKS = 24
SHARD_SIZE = 2
RUN = {  # the deployment's parameters this test overrides (catalog, out and ray_address besides)
    "model": "test-gain", "registry_module": "demix_test_models", "model_options": {"delay_s": 0.2},
    "settings": {"segment": 1.0}, "presence": "none", "progress": False, "shard_size": SHARD_SIZE,
}


@pytest.fixture
def stack(s3, tmp_path):
    """Prefect server, deployment, worker and a two-node Ray cluster, stopped whatever happens."""
    services = Stack(tmp_path)
    try:
        services.start_all(head_cpus=1, node_cpus=2)
        yield services
    finally:
        services.close()


def _catalog(s3, n: int, seconds: float = 3.0, rate: int = 8000) -> list[str]:
    """``n`` tones as WAV files under ``in/``; their URIs."""
    t = np.arange(int(seconds * rate)) / rate
    uris = []
    for i in range(n):
        buf = io.BytesIO()
        sf.write(buf, (0.3 * np.sin(2 * np.pi * (180.0 + 15.0 * i) * t)).astype(np.float32), rate, format="WAV")
        s3.fs.pipe_file(f"{s3.name}/in/tone-{i:02d}.wav", buf.getvalue())
        uris.append(s3.uri(f"in/tone-{i:02d}.wav"))
    return uris


def _commits(out: str) -> list[manifest.Commit]:
    return manifest.list_commits(out)


def _stop_node2_mid_run(stack: Stack, run_id: str, out: str, shards: int) -> tuple[list[str], int]:
    """Once a separator actor works on the second node and a shard is committed, stop that node
    (SIGTERM to its ``ray start`` process group, SIGKILL after 20 s); the actors it held and how many
    shards were committed before."""
    seen: list[str] = []

    def ready() -> bool:
        # a busy actor's process title names the method it runs: Ray Data's MapWorker.submit
        seen[:] = seen or [t for t in stack.actors_on("ray-node2") if ".submit" in t]
        state = stack.flow_run(run_id)["state"]["type"]
        assert state in ("SCHEDULED", "PENDING", "RUNNING"), f"the run ended before the node was stopped: {state}"
        return bool(seen) and len(_commits(out)) >= 1

    wait_until("an actor busy on node 2 and a first commit", ready, 240, stack.services["prefect-worker"], poll=0.2)
    before = len(_commits(out))
    stack.services["ray-node2"].stop(grace=20)
    assert before < shards, "the run was over before the node was stopped: the test proves nothing"
    return seen, before


def _assert_outcome(run: dict, logs: list[dict]) -> str:
    """The first run finished, or failed with a message that says a Ray node or worker was lost."""
    state = run["state"]
    if state["type"] == "COMPLETED":
        return "completed"
    message = (state.get("message") or "").lower()
    assert state["type"] in ("FAILED", "CRASHED"), state
    assert "node" in message and any(w in message for w in ("died", "dead", "lost", "terminated")), (
        state, [log["message"] for log in logs][-20:],
    )
    return f"{state['type'].lower()}: {state.get('message')}"


def _assert_each_track_once(out: str, uris: list[str], first: list[manifest.Commit]) -> dict:
    """Every catalog track has one ok row and sits in exactly one commit; what the first run
    committed was not redone by the rerun."""
    tables = manifest.read_manifests(out)
    tracks = tables["tracks"].to_pylist()
    assert sorted(t["source_uri"] for t in tracks) == sorted(uris)
    ids = {t["track_id"] for t in tracks}
    assert len(ids) == len(uris)
    assert all(t["status"] == "ok" for t in tracks), tables["failures"].to_pylist()
    commits = _commits(out)
    committed = sorted(tid for c in commits for tid in c.track_ids)
    assert committed == sorted(ids), "each track in exactly one commit, over both runs"
    by_first = {tid: c.attempt for c in first for tid in c.track_ids}
    for t in tracks:
        if t["track_id"] in by_first:
            assert t["attempt"] == by_first[t["track_id"]], "a track committed by the first run was redone"
    stems = tables["stems"].to_pylist()
    assert len(stems) == len({(s["track_id"], s["stem"]) for s in stems}) == 4 * len(ids)
    return tables


def _assert_stems_readable(s3, stems: list[dict]) -> None:
    fs = s3.fs
    fs.invalidate_cache()
    for row in stems:
        with fs.open(row["uri"], "rb") as f:
            audio, rate = sf.read(io.BytesIO(f.read()), always_2d=True)
        assert (rate, audio.shape[0]) == (row["sample_rate"], row["num_frames"]), row["uri"]
        assert np.isfinite(audio).all() and np.abs(audio).max() > 0, row["uri"]


def _assert_no_secret(stack: Stack, run_ids: list[str], out: str) -> None:
    """The canary credentials (and the Ray cluster's token) appear in no run's parameters or logs, not
    in the deployment, and in no byte of the server's database (read once the server stopped) nor in
    the worker's output."""
    from conftest_services import CANARY_KEY_ID, CANARY_SECRET

    stored = [stack.request("GET", f"/deployments/{stack.deployment['id']}")]
    for run_id in run_ids:
        run, logs = stack.flow_run(run_id), stack.logs_of(run_id)
        assert run["parameters"]["out"] == out and logs, "the server holds the run and its logs"
        assert (run["deployment_id"], run["work_pool_name"]) == (stack.deployment["id"], POOL)
        stored += [run, logs]
    text = json.dumps(stored)
    stack.services["prefect-server"].stop()
    files = [p for p in stack.prefect_home.rglob("*") if p.is_file()]
    assert any(out.encode() in p.read_bytes() for p in files if p.name.startswith("prefect.db")), files
    for canary in (CANARY_SECRET, CANARY_KEY_ID, stack.ray_token):
        assert canary not in text
        assert canary not in stack.services["prefect-worker"].log.read_text(errors="replace")
        for path in files:
            assert canary.encode() not in path.read_bytes(), path


def test_catalog_through_the_stack_survives_losing_a_node(s3, stack):
    """A run through the deployment on three separator actors (one on the head, two on node 2), node
    2 stopped once it works and a shard is committed; then the same run again, on the head alone."""
    uris = _catalog(s3, N_TRACKS)
    out = s3.uri("out")
    params = {**RUN, "catalog": s3.uri("in/"), "out": out, "ray_address": stack.ray_address, "workers_count": 3}
    shards = -(-N_TRACKS // SHARD_SIZE)
    started = time.monotonic()

    first_id = stack.run_deployment(stack.deployment["id"], params)
    on_node2, before = _stop_node2_mid_run(stack, first_id, out, shards)
    assert on_node2, "no separator actor ran on the second node"
    first = stack.wait_final(first_id, 300)
    outcome = _assert_outcome(first, stack.logs_of(first_id))
    first_commits = _commits(out)
    print(f"first run: {outcome}\n{before} of {shards} shards committed when node 2 stopped (holding {on_node2}), "
          f"{len(first_commits)} at its end ({time.monotonic() - started:.0f} s)")

    second_id = stack.run_deployment(stack.deployment["id"], params)  # the same run, on the head alone now
    second = stack.wait_final(second_id, 300)
    assert second["state"]["type"] == "COMPLETED", (second["state"], stack.services["prefect-worker"].tail())
    print(f"rerun completed ({time.monotonic() - started:.0f} s)")

    tables = _assert_each_track_once(out, uris, first_commits)
    _assert_stems_readable(s3, tables["stems"].to_pylist())
    _assert_no_secret(stack, [first_id, second_id], out)
