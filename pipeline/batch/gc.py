"""Garbage collection of a catalog output (``demix gc``), and the lease a running run holds on it.

What :func:`plan_gc` removes under ``OUT`` (see :mod:`demix.pipeline.batch.manifest` for the layout):

- *uncommitted parts*: ``manifests/_parts/<shard>/<attempt>/`` files no commit record names (an
  attempt that lost its shard's race, or died before its commit);
- *orphaned stems*: files under ``stems/`` that no committed row references (a track that failed on
  its 3rd stem, a worker killed mid-upload, a staging file left by a killed process);
- *superseded attempts*: the stems of a track's older ``ok`` attempts beyond the newest ``keep``
  (the current attempt always counts as one of them and is never removed); such an attempt is first
  recorded under ``manifests/_gc/`` so readers drop its rows, then its bytes go;
- *stale leases* of runs that stopped heartbeating.

Never removed: anything a kept committed row references, and anything a run may still commit. A run
holds a :class:`RunLease` (``manifests/_runs/<run_id>.json`` written once when it starts, and
``<run_id>.alive`` rewritten every ``HEARTBEAT_S``); while a lease is live (heartbeat within
``LEASE_TTL_S``) unreferenced files modified after that run started are left alone, and so is every
unreferenced file younger than ``grace_s`` (for writers without a lease; a run that starts while gc
plans writes only files younger than that), each rule with ``CLOCK_SLACK_S`` more. Lease times are the
store's own modification times; the ``grace_s`` rule compares the store's times with the collector's
clock.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime

from demix.pipeline.batch import manifest
from demix.pipeline.io import StorageError, atomic_write, filesystem, is_remote, join

log = logging.getLogger(__name__)

HEARTBEAT_S = 60.0
LEASE_TTL_S = 600.0
DEFAULT_GRACE_S = 3600.0
CLOCK_SLACK_S = 2.0
"""Added to every age rule: object stores report modification times in whole seconds (a file written
half a second after the collector read its clock can carry an earlier time) and clocks differ a little."""


class GcError(RuntimeError):
    """Garbage collection cannot run safely on this output."""


@dataclass(frozen=True)
class Removal:
    """One file :func:`apply_gc` deletes: its URI, size and why."""

    uri: str
    bytes: int
    reason: str  # uncommitted part | orphaned stem | superseded attempt | stale lease


@dataclass
class GcPlan:
    """What one collection of ``out`` removes (:func:`plan_gc`), and what it leaves and why."""

    out: str
    removals: list[Removal] = field(default_factory=list)
    superseded: list[tuple[str, str]] = field(default_factory=list)  # (track_id, attempt) recorded first
    protected: int = 0  # unreferenced files left because a run may still commit them
    live_runs: list[str] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(r.bytes for r in self.removals)


class RunLease:
    """A running run's claim on ``out``: ``with RunLease(out): ...`` around everything it writes."""

    def __init__(self, out: str, run_id: str | None = None, heartbeat_s: float = HEARTBEAT_S) -> None:
        self.out, self.run_id, self.heartbeat_s = out, run_id or uuid.uuid4().hex, heartbeat_s
        base = join(manifest.manifests_root(out), "_runs", self.run_id)
        self.started_uri, self.alive_uri = f"{base}.json", f"{base}.alive"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RunLease:
        about = {"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(), "started_at": time.time()}
        atomic_write(self.started_uri, json.dumps(about).encode())
        self._beat()
        self._thread = threading.Thread(target=self._loop, name="demix-lease", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        atomic_write(self.alive_uri, str(time.time()).encode())

    def _loop(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._beat()
            except StorageError as err:  # a missed beat is retried; only LEASE_TTL_S of them matter
                log.warning("lease heartbeat of run %s failed: %s", self.run_id, err)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        for uri in (self.alive_uri, self.started_uri):
            fs, path = filesystem(uri)
            try:
                fs.rm_file(path)
            except FileNotFoundError:
                pass
            except Exception as err:  # noqa: BLE001 - a lease left behind goes stale and gc removes it
                log.warning("could not remove lease %s: %s", uri, err)


def _mtime(info: dict) -> float | None:
    value = info.get("mtime", info.get("LastModified"))
    if isinstance(value, datetime):
        return value.timestamp()
    return float(value) if value is not None else None


def _files(uri: str) -> tuple[object, dict[str, dict]]:
    """``(fs, {path: info})`` of every file under ``uri`` (none when it does not exist)."""
    fs, path = filesystem(uri)  # never a cached listing (see io.storage)
    try:
        return fs, fs.find(path, detail=True, withdirs=False)
    except FileNotFoundError:
        return fs, {}


def _leases(out: str, now: float) -> tuple[list[float], list[Removal], list[str]]:
    """Start times of live runs, removals of stale leases, and the live run ids.

    A run is live while the newer of its two files is younger than ``LEASE_TTL_S``: a run that has
    written ``<id>.json`` but not yet its first ``<id>.alive`` is live (a collector listing between
    the two writes once took it for stale, removed its lease, and then collected the run's stems before
    it committed them). A live ``.alive`` without its ``.json`` protects everything unreferenced (its
    start is unknown)."""
    fs, found = _files(join(manifest.manifests_root(out), "_runs"))
    runs: dict[str, dict[str, tuple[str, dict]]] = {}
    for path, info in found.items():
        for suffix in (".json", ".alive"):
            if path.endswith(suffix):
                runs.setdefault(path[: -len(suffix)], {})[suffix] = (path, info)
    starts, stale, live = [], [], []
    for base, files in sorted(runs.items()):
        times = [t for _, i in files.values() if (t := _mtime(i)) is not None]
        if times and now - max(times) <= LEASE_TTL_S:
            started = files.get(".json")
            starts.append((_mtime(started[1]) or now) if started else float("-inf"))
            live.append(os.path.basename(base))
        else:
            stale += [Removal(_uri(out, fs, p), int(i.get("size") or 0), "stale lease") for p, i in files.values()]
    return starts, stale, live


def _uri(out: str, fs, path: str) -> str:
    return fs.unstrip_protocol(path) if is_remote(out) else path


def _superseded(history: list[dict], keep: int) -> set[tuple[str, str]]:
    """The ``ok`` attempts of each track beyond its newest ``keep``, the current one counted first."""
    by_track: dict[str, list[dict]] = {}
    for r in history:
        if r["status"] == "ok":
            by_track.setdefault(r["track_id"], []).append(r)
    gone = set()
    for rows in by_track.values():
        rows.sort(key=lambda r: (r["current"], r["committed_at"]), reverse=True)
        gone |= {(r["track_id"], r["attempt"]) for r in rows[keep:]}
    return gone


def _referenced(out: str, stems: list[dict]) -> set[str]:
    """Paths (in the store's spelling) of the stems ``stems`` rows name; every one must lie under ``out``."""
    fs, root = filesystem(join(out, "stems"))
    paths = set()
    for r in stems:
        path = filesystem(r["uri"])[1]
        if not path.startswith(root.rstrip("/") + "/"):
            raise GcError(
                f"{out}: a committed row of track {r['track_id']!r} names {r['uri']}, outside this output's "
                "stems/ folder (was the output moved or copied?); gc removes nothing here"
            )
        paths.add(path)
    return paths


def plan_gc(out: str, *, keep: int = 1, grace_s: float = DEFAULT_GRACE_S, now: float | None = None) -> GcPlan:  # long: one pass over four kinds of files
    """What garbage collection would remove under ``out`` (nothing is deleted; see :func:`apply_gc`)."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1 (the current attempt is always kept). Found: {keep}")
    now = time.time() if now is None else now
    starts, stale, live = _leases(out, now)
    protect_from = min([now - grace_s, *(s - grace_s for s in starts)]) - CLOCK_SLACK_S
    tables = manifest.read_manifests(out)
    history = tables["history_tracks"].to_pylist()
    gone = _superseded(history, keep)
    stems = tables["history_stems"].to_pylist()
    kept = _referenced(out, [r for r in stems if (r["track_id"], r["attempt"]) not in gone])
    dropped = _referenced(out, [r for r in stems if (r["track_id"], r["attempt"]) in gone]) - kept
    plan = GcPlan(out, removals=list(stale), superseded=sorted(gone), live_runs=sorted(live))

    def consider(fs, path: str, info: dict, reason: str) -> None:
        mtime = _mtime(info)
        if reason != "superseded attempt" and (mtime is None or mtime >= protect_from):
            plan.protected += 1
            return
        plan.removals.append(Removal(_uri(out, fs, path), int(info.get("size") or 0), reason))

    fs, found = _files(join(out, "stems"))
    for path, info in sorted(found.items()):
        if path not in kept:
            consider(fs, path, info, "superseded attempt" if path in dropped else "orphaned stem")
    root = manifest.manifests_root(out)
    committed = {filesystem(join(root, key))[1] for c in manifest.list_commits(out) for key in c.parts.values()}
    fs, found = _files(join(root, "_parts"))
    for path, info in sorted(found.items()):
        if path not in committed:
            consider(fs, path, info, "uncommitted part")
    return plan


def apply_gc(plan: GcPlan) -> int:
    """Carry out ``plan``: record its superseded attempts as removed and rewrite the consolidated
    manifests without them, then delete its files (and the folders they leave empty on a local disk).
    Returns the bytes freed."""
    if plan.superseded:
        manifest.record_removed(plan.out, plan.superseded)
        manifest.write_consolidated(plan.out, manifest.read_manifests(plan.out))
    if not plan.removals:
        return 0
    fs, _ = filesystem(plan.removals[0].uri)
    paths = [filesystem(r.uri)[1] for r in plan.removals]
    try:
        if is_remote(plan.out):
            for i in range(0, len(paths), 1000):  # S3 deletes up to 1000 keys per request
                fs.rm(paths[i : i + 1000])
        else:
            for path in paths:
                with contextlib.suppress(FileNotFoundError):  # another collector got there first
                    os.unlink(path)
            _prune_empty(plan.out, paths)
    except Exception as err:  # noqa: BLE001 - one typed error out
        raise StorageError(plan.out, f"gc could not delete: {type(err).__name__}: {err}", stage="gc") from err
    return plan.bytes


def _prune_empty(out: str, paths: list[str]) -> None:
    """Remove the local folders ``paths`` left empty, up to (not including) ``out/stems`` and ``_parts``."""
    stops = {os.path.abspath(join(out, "stems")), os.path.abspath(join(manifest.manifests_root(out), "_parts"))}
    for folder in sorted({os.path.dirname(p) for p in paths}, key=len, reverse=True):
        folder = os.path.abspath(folder)
        while folder not in stops and folder.startswith(tuple(stops)):
            try:
                os.rmdir(folder)
            except OSError:
                break
            folder = os.path.dirname(folder)
