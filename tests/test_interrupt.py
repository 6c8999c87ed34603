"""``demix run`` as a user runs it, in a subprocess of its own (its own Prefect ephemeral API, its own
local Ray): Ctrl-C (SIGINT to the whole process group, as a terminal sends it) stops it cleanly and
quickly, a rerun completes the catalog, ``--dry-run`` and a no-op rerun start neither Prefect nor
Ray, ``--json`` prints one object, and library chatter shows only with ``-v``.

The model is ``test-slow`` (tests/demix_test_models.py: known answer, a delay per chunk), registered
in every process of the run by a ``sitecustomize`` module on ``PYTHONPATH``, which also records at
exit whether Prefect or Ray was imported at all.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from demix.pipeline.batch import manifest
from demix.pipeline.data.synth import toy_song

pytestmark = pytest.mark.timeout(600)

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
TRACKS = 6
SITECUSTOMIZE = """\
import atexit, json, os, sys
if sys.argv[:1] == ["-c"] or sys.argv[0].endswith("default_worker.py"):  # the CLI and Ray's workers
    import demix_test_models  # registers test-slow

def _record():
    path = os.environ.get("DEMIX_TEST_IMPORTS")
    if path and os.getpid() == int(os.environ.get("DEMIX_TEST_CLI_PID", "-1")):
        with open(path, "w") as f:
            json.dump(sorted(m for m in ("prefect", "ray") if m in sys.modules), f)

atexit.register(_record)
"""
CHATTER = ("core_worker.cc", "Token authentication is enabled", "Starting temporary server", "Finished in state")


class Cli:
    """Runs ``python -m demix.pipeline.cli`` with the test registry and a private Prefect home."""

    def __init__(self, base: Path) -> None:
        self.base = base
        site = base / "site"
        site.mkdir(parents=True, exist_ok=True)
        (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
        env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "RAY_ADDRESS", "PREFECT_LOGGING_LEVEL")}
        env["PYTHONPATH"] = os.pathsep.join([str(site), str(TESTS), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env["PREFECT_HOME"] = str(base / "prefect-home")
        env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "180"  # a fresh database on a busy machine
        env["DEMIX_TEST_DELAY_S"] = "0.3"
        self.env = env
        self.runs = 0

    def start(self, *args: str) -> tuple[subprocess.Popen, Path]:
        """Start the command; its stdout goes to ``runN.out``, its stderr to ``runN.err``."""
        self.runs += 1
        stem = self.base / f"run{self.runs}"
        with open(f"{stem}.out", "wb") as out, open(f"{stem}.err", "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-c", "import os, sys; os.environ['DEMIX_TEST_CLI_PID'] = str(os.getpid()); "
                 "from demix.pipeline.cli import main; from demix.pipeline.cli._process import exit_process; "
                 "exit_process(main(sys.argv[1:]))", *args],  # as the console script ends (`entry`)
                cwd=ROOT, env={**self.env, "DEMIX_TEST_IMPORTS": f"{stem}.imports.json"}, stdout=out, stderr=err,
                start_new_session=True,
            )
        return proc, stem

    @staticmethod
    def results(stem: Path) -> tuple[str, str, list[str] | None]:
        """stdout, stderr, and which of Prefect and Ray the command imported (None: it recorded nothing)."""
        imports = Path(f"{stem}.imports.json")
        return (
            Path(f"{stem}.out").read_text(errors="replace"), Path(f"{stem}.err").read_text(errors="replace"),
            json.loads(imports.read_text()) if imports.exists() else None,
        )

    def run(self, *args: str, timeout: float = 300) -> tuple[int, str, str, list[str] | None]:
        proc, stem = self.start(*args)
        try:
            proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        return (proc.returncode, *self.results(stem))


def _catalog(folder: Path, n: int) -> None:
    folder.mkdir(parents=True)
    for i in range(n):
        sf.write(folder / f"t{i}.wav", toy_song(3.0, 8000, seed=i)["mixture"].T.astype(np.float32), 8000)


RUN_ARGS = ("--model", "test-slow", "--shard-size", "1", "--workers", "1", "--device", "cpu", "--presence", "energy")


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A ``demix run`` sent SIGINT (to its process group) once its first shard is committed."""
    base = tmp_path_factory.mktemp("interrupt")
    _catalog(base / "in", TRACKS)
    cli, out = Cli(base), base / "out"
    proc, stem = cli.start("run", str(base / "in"), "-o", str(out), *RUN_ARGS)
    commits = out / "manifests" / "_commits"
    deadline = time.monotonic() + 240
    try:
        while not (commits.is_dir() and any(p.suffix == ".json" for p in commits.iterdir())):
            assert proc.poll() is None, "\n".join(cli.results(stem)[:2])[-3000:]
            assert time.monotonic() < deadline, "no shard was committed in time"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        sent = time.monotonic()
        proc.wait(timeout=90)
        seconds = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    stdout, stderr, _ = cli.results(stem)
    return {"cli": cli, "base": base, "out": out, "rc": proc.returncode, "seconds": seconds, "log": stdout + stderr}


def test_ctrl_c_stops_the_run_with_130_and_no_retry_flood(interrupted):
    log = interrupted["log"]
    assert interrupted["rc"] == 130, log[-3000:]
    assert interrupted["seconds"] < 60, f"exited {interrupted['seconds']:.0f} s after Ctrl-C"
    assert "Unable to connect" not in log and "Retry " not in log, log[-3000:]
    assert "SIGTERM handler is not set" not in log, "the abandoned job started a new Ray"
    assert "Ctrl-C: stopping" in log
    assert "(interrupted: rerun the same command to resume)" in log


def test_ctrl_c_leaves_nothing_half_committed(interrupted):
    out = interrupted["out"]
    commits = manifest.list_commits(str(out))
    done = {tid for c in commits for tid in c.track_ids}
    assert 1 <= len(done) < TRACKS, "the run must stop halfway"
    for c in commits:
        for key in c.parts.values():
            assert (out / "manifests" / key).is_file(), key
    tables = manifest.read_manifests(str(out))
    assert sorted(tables["tracks"].column("track_id").to_pylist()) == sorted(done)
    for uri in tables["stems"].column("uri").to_pylist():
        assert Path(uri).is_file(), uri
    assert len(tables["stems"]) == 4 * len(done)


def test_default_output_has_no_library_chatter(interrupted):
    for line in CHATTER:
        assert line not in interrupted["log"], line


def test_dry_run_counts_without_prefect_or_ray(interrupted):
    done = {tid for c in manifest.list_commits(str(interrupted["out"])) for tid in c.track_ids}
    rc, stdout, stderr, imported = interrupted["cli"].run(
        "run", str(interrupted["base"] / "in"), "-o", str(interrupted["out"]), *RUN_ARGS, "--dry-run", "--json"
    )
    assert rc == 0, stderr
    facts = json.loads(stdout)
    assert (facts["catalog_tracks"], facts["already_committed"], facts["to_do"]) == (TRACKS, len(done), TRACKS - len(done))
    assert facts["shards"] == TRACKS - len(done)
    assert imported == [], f"--dry-run imported {imported}"


def test_rerun_completes_then_a_noop_rerun_starts_nothing(interrupted):
    cli, out = interrupted["cli"], interrupted["out"]
    before = {tid for c in manifest.list_commits(str(out)) for tid in c.track_ids}
    rc, stdout, stderr, imported = cli.run("run", str(interrupted["base"] / "in"), "-o", str(out), *RUN_ARGS, "-v")
    assert rc == 0, stderr[-3000:]
    assert imported == ["prefect", "ray"]
    assert "Starting temporary server" in stdout + stderr, "-v shows Prefect's own lines"
    assert f"{len(before)} already done, {TRACKS - len(before)} separated, 0 failed" in stdout
    tracks = manifest.read_manifests(str(out))["tracks"].column("track_id").to_pylist()
    assert sorted(tracks) == sorted(set(tracks)) and len(tracks) == TRACKS

    rc, stdout, stderr, imported = cli.run("run", str(interrupted["base"] / "in"), "-o", str(out), *RUN_ARGS, "--json")
    assert rc == 0, stderr
    assert imported == [], f"a no-op rerun imported {imported}"
    summary = json.loads(stdout)  # one object, nothing else on stdout
    assert (summary["catalog_tracks"], summary["skipped_already_committed"], summary["processed_now"]) == (TRACKS, TRACKS, 0)
    assert summary["committed_ok_total"] == TRACKS and summary["interrupted"] is False

    rc, stdout, stderr, _ = cli.run("run", str(interrupted["base"] / "in"), "-o", str(out), *RUN_ARGS, "--quiet")
    assert (rc, stderr) == (0, "")
    assert stdout.splitlines() == [f"demix run: {TRACKS} tracks in catalog, {TRACKS} already done, 0 separated, 0 failed"]
