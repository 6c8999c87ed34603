"""The scale-out stack of tests/test_services_stack.py, started for real as processes on 127.0.0.1: a
Prefect server with its own SQLite database, a ``process`` work pool and a worker polling it, and a Ray
cluster of two node processes. S3 is moto's server (tests/conftest_services.py, in the test process).

Every process is started in its own session and stopped by its process group (SIGTERM, then
SIGKILL); every environment carries a token, and :meth:`Stack.close` kills any process left whose
environment holds it (a flow run's process, which Prefect starts in a session of its own, and the Ray
workers of a node, which inherit their raylet's environment). Credentials reach the worker, the flow
run and the Ray nodes only through the environment; the Prefect server and the ``prefect`` commands
get none.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
TESTS_DIR = ROOT / "tests"
POOL = "demix-process-pool"  # infra/prefect.yaml's work pool
DEPLOYMENT = "separate-catalog/separate-catalog-nightly"
_SECRETS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")

JOIN_ON_LOOPBACK = """
import sys
import ray._private.ray_constants as constants
import ray._private.services as services
from ray.scripts.scripts import main
constants.ENABLE_RAY_CLUSTER = True
services.resolve_ip_for_localhost = lambda host: host
sys.argv[0] = "ray"
sys.exit(main())
"""
"""``ray start --address`` for a second node on 127.0.0.1. With ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``
(what keeps a head, its workers and a driver on loopback) ``ray start`` refuses to add a node
("Multi-node Ray clusters are not supported on Windows and OSX"); without it, it rewrites 127.0.0.1,
both the head's address and its own, to the machine's outward address, where the head's GCS does not
listen. This runs the same command with the check passed and loopback kept, in this process only: the
node's raylet and workers get the environment variable like the head's."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(what: str, ready, timeout: float, service: Service | None = None, poll: float = 0.5):
    """Poll ``ready()`` until it returns something truthy (returned); fail after ``timeout`` seconds
    or as soon as ``service`` exits."""
    deadline = time.monotonic() + timeout
    while True:
        value = ready()
        if value:
            return value
        if service is not None and not service.alive():
            raise AssertionError(f"{service.name} exited while waiting for {what}:\n{service.tail()}")
        if time.monotonic() > deadline:
            tail = f":\n{service.tail()}" if service is not None else ""
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{tail}")
        time.sleep(poll)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class Service:
    """One process (and its process group), output in ``<logs>/<name>.log``."""

    def __init__(self, name: str, argv: list[str], env: dict, logs: Path, cwd: Path = ROOT) -> None:
        self.name = name
        self.log = logs / f"{name}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM to the process group, SIGKILL to what is left of it after ``grace`` seconds."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


def cli(argv: list[str], env: dict, timeout: float = 180) -> str:
    """Run a command to completion in its own session; its output (raises with it on failure)."""
    done = subprocess.run(
        argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout, start_new_session=True,
        stdin=subprocess.DEVNULL,
    )
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout


def pids_with_env(token: str) -> list[int]:
    """Processes of this user whose environment holds ``token``."""
    needle, found = token.encode(), []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            with contextlib.suppress(OSError):
                if needle in (proc / "environ").read_bytes():
                    found.append(int(proc.name))
    return found


def children_titled(parent: int, prefix: str) -> list[str]:
    """Command lines (process titles) of ``parent``'s children starting with ``prefix``."""
    titles = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                title = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                if ppid == parent and title.startswith(prefix):
                    titles.append(title)
    return titles


def pid_of(cmdline_parts: tuple[str, ...]) -> int | None:
    """The first process whose command line holds all of ``cmdline_parts``."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                line = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if all(p in line for p in cmdline_parts):
                    return int(proc.name)
    return None


class Stack:
    """The services of one test; :meth:`close` stops them all, last started first."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.logs = tmp / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.token = f"demix-stack-{uuid.uuid4().hex}"
        self.prefect_home = tmp / "prefect"
        self.prefect_home.mkdir(exist_ok=True)
        self.services: dict[str, Service] = {}
        self.api = ""
        self.deployment: dict = {}
        self.ray_address = ""
        self.ray_temps: dict[str, Path] = {}
        self._raylets: dict[str, int] = {}
        # the cluster's own token (not ~/.ray/auth_token): Ray's token authentication, as in production
        self.ray_token = secrets.token_hex(32)
        self.ray_token_path = tmp / "ray-auth-token"
        self.ray_token_path.write_text(self.ray_token)
        self.ray_token_path.chmod(0o600)

    # -- environments ----------------------------------------------------------------------------

    def env(self, *, credentials: bool) -> dict:
        """This process's environment without Prefect or Ray settings (and without the AWS
        credentials and the Ray token unless ``credentials``), plus the stack's own settings."""
        env = {
            k: v for k, v in os.environ.items()
            if not k.startswith(("PREFECT_", "RAY_")) and (credentials or k not in _SECRETS)
        }
        if credentials:
            env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.ray_token_path)})
        env.update({
            "DEMIX_STACK_TOKEN": self.token, "DO_NOT_TRACK": "1", "PREFECT_HOME": str(self.prefect_home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "RAY_USAGE_STATS_ENABLED": "0",
            # as the README asks for a cluster that stays on loopback (see tests/test_ray_address.py)
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "PYTHONPATH": os.pathsep.join(p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH", "")) if p),
        })
        if self.api:
            env["PREFECT_API_URL"] = self.api
        return env

    def start(self, name: str, argv: list[str], env: dict) -> Service:
        service = Service(name, argv, env, self.logs)
        self.services[name] = service
        return service

    # -- Prefect ---------------------------------------------------------------------------------

    def start_all(self, *, head_cpus: int = 1, node_cpus: int = 2, timeout: float = 150) -> None:
        """The whole stack, started side by side where it can be: the Prefect server and the Ray
        head, then the second node while the flow is deployed, then the worker."""
        server = self.start_prefect()
        gcs = self.start_ray_head(head_cpus)
        wait_until("the Ray head's GCS", lambda: _listening(gcs), timeout, self.services["ray-head"])
        node = self._ray("ray-node2", ["--address", self.ray_address], node_cpus, {"node2": 1})
        wait_until("the Prefect server's /api/health", lambda: _healthy(self.api), timeout, server, poll=1.0)
        self.deployment = self.deploy()
        wait_until("the second Ray node's raylet", lambda: self.raylet_pid("ray-node2"), timeout, node)
        wait_until("both Ray nodes to register", lambda: self.ray_cpus() == head_cpus + node_cpus, timeout, node)
        for name in ("ray-head", "ray-node2"):
            assert "Local node IP: 127.0.0.1" in self.services[name].log.read_text(), self.services[name].tail()
        self.start_worker()

    def start_prefect(self) -> Service:
        """A Prefect server on a free port with its own database (its API URL in ``self.api``); the
        scheduler is off, so the deployment's nightly cron never creates runs during the test."""
        port = free_port()
        env = self.env(credentials=False)
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = f"sqlite+aiosqlite:///{self.prefect_home / 'prefect.db'}"
        server = self.start("prefect-server", [
            str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port),
            "--no-ui", "--no-scheduler", "--no-late-runs", "--analytics-off",
        ], env)
        self.api = f"http://127.0.0.1:{port}/api"
        return server

    def deploy(self) -> dict:
        """Create the work pool and deploy infra/prefect.yaml's nightly deployment onto it, as an
        operator would from the repository root; the deployment as the server holds it."""
        env = self.env(credentials=False)
        cli([str(BIN / "prefect"), "--no-prompt", "work-pool", "create", POOL, "--type", "process"], env)
        cli([
            str(BIN / "prefect"), "--no-prompt", "deploy", "--prefect-file", "infra/prefect.yaml",
            "--name", DEPLOYMENT.split("/")[1],
        ], env)
        flow, name = DEPLOYMENT.split("/")
        return self.request("GET", f"/deployments/name/{flow}/{name}")

    def start_worker(self) -> Service:
        """A process worker on the pool, with the AWS environment and the checkout as ``DEMIX_HOME``
        (infra/prefect.yaml's pull step makes it the flow run's working directory)."""
        env = self.env(credentials=True)
        env.update({"DEMIX_HOME": str(ROOT), "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "5"})
        return self.start("prefect-worker", [
            str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--type", "process", "--name", "demix-test-worker",
            "--install-policy", "never", "--no-create-pool-if-not-found",
        ], env)

    def request(self, method: str, path: str, body: dict | None = None) -> dict | list:
        """One call to the server's REST API. 429, 502 and 503 are retried with backoff, as Prefect's own
        client does: the server answers 503 to errors it calls retryable (a busy SQLite database, a timeout),
        which a loaded 2-core machine saw once between two runs."""
        data = None if body is None else json.dumps(body).encode()
        for attempt in range(6):
            req = urllib.request.Request(self.api + path, data=data, method=method, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=30) as resp:
                    return json.loads(resp.read() or b"null")
            except urllib.error.HTTPError as err:
                if err.code not in (429, 502, 503) or attempt == 5:
                    raise
            time.sleep(2**attempt)
        raise AssertionError("unreachable")

    def run_deployment(self, deployment_id: str, parameters: dict) -> str:
        """Trigger a run of the deployment (its parameters overridden by ``parameters``); its id."""
        run = self.request("POST", f"/deployments/{deployment_id}/create_flow_run", {"parameters": parameters})
        return run["id"]

    def flow_run(self, run_id: str) -> dict:
        return self.request("GET", f"/flow_runs/{run_id}")

    def wait_final(self, run_id: str, timeout: float) -> dict:
        """The flow run once its state is final (completed, failed, crashed, cancelled)."""
        final = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
        worker = self.services["prefect-worker"]
        return wait_until(
            f"flow run {run_id} to finish", lambda: _final(self.flow_run(run_id), final), timeout, worker, poll=1.0,
        )

    def logs_of(self, run_id: str) -> list[dict]:
        return self.request("POST", "/logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200})

    # -- Ray -------------------------------------------------------------------------------------

    def _ray(self, name: str, first: list[str], cpus: int, resources: dict) -> Service:
        """A Ray node on 127.0.0.1 with its own temp folder and ports, the AWS environment and the
        cluster's token (Ray workers inherit their raylet's environment)."""
        temp = Path("/tmp") / f"dmx-{self.token[-8:]}-{name}"  # short: Ray's socket paths have a length limit
        self.ray_temps[name] = temp
        ray = [str(BIN / "ray")] if "--head" in first else [sys.executable, "-c", JOIN_ON_LOOPBACK]
        argv = [
            *ray, "start", *first, "--node-ip-address", "127.0.0.1", "--num-cpus", str(cpus),
            "--num-gpus", "0", "--resources", json.dumps(resources), "--temp-dir", str(temp),
            "--object-store-memory", str(300 * 2**20), "--dashboard-agent-listen-port", str(free_port()),
            "--dashboard-agent-grpc-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
            "--metrics-export-port", str(free_port()), "--disable-usage-stats", "--block",
        ]
        return self.start(name, argv, self.env(credentials=True))

    def start_ray_head(self, cpus: int) -> int:
        """A head with ``cpus`` CPUs on 127.0.0.1 (address in ``self.ray_address``); its GCS port."""
        port = free_port()
        self._ray("ray-head", ["--head", "--port", str(port), "--include-dashboard", "false"], cpus, {"head": 1})
        self.ray_address = f"127.0.0.1:{port}"
        return port

    def raylet_pid(self, name: str) -> int | None:
        if name not in self._raylets:
            pid = pid_of(("raylet", str(self.ray_temps[name])))
            if pid is None:
                return None
            self._raylets[name] = pid
        return self._raylets[name]

    def ray_cpus(self) -> int:
        """CPUs of the alive nodes, as `ray status` reports them (0 before the cluster answers)."""
        env = self.env(credentials=True)
        done = subprocess.run(
            [str(BIN / "ray"), "status", "--address", self.ray_address], env=env, capture_output=True, text=True,
            timeout=60, start_new_session=True,
        )
        for line in done.stdout.splitlines():
            if line.strip().endswith(" CPU") and "/" in line:
                return int(float(line.split("/")[1].split()[0]))
        return 0

    def actors_on(self, name: str) -> list[str]:
        """Ray Data map workers (the separator actors) running on node ``name``."""
        raylet = self.raylet_pid(name)
        return children_titled(raylet, "ray::MapWorker") if raylet else []

    # -- teardown --------------------------------------------------------------------------------

    def close(self) -> None:
        for service in reversed(list(self.services.values())):
            with contextlib.suppress(Exception):
                service.stop()
        for _ in range(3):  # what left the process groups: flow run processes, Ray workers
            pids = pids_with_env(self.token)
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)
        for temp in self.ray_temps.values():  # the nodes' sessions (logs, sockets); the services' logs stay
            shutil.rmtree(temp, ignore_errors=True)


def _healthy(api: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api}/health", timeout=5) as resp:
            return resp.status == 200
    except OSError:
        return False


def _final(run: dict, final: tuple[str, ...]) -> dict | None:
    state = run.get("state") or {}
    return run if state.get("type") in final else None
