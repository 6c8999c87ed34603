"""Parquet manifests: explicit schemas, per-shard parts, create-once commit records, consolidated reads.

Layout under a run's output root ``OUT``::

    OUT/stems/<track_id>/<settings_hash>/<attempt>/<stem>.<ext>                 # immutable: one folder per try
    OUT/manifests/_parts/<shard_id>/<attempt>/{tracks,stems,failures}.parquet   # one folder per attempt
    OUT/manifests/_commits/<shard_id>.json                                       # written once: the winner
                                                   # (names its parts relative to OUT/manifests)
    OUT/manifests/_runs/<run_id>.json                                            # a running run's lease
    OUT/manifests/_gc/<stamp>-<id>.json                                          # attempts gc removed
    OUT/manifests/{tracks,stems,failures}.parquet                                # consolidated: current rows
    OUT/manifests/history/{tracks,stems}.parquet                                 # every attempt, ``current``

An attempt writes its parts under a fresh ``attempt`` name, so attempts never overwrite each other.
It then tries to *create* the shard's commit record (``If-None-Match: *`` on S3, a hard link on a
local disk): exactly one attempt wins, the others' parts are orphans that no reader looks at.
Readers (and the next run's plan) trust only parts named by a commit record. When a track appears in
several commits (a ``--force`` rerun, two runs racing), the consolidated view keeps one row per track:
an ``ok`` row over a ``failed`` one, then the latest commit; the history view keeps them all.

Stems are written under a folder of their own per try of a track (``run.stem_uri``) before the commit,
so a committed row points at exactly the bytes it describes, and a track's stems become reachable
together, by the commit, or not at all. Output written before that layout
(``OUT/stems/<track_id>/<stem>.<ext>``) stays readable: rows name their stems' URIs. Garbage
collection (:mod:`demix.pipeline.batch.gc`) removes an attempt by recording it under ``_gc`` first;
readers drop the rows of removed attempts.
"""

from __future__ import annotations

import io
import json
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq

from demix.pipeline.io import StorageError, atomic_write, create_once, filesystem, join

SEGMENT = pa.struct([("start_s", pa.float64()), ("end_s", pa.float64())])


def _pandas_nullable_ints(schema: pa.Schema, columns: dict[str, str]) -> pa.Schema:
    """``schema`` with pandas metadata asking for nullable integer dtypes (``Int32``...) for ``columns``:
    without it pandas reads an integer column that has nulls (a failed track's sample rate) as float64.
    Arrow readers (DuckDB, datasets, polars) see the plain integer types either way."""
    described = [
        {"name": name, "field_name": name, "pandas_type": str(schema.field(name).type), "numpy_type": dtype, "metadata": None}
        for name, dtype in columns.items()
    ]
    pandas = {"index_columns": [], "column_indexes": [], "columns": described}
    return schema.with_metadata({b"pandas": json.dumps(pandas).encode()})


TRACKS_SCHEMA = pa.schema(
    [
        ("track_id", pa.string()),
        ("source_uri", pa.string()),
        ("source_bytes", pa.int64()),
        ("duration_s", pa.float64()),
        ("sample_rate", pa.int32()),
        ("channels", pa.int32()),
        ("status", pa.string()),
        ("model", pa.string()),
        ("model_sha256", pa.string()),
        ("settings_hash", pa.string()),
        ("elapsed_s", pa.float64()),
        ("committed_at", pa.timestamp("us", tz="UTC")),
        ("shard_id", pa.string()),
        ("attempt", pa.string()),
    ]
)
TRACKS_SCHEMA = _pandas_nullable_ints(TRACKS_SCHEMA, {"source_bytes": "Int64", "sample_rate": "Int32", "channels": "Int32"})

STEMS_SCHEMA = pa.schema(
    [
        ("track_id", pa.string()),
        ("stem", pa.string()),
        ("uri", pa.string()),
        ("format", pa.string()),
        ("sample_rate", pa.int32()),
        ("channels", pa.int32()),
        ("num_frames", pa.int64()),
        ("duration_s", pa.float64()),
        ("rms_dbfs", pa.float64()),
        ("present", pa.bool_()),
        ("presence_score", pa.float64()),
        ("active_segments", pa.list_(SEGMENT)),
        ("attempt", pa.string()),
    ]
)

FAILURES_SCHEMA = pa.schema(
    [
        ("track_id", pa.string()),
        ("source_uri", pa.string()),
        ("stage", pa.string()),
        ("error_type", pa.string()),
        ("message", pa.string()),
        ("attempts", pa.int32()),
        ("attempt", pa.string()),
    ]
)

SCHEMAS = {"tracks": TRACKS_SCHEMA, "stems": STEMS_SCHEMA, "failures": FAILURES_SCHEMA}


@dataclass
class TrackRow:
    """One row of ``tracks.parquet`` (``committed_at``, ``shard_id``, ``attempt`` are set at commit)."""

    track_id: str
    source_uri: str
    source_bytes: int | None
    duration_s: float | None
    sample_rate: int | None
    channels: int | None
    status: str  # "ok" | "failed"
    model: str
    model_sha256: str | None
    settings_hash: str
    elapsed_s: float


@dataclass
class StemRow:
    """One row of ``stems.parquet``; presence columns stay null until presence runs."""

    track_id: str
    stem: str
    uri: str
    format: str
    sample_rate: int
    channels: int
    num_frames: int
    duration_s: float
    rms_dbfs: float
    present: bool | None = None
    presence_score: float | None = None
    active_segments: list[dict] | None = None


@dataclass
class FailureRow:
    """One row of ``failures.parquet``."""

    track_id: str
    source_uri: str
    stage: str  # read | decode | separate | encode | write
    error_type: str
    message: str
    attempts: int = 1


@dataclass
class ShardResult:
    """Everything one attempt produced for one shard."""

    shard_id: str
    tracks: list[TrackRow] = field(default_factory=list)
    stems: list[StemRow] = field(default_factory=list)
    failures: list[FailureRow] = field(default_factory=list)


HISTORY_SCHEMA = TRACKS_SCHEMA.append(pa.field("current", pa.bool_()))
STEMS_HISTORY_SCHEMA = STEMS_SCHEMA.append(pa.field("current", pa.bool_()))
FILES = {"history_tracks": "history/tracks.parquet", "history_stems": "history/stems.parquet"}
"""Consolidated tables written under another name than ``<kind>.parquet``."""


def manifests_root(out: str) -> str:
    return join(out, "manifests")


def rows_table(rows: Iterable, schema: pa.Schema, extra: dict) -> pa.Table:
    records = [{**asdict(r), **extra} for r in rows]
    return pa.Table.from_pylist(records, schema=schema)


def parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


@dataclass(frozen=True)
class Commit:
    """A commit record: which attempt's parts hold a shard's rows.

    ``parts`` maps each kind to its part's key *relative to* ``OUT/manifests`` (e.g.
    ``_parts/<shard>/<attempt>/tracks.parquet``), so an output root stays readable when it is
    copied or moved, or named by another spelling (a relative path, another working directory).
    """

    shard_id: str
    attempt: str
    committed_at: str
    track_ids: tuple[str, ...]
    parts: dict


def commit_shard(out: str, result: ShardResult) -> Commit:
    """Write ``result``'s parts under a fresh attempt name, then try to create the commit record.

    Returns the commit that holds the shard after the call: this attempt's when it won, the earlier
    winner's otherwise (its rows stand; this attempt's parts are ignored).
    """
    now = datetime.now(timezone.utc)
    tables = {
        "tracks": rows_table(result.tracks, TRACKS_SCHEMA, {"committed_at": now, "shard_id": result.shard_id}),
        "stems": rows_table(result.stems, STEMS_SCHEMA, {}),
        "failures": rows_table(result.failures, FAILURES_SCHEMA, {}),
    }
    return commit_tables(out, result.shard_id, tables, [r.track_id for r in result.tracks], now=now)


def commit_tables(
    out: str, shard_id: str, tables: dict[str, pa.Table], ids: Iterable[str], *, now: datetime | None = None
) -> Commit:
    """The commit protocol for any set of tables (the catalog's, the remix builder's).

    Each table gets an ``attempt`` column (filled here), is written as
    ``OUT/manifests/_parts/<shard_id>/<attempt>/<kind>.parquet``, then the shard's commit record is
    created once. ``ids`` are the unit ids (tracks, examples) the shard holds.
    """
    attempt = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:12]}"
    now = now or datetime.now(timezone.utc)
    root = manifests_root(out)
    parts = {}
    for kind, table in tables.items():
        table = table.set_column(table.schema.get_field_index("attempt"), "attempt", pa.array([attempt] * len(table), pa.string()))
        key = f"_parts/{shard_id}/{attempt}/{kind}.parquet"
        atomic_write(join(root, key), parquet_bytes(table))
        parts[kind] = key
    commit = Commit(shard_id=shard_id, attempt=attempt, committed_at=now.isoformat(), track_ids=tuple(ids), parts=parts)
    record = join(root, "_commits", f"{shard_id}.json")
    if create_once(record, json.dumps(asdict(commit), indent=1).encode()):
        return commit
    return _load_commit(record)


def _commit_from_json(data: bytes) -> Commit:
    record = json.loads(data)
    return Commit(**{**record, "track_ids": tuple(record["track_ids"])})


def _load_commit(uri: str) -> Commit:
    fs, path = filesystem(uri)
    return _commit_from_json(fs.cat_file(path))


def _cat_many(fs, paths: list[str]) -> list[bytes]:
    """Whole contents of ``paths``, concurrently on object stores. Unlike ``fs.cat(list)`` this does
    not expand glob characters, so an output root named ``out [1]`` or ``take*`` reads correctly."""
    if not paths:
        return []
    blobs = fs.cat_ranges(paths, None, None, on_error="return")
    for path, blob in zip(paths, blobs):
        if isinstance(blob, BaseException):
            raise StorageError(path, f"{type(blob).__name__}: {blob}", stage="read") from blob
    return blobs


def list_commits(out: str) -> list[Commit]:
    """Every commit record under ``out`` (empty when nothing was committed yet), sorted by shard id."""
    fs, path = filesystem(join(manifests_root(out), "_commits"))
    try:
        names = sorted(p for p in fs.ls(path, detail=False, refresh=True) if p.endswith(".json"))
    except FileNotFoundError:
        return []
    return [_commit_from_json(blob) for blob in _cat_many(fs, names)]


def _read_parts(out: str, commits: list[Commit], kind: str, schema: pa.Schema | None = None) -> pa.Table:
    schema = schema or SCHEMAS[kind]
    commits = [c for c in commits if kind in c.parts]
    if not commits:
        return schema.empty_table()
    root = manifests_root(out)
    fs, _ = filesystem(root)
    paths = [filesystem(join(root, c.parts[kind]))[1] for c in commits]
    tables = [pq.read_table(io.BytesIO(blob)) for blob in _cat_many(fs, paths)]
    return pa.concat_tables([t.cast(schema) for t in tables])


def record_removed(out: str, attempts: Iterable[tuple[str, str]]) -> str:
    """Record ``(track_id, attempt)`` pairs as removed by garbage collection (before their bytes go)."""
    pairs = sorted({(str(t), str(a)) for t, a in attempts})
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    uri = join(manifests_root(out), "_gc", f"{stamp}-{uuid.uuid4().hex[:12]}.json")
    atomic_write(uri, json.dumps({"removed": pairs}).encode())
    return uri


def removed_attempts(out: str) -> set[tuple[str, str]]:
    """Every ``(track_id, attempt)`` garbage collection removed under ``out``."""
    fs, path = filesystem(join(manifests_root(out), "_gc"))
    try:
        names = sorted(p for p in fs.ls(path, detail=False, refresh=True) if p.endswith(".json"))
    except FileNotFoundError:
        return set()
    return {(t, a) for blob in _cat_many(fs, names) for t, a in json.loads(blob)["removed"]}


def _live(table: pa.Table, removed: set[tuple[str, str]]) -> list[dict]:
    return [r for r in table.to_pylist() if (r["track_id"], r["attempt"]) not in removed]


def read_committed(out: str, kind: str, schema: pa.Schema) -> tuple[pa.Table, list[Commit]]:
    """Every committed row of ``kind`` under ``out`` (duplicates across commits kept), and the commits
    in shard order."""
    commits = list_commits(out)
    return _read_parts(out, commits, kind, schema), commits


def read_manifests(out: str) -> dict[str, pa.Table]:
    """The consolidated, de-duplicated view of every committed shard: ``{"tracks", "stems", "failures"}``,
    and the history: ``history_tracks`` and ``history_stems``, every attempt's rows with ``current``.

    One ``tracks`` row per track id (``ok`` beats ``failed``, then the latest commit); ``stems``
    rows of the chosen attempts; ``failures`` rows of tracks whose chosen row is ``failed``, whose
    ``attempts`` counts every committed failed attempt of the track (each run that failed it, and
    each worker death within a run). Rows of attempts garbage collection removed are left out.
    """
    commits = list_commits(out)
    removed = removed_attempts(out)
    tracks = _live(_read_parts(out, commits, "tracks"), removed)
    chosen: dict[str, dict] = {}
    for row in tracks:
        best = chosen.get(row["track_id"])
        key = (row["status"] == "ok", row["committed_at"])
        if best is None or key > (best["status"] == "ok", best["committed_at"]):
            chosen[row["track_id"]] = row
    winners = {(r["track_id"], r["attempt"]) for r in chosen.values()}
    all_stems = _live(_read_parts(out, commits, "stems"), removed)
    stems = [r for r in all_stems if (r["track_id"], r["attempt"]) in winners]
    failures, tries = [], Counter()
    for r in _live(_read_parts(out, commits, "failures"), removed):
        tries[r["track_id"]] += r["attempts"] or 1
        if (r["track_id"], r["attempt"]) in winners and chosen[r["track_id"]]["status"] == "failed":
            failures.append(r)
    failures = [{**r, "attempts": tries[r["track_id"]]} for r in failures]
    order = sorted(chosen)

    def history(rows: list[dict], key) -> list[dict]:
        return sorted(({**r, "current": (r["track_id"], r["attempt"]) in winners} for r in rows), key=key)

    return {
        "tracks": pa.Table.from_pylist([chosen[k] for k in order], schema=TRACKS_SCHEMA),
        "stems": pa.Table.from_pylist(sorted(stems, key=lambda r: (r["track_id"], r["stem"])), schema=STEMS_SCHEMA),
        "failures": pa.Table.from_pylist(sorted(failures, key=lambda r: r["track_id"]), schema=FAILURES_SCHEMA),
        "history_tracks": pa.Table.from_pylist(
            history(tracks, lambda r: (r["track_id"], r["committed_at"])), schema=HISTORY_SCHEMA
        ),
        "history_stems": pa.Table.from_pylist(
            history(all_stems, lambda r: (r["track_id"], r["attempt"], r["stem"])), schema=STEMS_HISTORY_SCHEMA
        ),
    }


def committed_ok(out: str, settings_hash: str) -> set[str]:
    """Track ids already committed with status ok for ``settings_hash`` (what a rerun may skip)."""
    removed = removed_attempts(out)
    tracks = _read_parts(out, list_commits(out), "tracks").select(["track_id", "status", "settings_hash", "attempt"])
    return {
        r["track_id"] for r in _live(tracks, removed) if r["status"] == "ok" and r["settings_hash"] == settings_hash
    }


def write_consolidated(out: str, tables: dict[str, pa.Table]) -> dict[str, str]:
    """Write the consolidated view as ``OUT/manifests/<kind>.parquet`` (the history as
    ``OUT/manifests/history/{tracks,stems}.parquet``; each file replaced atomically)."""
    written = {}
    for kind, table in tables.items():
        uri = join(manifests_root(out), FILES.get(kind, f"{kind}.parquet"))
        atomic_write(uri, parquet_bytes(table))
        written[kind] = uri
    return written
