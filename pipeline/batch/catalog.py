"""Catalogs: which tracks to separate, with stable ids, cut into shards.

A catalog is a folder, a glob, an fsspec URI, or a CSV/Parquet table with a ``uri`` column (and an
optional ``track_id`` column); a relative ``uri`` in a table is relative to the table's folder.
Track ids are stable and safe: derived from the source URI (a readable slug of the file name plus
12 hex digits of the URI's sha256), or the user's own id reduced to the characters
``[A-Za-z0-9._-]``; a reduced id longer than 128 characters keeps its first 116 and ends with ``-``
and 11 hex digits of the full id's sha256, so distinct long ids stay distinct. An id never contains
a path separator and never starts with a dot, so no source name can write outside the output root.
``.`` and ``..`` in a table's URIs are resolved, for object stores too (never above the bucket).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import PurePosixPath

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from demix.pipeline.io import StorageError, expand_inputs, filesystem, is_remote, local_path

_ID_OK = re.compile(r"[^A-Za-z0-9._-]+")
MAX_ID_CHARS = 128
"""Longest track id; longer ids are shortened with a digest of the whole id (:func:`safe_track_id`)."""
_ID_DIGEST_CHARS = 11
_TABLE_SUFFIXES = (".csv", ".parquet", ".pq")


class CatalogError(ValueError):
    """The catalog cannot be read or is inconsistent (duplicate ids, missing ``uri`` column...)."""


@dataclass(frozen=True)
class Track:
    """One catalog row: a stable id and where its audio lives."""

    track_id: str
    uri: str

    def to_dict(self) -> dict:
        return asdict(self)


def _slug(text: str, max_len: int = 48) -> str:
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    slug = _ID_OK.sub("-", ascii_text).strip("-._")
    return slug[:max_len].rstrip("-._") or "track"


def track_id_for(uri: str) -> str:
    """Stable, safe id of a source: ``<slug of the file name>-<sha256(uri)[:12]>``."""
    digest = hashlib.sha256(uri.encode("utf-8")).hexdigest()[:12]
    return f"{_slug(PurePosixPath(uri).stem)}-{digest}"


def safe_track_id(user_id: str) -> str:
    """A user-given id reduced to ``[A-Za-z0-9._-]``, never empty, never starting with a dot, at most
    ``MAX_ID_CHARS`` long: a longer one keeps its beginning and ends with ``-<sha256(id)[:11]>``."""
    cleaned = _ID_OK.sub("-", str(user_id)).strip("-").lstrip(".")
    if not cleaned:
        raise CatalogError(f"track_id {user_id!r} has no usable characters")
    if len(cleaned) <= MAX_ID_CHARS:
        return cleaned
    digest = hashlib.sha256(str(user_id).encode("utf-8")).hexdigest()[:_ID_DIGEST_CHARS]
    return f"{cleaned[: MAX_ID_CHARS - _ID_DIGEST_CHARS - 1]}-{digest}"


def _read_table(uri: str) -> list[dict]:
    fs, path = filesystem(uri)
    try:
        with fs.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError as err:
        raise StorageError(uri, "no such file", stage="read") from err
    except Exception as err:  # noqa: BLE001 - backends raise many types (PermissionError, botocore...)
        raise StorageError(uri, f"{type(err).__name__}: {err}", stage="read") from err
    try:
        if uri.lower().endswith(".csv"):
            # ids and URIs are text: "007" must not become the integer 7
            text = {"uri": pa.string(), "track_id": pa.string()}
            table = pacsv.read_csv(io.BytesIO(data), convert_options=pacsv.ConvertOptions(column_types=text))
        else:
            table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowException, ValueError) as err:
        raise CatalogError(f"catalog table {uri} cannot be parsed: {err}") from err
    if "uri" not in table.column_names:
        raise CatalogError(f"catalog table {uri} has no 'uri' column (columns: {', '.join(table.column_names)})")
    return table.to_pylist()


def _normalise_remote(uri: str) -> str:
    """``uri`` with its ``.`` and ``..`` key segments resolved (other keys are left as they are: a
    ``//`` may be part of an object's key); raises ValueError when a ``..`` climbs above the bucket."""
    protocol, _, rest = uri.partition("://")
    bucket, _, key = rest.partition("/")
    segments = key.split("/")
    if not {".", ".."} & set(segments):
        return uri
    kept: list[str] = []
    for segment in segments:
        if segment == "..":
            if not kept:
                raise ValueError(f"{uri} climbs above the bucket {protocol}://{bucket}")
            kept.pop()
        elif segment not in ("", "."):
            kept.append(segment)
    return f"{protocol}://{bucket}/{'/'.join(kept)}"


def _resolve(uri: str, base: str, row: int) -> str:
    """Relative URIs in a catalog table are relative to the table's folder; local paths come out
    absolute and normalised (``base`` is absolute when local, see :func:`read_catalog`), object-store
    URIs without ``.`` and ``..`` segments. ``row`` (1 = the first data row) is for the error."""
    given = uri
    if "://" not in uri and not uri.startswith("/"):
        parent = base.rsplit("/", 1)[0] if "/" in base else "."
        uri = f"{parent}/{uri}"
    if not is_remote(uri):
        return os.path.normpath(local_path(uri))
    try:
        return _normalise_remote(uri)
    except ValueError as err:
        raise CatalogError(f"catalog {base}, row {row}: uri {given!r}: {err}") from None


def read_catalog(catalog: str | Sequence[str]) -> list[Track]:
    """Tracks of a catalog (see module docstring), sorted by id; duplicate ids are an error.

    Local paths are made absolute first, so a track's URI (and the id derived from it) is the same
    whatever the working directory, and Ray workers, which may run elsewhere, can open it.
    """
    items = [catalog] if isinstance(catalog, str) else list(catalog)
    items = [item if is_remote(item) else os.path.abspath(local_path(item)) for item in items]
    tracks: list[tuple[Track, str]] = []
    for item in items:
        is_table = item.lower().endswith(_TABLE_SUFFIXES) and (
            is_remote(item) or PurePosixPath(local_path(item)).suffix.lower() in _TABLE_SUFFIXES
        )
        if is_table:
            found = _table_tracks(item)
        else:
            found = [Track(track_id_for(uri), uri) for uri in expand_inputs([item])]
        tracks.extend((t, item) for t in found)
    unique = _unique(tracks)
    return [unique[k] for k in sorted(unique)]


def _table_tracks(item: str) -> list[Track]:
    tracks = []
    for n, row in enumerate(_read_table(item), start=1):
        if not row.get("uri"):
            raise CatalogError(f"catalog {item}, row {n}: empty 'uri': {row}")
        uri = _resolve(str(row["uri"]), item, n)
        tid = row.get("track_id")
        try:
            tracks.append(Track(safe_track_id(tid) if tid not in (None, "") else track_id_for(uri), uri))
        except CatalogError as err:
            raise CatalogError(f"catalog {item}, row {n}: {err}") from None
    return tracks


def _unique(tracks: list[tuple[Track, str]]) -> dict[str, Track]:
    """One track per id (a URI listed twice is one track); raises CatalogError naming every id given
    to two different URIs, and the catalog it came from, on one line."""
    seen: dict[str, Track] = {}
    clashes: list[str] = []
    for t, item in tracks:
        first = seen.setdefault(t.track_id, t)
        if first.uri != t.uri:
            clashes.append(f"{t.track_id!r} in {item} ({first.uri} and {t.uri})")
    if clashes:
        more = f" and {len(clashes) - 3} more" if len(clashes) > 3 else ""
        ids = "track_ids" if len(clashes) > 1 else "track_id"
        raise CatalogError(f"duplicate {ids} {'; '.join(clashes[:3])}{more}: each id must name one source")
    return seen


@dataclass(frozen=True)
class Shard:
    """A unit of commit: a few tracks whose results are written and committed together."""

    shard_id: str
    tracks: tuple[Track, ...]


def make_shards(tracks: Iterable[Track], shard_size: int, *, run_id: str = "") -> list[Shard]:
    """Cut ``tracks`` into shards of at most ``shard_size``.

    A shard's id hashes ``run_id`` with its track ids: within a run, every retry or duplicate of a
    shard has the same id (so only one commit can win); a later run (a rerun of failed tracks,
    ``--force``) gets new ids and commits anew.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1. Found: {shard_size}")
    tracks = list(tracks)
    shards = []
    for i in range(0, len(tracks), shard_size):
        group = tuple(tracks[i : i + shard_size])
        shards.append(Shard(shard_id(run_id, [t.track_id for t in group]), group))
    return shards


def shard_id(run_id: str, ids: Iterable[str], prefix: str = "shard") -> str:
    """``<prefix>-<sha256(run_id, ids)[:16]>``: the same within a run for the same units, new in a later run."""
    digest = hashlib.sha256("\n".join([run_id, *ids]).encode()).hexdigest()[:16]
    return f"{prefix}-{digest}"
