"""`demix run --ray-address` joins a Ray cluster started on loopback (`ray start --head
--node-ip-address 127.0.0.1`): the driver pins itself to 127.0.0.1 too instead of looking for a raylet
on the machine's outward interface (it failed with `ConnectionError: Failed to connect to Ray cluster
at <other address>`). The head runs in its own temp folder and is stopped by its PID."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def loopback_head(tmp_path):
    port = _free_port()
    temp = Path("/tmp") / f"demix-ray-{os.getpid()}-{port}"  # short: Ray's socket paths have a length limit
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: otherwise `ray start` registers the node under the machine's
    # outward address even with --node-ip-address 127.0.0.1 (the README says so for users)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "2",
         "--include-dashboard", "false", "--temp-dir", str(temp), "--block"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        assert head.poll() is None, head.stdout.read()
        time.sleep(0.5)
    else:
        pytest.fail("the Ray head did not listen within 120 s")
    yield f"127.0.0.1:{port}"
    os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops the processes it started
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
    for pid in _pids_mentioning(str(temp)):  # any Ray process of this head that left its process group
        os.kill(pid, signal.SIGKILL)


def _pids_mentioning(text: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if text in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


def test_run_joins_a_cluster_on_loopback(loopback_head, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    t = np.arange(22050) / 22050
    for i, f in enumerate((220.0, 330.0)):
        sf.write(inputs / f"tone{i}.wav", (0.3 * np.sin(2 * np.pi * f * t)).astype(np.float32), 22050)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_ENABLE_WINDOWS"))}
    done = subprocess.run(
        [str(BIN / "demix"), "run", str(inputs), "-o", str(out), "--ray-address", loopback_head, "--model", "mixture",
         "--presence", "none", "--no-progress"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Failed to connect" not in done.stderr
    tracks = pq.read_table(out / "manifests" / "tracks.parquet").to_pylist()
    assert sorted(r["status"] for r in tracks) == ["ok", "ok"]
    report = out / "report" / "index.html"
    assert f"report:            {report}" in done.stdout and report.is_file(), "the summary names the HTML report"
