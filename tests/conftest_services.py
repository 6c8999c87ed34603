"""Real services for the catalog tests, one of each per session: an S3 endpoint (moto's threaded server)
behind a fault-injecting HTTP proxy, a local Ray instance and Prefect's ephemeral API.

Load with ``pytest_plugins = ["conftest_services"]`` in a test module. Nothing here mocks demix's
storage or Ray layer: s3fs talks HTTP to the proxy, the proxy talks HTTP to moto.

Credentials and the endpoint reach s3fs (and every Ray worker, which inherits the driver's
environment) only through the standard AWS environment variables, set before Ray starts. The secret
is a canary that tests look for in logs, Prefect parameters and manifests.
"""

from __future__ import annotations

import http.client
import logging
import os
import tempfile
import socket
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

TESTS_DIR = Path(__file__).resolve().parent
CANARY_KEY_ID = "AKIACANARYKEYID7Q2X"
CANARY_SECRET = "CANARYsecret123-do-not-log-9f8e7d6c5b4a"

_HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "expect", "content-length",
}


@dataclass
class Fault:
    """One injection rule: requests whose method and key match get ``status``/``code`` instead of moto's answer.

    ``times``: how many matching requests to hit (``None``: all of them). ``after_forward``: forward
    the request to moto first, then answer the error anyway (the write happened, the reply was lost).
    ``drop``: read half of the request body, then close the connection without answering.
    """

    key_contains: str
    status: int = 503
    code: str = "SlowDown"
    message: str = "Please reduce your request rate."
    methods: tuple[str, ...] = ("PUT",)
    times: int | None = None
    after_forward: bool = False
    drop: bool = False
    hits: int = 0


class FaultProxy:
    """A ThreadingHTTPServer on 127.0.0.1 that forwards S3 requests to moto, injects :class:`Fault`\\ s and
    counts requests per ``(method, /bucket/key)``.

    Conditional creates (``If-None-Match: *``) are forwarded one at a time: S3 makes them atomic,
    moto checks then writes without a lock, and these tests are about demix, not about moto's race.
    """

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.faults: list[Fault] = []
        self.counts: Counter = Counter()
        self._lock = threading.Lock()
        self._create_lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _handle(self) -> None:
                proxy._serve(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, name="s3-fault-proxy", daemon=True)

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def reset(self) -> None:
        with self._lock:
            self.faults.clear()
            self.counts.clear()

    def inject(self, key_contains: str, **options) -> Fault:
        """Add a :class:`Fault` for keys containing ``key_contains`` (options: its other fields)."""
        fault = Fault(key_contains, **options)
        with self._lock:
            self.faults.append(fault)
        return fault

    def count(self, method: str, key_contains: str) -> int:
        with self._lock:
            return sum(n for (m, k), n in self.counts.items() if m == method and key_contains in k)

    def _match(self, method: str, key: str) -> Fault | None:
        with self._lock:
            self.counts[(method, key)] += 1
            for fault in self.faults:
                if method in fault.methods and fault.key_contains in key and (fault.times is None or fault.hits < fault.times):
                    fault.hits += 1
                    return fault
        return None

    @staticmethod
    def _read_body(h: BaseHTTPRequestHandler, limit: int | None = None) -> bytes:
        if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(h.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while h.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(h.rfile.read(size))
                h.rfile.readline()
        length = int(h.headers.get("Content-Length") or 0)
        return h.rfile.read(length if limit is None else min(limit, length))

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        key = unquote(urlsplit(h.path).path)
        fault = self._match(h.command, key)
        if fault is not None and fault.drop:
            self._read_body(h, limit=int(h.headers.get("Content-Length") or 0) // 2)
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        body = self._read_body(h)
        if fault is not None and not fault.after_forward:
            self._reply_error(h, fault, key)
            return
        headers = {k: v for k, v in h.headers.items() if k.lower() not in _HOP_BY_HOP}
        if body or h.command in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        conditional = h.headers.get("If-None-Match") == "*"
        if conditional:
            self._create_lock.acquire()
        try:
            conn = http.client.HTTPConnection(*self.upstream, timeout=60)
            try:
                conn.request(h.command, h.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
            finally:
                conn.close()
        finally:
            if conditional:
                self._create_lock.release()
        if fault is not None:
            self._reply_error(h, fault, key)
            return
        h.send_response_only(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in _HOP_BY_HOP:
                h.send_header(k, v)
        if h.command == "HEAD":
            h.send_header("Content-Length", resp.getheader("Content-Length", "0"))
            h.end_headers()
            return
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    @staticmethod
    def _reply_error(h: BaseHTTPRequestHandler, fault: Fault, key: str) -> None:
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{fault.code}</Code><Message>{fault.message}</Message>"
            f"<Resource>{key}</Resource><RequestId>demix-fault-proxy</RequestId></Error>"
        ).encode()
        h.send_response_only(fault.status)
        h.send_header("Content-Type", "application/xml")
        h.send_header("x-amz-request-id", "demix-fault-proxy")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(body)


@pytest.fixture(scope="session")
def s3_services() -> Iterator[FaultProxy]:
    """moto on 127.0.0.1, the fault proxy in front of it, and the standard AWS environment pointing at
    the proxy (with canary credentials). Also puts this folder on ``PYTHONPATH`` for Ray workers and
    turns Prefect's telemetry off. Session-wide: set before Ray starts, so its workers inherit it."""
    pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per moto request otherwise

    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    proxy = FaultProxy(moto.get_host_and_port()).start()
    env = {
        "AWS_ACCESS_KEY_ID": CANARY_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": CANARY_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": proxy.url,
        "AWS_EC2_METADATA_DISABLED": "true",
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PYTHONPATH": os.pathsep.join(p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH", "")) if p),
        # where a test asks Ray workers to die in a stage (read by demix_test_models.install_stage_faults)
        "DEMIX_TEST_FAULTS": os.path.join(tempfile.mkdtemp(prefix="demix-faults-"), "faults.json"),
    }
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
            mp.delenv(name, raising=False)
        for name, value in env.items():
            mp.setenv(name, value)
        _clear_s3fs_cache()
        yield proxy
        _clear_s3fs_cache()
    proxy.stop()
    moto.stop()


def _clear_s3fs_cache() -> None:
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@dataclass
class S3Bucket:
    """A fresh bucket for one test; ``uri(key)`` gives ``s3://bucket/key``."""

    name: str
    proxy: FaultProxy

    def uri(self, key: str = "") -> str:
        return f"s3://{self.name}/{key}" if key else f"s3://{self.name}"

    @property
    def fs(self):
        import s3fs

        return s3fs.S3FileSystem()

    def keys(self, prefix: str = "") -> list[str]:
        fs = self.fs
        fs.invalidate_cache()
        root = f"{self.name}/{prefix}".rstrip("/")
        try:
            return sorted(p[len(self.name) + 1 :] for p in fs.find(root))
        except FileNotFoundError:
            return []


@pytest.fixture
def s3(s3_services: FaultProxy) -> Iterator[S3Bucket]:
    """A fresh, empty bucket; the proxy's faults and counters are reset around each test."""
    s3_services.reset()
    _clear_s3fs_cache()
    bucket = S3Bucket(f"demix-{uuid.uuid4().hex[:12]}", s3_services)
    bucket.fs.mkdir(bucket.name)
    yield bucket
    s3_services.reset()
    _clear_s3fs_cache()


@pytest.fixture(scope="session")
def ray_cluster(s3_services: FaultProxy) -> Iterator[str]:
    """A local Ray instance with 2 CPUs, started after the environment above; yields its GCS address."""
    import ray

    if ray.is_initialized():  # started by someone else without our environment: restart it with it
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=True)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def prefect_api(s3_services: FaultProxy) -> Iterator[str]:
    """Prefect's ephemeral API (a temporary SQLite database) for the whole session; yields its URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()
