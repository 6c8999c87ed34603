"""Storage on any fsspec URI: a local path by default, ``s3://`` through s3fs.

Rules every writer in demix follows:

* Final keys are written atomically: the bytes go to a temporary name first (a temp file in the same
  local folder, or a local spool for object stores) and only a complete file is renamed or uploaded
  to its final key. An exception on the way leaves nothing at the final key. A local final file
  gets the mode ``open()`` would give it (``0o666 & ~umask``), not the temp file's 0600.
* Names derived from user input go through :func:`safe_component`, so no source name can write
  outside the output root.
* Listings are never cached: :func:`filesystem` turns fsspec's listings cache off, since s3fs answers
  reads from a cached listing of the parent folder, and commits, leases and gc need fresh listings.
* Credentials never travel as arguments: s3fs reads the standard AWS environment and config files
  (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL``,
  ``~/.aws/...``), so nothing secret reaches Prefect parameters, Ray task arguments or manifests.

Retries on S3 are bounded, in two layers that multiply:

* botocore retries each request ``S3_MAX_ATTEMPTS`` times in all (``mode="standard"``: throttling
  such as 503 SlowDown, 5xx and connection errors, exponential backoff with jitter). Set as an
  fsspec default (``fsspec.config.conf["s3"]["config_kwargs"]["retries"]``) at import, so every
  s3fs instance gets it, and a user's own fsspec config (``FSSPEC_S3`` or ``~/.config/fsspec``)
  still wins; ``setdefault`` never overrides it.
* s3fs retries a failed call again (``S3FileSystem.retries``, 5 by default) when botocore gave up
  on a throttling error or a broken response; :func:`filesystem` lowers that to ``S3FS_RETRIES``.

So a call makes at most ``S3_MAX_ATTEMPTS * S3FS_RETRIES`` (6) HTTP requests before a
:class:`StorageError` naming the URI (a connection dropped mid-request may double that: aiohttp
resends once on a fresh connection when a kept-alive one was closed under it); errors that no retry
can fix (403 AccessDenied, 404) fail at the first attempt. The Prefect tasks above retry a bounded
number of times too.
"""

from __future__ import annotations

import contextlib
import glob as _glob
import mimetypes
import os
import re
import shutil
import tempfile
import unicodedata
from collections.abc import Iterator, Sequence
from pathlib import Path

import fsspec

from demix.pipeline.errors import StagedError

S3_MAX_ATTEMPTS = 3
"""botocore attempts per S3 request (first try included), ``retries.mode="standard"``."""
S3FS_RETRIES = 2
"""s3fs attempts per call, each of up to ``S3_MAX_ATTEMPTS`` requests (s3fs' own default is 5)."""

_s3_defaults = fsspec.config.conf.setdefault("s3", {})
_s3_defaults.setdefault("config_kwargs", {}).setdefault(
    "retries", {"total_max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"}
)

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".aac", ".mp4", ".aif", ".aiff", ".wma")


class StorageError(StagedError, OSError):
    """A read, write or listing on a storage URI failed. ``stage`` is ``read`` or ``write``.

    Pickles whole across Ray and Prefect process boundaries (:class:`~demix.pipeline.errors.StagedError`).
    """

    def __init__(self, uri: str, message: str, *, stage: str = "write") -> None:
        super().__init__(f"{stage} {uri}: {message}", source=uri, stage=stage)
        self.uri = uri
        self.detail = message


def is_remote(uri: str) -> bool:
    """True for URIs with a protocol other than ``file://``."""
    return "://" in uri and not uri.startswith("file://")


def local_path(uri: str) -> str:
    """Strip ``file://`` from a local URI."""
    return uri.removeprefix("file://")


def join(root: str, *parts: str) -> str:
    """Join ``parts`` under ``root`` with ``/`` (works for paths and URIs)."""
    out = root.rstrip("/") if root not in ("/", "") else root
    for part in parts:
        out = f"{out}/{part.strip('/')}" if out else part
    return out


def output_root(uri: str) -> str:
    """``uri`` as every process of a run should see it: a remote URI without a trailing slash, a
    local path made absolute (Ray workers may run in another working directory)."""
    return uri.rstrip("/") if is_remote(uri) else os.path.abspath(local_path(uri))


def check_output_root(uri: str) -> None:
    """Raise :class:`StorageError` (stage ``write``) when ``uri`` cannot be an output root: it names an
    existing file (locally or an object), or, for a local path, its nearest existing parent is not a
    writable folder. Cheap (a stat or one HEAD request): run it before any work starts."""
    root = output_root(uri)
    if is_remote(root):
        fs, path = filesystem(root)
        if fs.isfile(path):
            raise StorageError(root, "is an existing object, not a folder for the outputs")
        return
    probe = root
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise StorageError(root, f"{probe} is an existing file, not a folder for the outputs")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise StorageError(root, f"{probe} is not writable")


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(filesystem, path)`` for ``uri``; S3 filesystems get the bounded retries of the module docstring."""
    fs, path = fsspec.core.url_to_fs(uri)
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    if "s3" in protocols:
        fs.retries = S3FS_RETRIES  # an instance attribute of s3fs; not a constructor argument
    cache = getattr(fs, "dircache", None)
    if cache is not None and getattr(cache, "use_listings_cache", False):
        # Never trust a cached listing: commits, leases and gc need fresh ones, and s3fs answers a read
        # from a cached listing of the parent folder. A listing cached by one thread while another wrote
        # into that folder made a just-written object look missing (FileNotFoundError on a committed part).
        cache.use_listings_cache = False
        cache.clear()
    return fs, path


_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\]+")


def safe_component(name: str, *, max_len: int = 120) -> str:
    """A single path component from arbitrary text: no separators, no ``..``, no control chars.

    Only path separators and control characters are replaced (by ``_``); Unicode letters, spaces,
    quotes, parentheses and punctuation are kept, since POSIX file systems and object stores accept
    them. The result is NFC-normalised, at most ``max_len`` UTF-8 bytes, never empty and never starts
    with a dot (so ``..`` cannot name a parent).
    """
    cleaned = _UNSAFE.sub("_", unicodedata.normalize("NFC", name)).strip()
    cleaned = cleaned.lstrip(".") or "_"
    encoded = cleaned.encode("utf-8")[:max_len]
    return encoded.decode("utf-8", errors="ignore").rstrip() or "_"


def expand_inputs(inputs: Sequence[str], *, extensions: Sequence[str] = AUDIO_EXTENSIONS) -> list[str]:
    """Turn files, folders, globs and fsspec URIs into a sorted, de-duplicated list of audio URIs.

    Folders are searched recursively for ``extensions``; an explicit file is kept whatever its
    extension (a bad one fails later, on its own). A path that matches nothing raises ``StorageError``.
    """
    exts = tuple(e.lower() for e in extensions)
    found: list[str] = []
    for item in inputs:
        if is_remote(item):
            proto = item.split("://", 1)[0]
            try:
                fs, path = filesystem(item)
                if fs.isdir(path):
                    names = [p for p in fs.find(path) if p.lower().endswith(exts)]
                elif _glob.has_magic(path):
                    names = fs.glob(path)
                elif fs.exists(path):
                    names = [path]
                else:
                    raise FileNotFoundError(item)
            except FileNotFoundError as err:
                raise StorageError(item, "no such file or folder", stage="read") from err
            except Exception as err:  # noqa: BLE001 - backends raise many types; one typed error out
                raise StorageError(item, f"{type(err).__name__}: {err}", stage="read") from err
            found.extend(f"{proto}://{p}" for p in sorted(names))
            continue
        path = local_path(item)
        if os.path.isdir(path):
            names = sorted(
                str(p) for p in Path(path).rglob("*") if p.is_file() and p.suffix.lower() in exts
            )
        elif os.path.isfile(path):
            names = [path]
        elif _glob.has_magic(path):
            names = sorted(p for p in _glob.glob(path, recursive=True) if os.path.isfile(p))
        else:
            raise StorageError(item, "no such file or folder", stage="read") from FileNotFoundError(item)
        found.extend(names)
    return list(dict.fromkeys(found))


@contextlib.contextmanager
def local_copy(uri: str, *, spool_dir: str | None = None) -> Iterator[str]:
    """A local path holding the bytes at ``uri`` (the path itself when local; a temp copy otherwise)."""
    if not is_remote(uri):
        path = local_path(uri)
        if not os.path.isfile(path):
            raise StorageError(uri, "no such file", stage="read") from FileNotFoundError(uri)
        yield path
        return
    suffix = Path(uri).suffix
    fd, tmp = tempfile.mkstemp(prefix="demix-in-", suffix=suffix, dir=spool_dir)
    os.close(fd)
    try:
        try:
            fs, path = filesystem(uri)
            fs.get_file(path, tmp)
        except Exception as err:  # noqa: BLE001 - backends raise many types; one typed error out
            raise StorageError(uri, f"{type(err).__name__}: {err}", stage="read") from err
        yield tmp
    finally:
        Path(tmp).unlink(missing_ok=True)


def _umask() -> int:
    """The process umask, read without changing it (Linux's ``/proc/self/status``), so no other thread
    sees a changed umask; elsewhere it is set and restored at once."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _publish_mode(path: str) -> None:
    """Give a staged file the mode ``open()`` would have created it with (``0o666 & ~umask``): temp files
    come from ``mkstemp`` as 0600, and a rename or link keeps that mode."""
    os.chmod(path, 0o666 & ~_umask())


def _temp_beside(final: str | os.PathLike, *, prefix: str = ".demix-", suffix: str = ".part") -> str:
    """A new empty temp file in the folder of the local path ``final`` (created with its parents).

    Staging beside the final path keeps the last ``os.replace`` (or ``os.link``) on one file system: a
    temp file under ``/tmp`` cannot be renamed onto another mount. The caller moves or removes it.

    Raises:
        OSError: the folder or the temp file cannot be created.
    """
    folder = os.path.dirname(os.path.abspath(final))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
    os.close(fd)
    return tmp


@contextlib.contextmanager
def staged_path(final: str | os.PathLike, *, prefix: str = ".demix-", suffix: str = ".part") -> Iterator[str]:
    """A temp file beside the local path ``final`` to write, then :func:`put_file` to a final name.

    Whatever is still at the temp path when the ``with`` block ends (normally or by an exception) is
    removed; a file moved away by :func:`put_file` is gone already. For a final name known only after
    writing (``models.weights.save`` names a file by its checksum); otherwise use :class:`AtomicOutput`.

    Raises:
        OSError: the folder or the temp file cannot be created.
    """
    tmp = _temp_beside(final, prefix=prefix, suffix=suffix)
    try:
        yield tmp
    finally:
        Path(tmp).unlink(missing_ok=True)


class AtomicOutput:
    """Local staging paths for a group of output keys, committed together.

    ``path_for(uri)`` gives a local file to write; :meth:`commit` moves each finished file to its
    final key (``os.replace`` locally, an upload for object stores); :meth:`discard` (or leaving
    the ``with`` block by an exception) removes every staged file and writes nothing final.
    """

    def __init__(self, *, spool_dir: str | None = None) -> None:
        self._staged: dict[str, str] = {}
        self._spool_dir = spool_dir
        self._tmpdir: str | None = None

    def path_for(self, uri: str) -> str:
        suffix = Path(uri).suffix
        if not is_remote(uri):
            try:
                tmp = _temp_beside(local_path(uri), suffix=".part" + suffix)
            except OSError as err:
                raise StorageError(uri, str(err)) from err
        else:
            if self._tmpdir is None:
                self._tmpdir = tempfile.mkdtemp(prefix="demix-out-", dir=self._spool_dir)
            tmp = os.path.join(self._tmpdir, f"{len(self._staged)}{suffix}")
        self._staged[uri] = tmp
        return tmp

    def commit(self) -> list[str]:
        """Move every staged file to its final key; returns the committed URIs."""
        done = []
        for uri, tmp in self._staged.items():
            put_file(tmp, uri)
            done.append(uri)
        self._staged.clear()
        self.discard()
        return done

    def discard(self) -> None:
        for tmp in self._staged.values():
            Path(tmp).unlink(missing_ok=True)
        self._staged.clear()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __enter__(self) -> AtomicOutput:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.discard()


def _content_type_kwargs(fs, path: str) -> dict:
    """``{"ContentType": ...}`` for an S3 key, guessed from its name (text with a UTF-8 charset)."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    ctype = mimetypes.guess_type(path)[0] if "s3" in protocols else None
    return {"ContentType": f"{ctype}; charset=utf-8" if ctype.startswith("text/") else ctype} if ctype else {}


def put_file(local: str, uri: str) -> None:
    """Move/upload a finished local file to ``uri`` as one atomic step.

    A local target gets the mode a plain ``open()`` gives (``0o666 & ~umask``), whatever the staged
    file's own mode (temp files are 0600).
    """
    try:
        if not is_remote(uri):
            final = local_path(uri)
            os.makedirs(os.path.dirname(os.path.abspath(final)), exist_ok=True)
            _publish_mode(local)
            os.replace(local, final)
        else:
            fs, path = filesystem(uri)
            # published only once uploaded; typed by the final name (s3fs would use the staged file's)
            fs.put_file(local, path, **_content_type_kwargs(fs, path))
            Path(local).unlink(missing_ok=True)
    except Exception as err:  # noqa: BLE001 - one typed error out
        raise StorageError(uri, f"{type(err).__name__}: {err}") from err


def atomic_write(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri`` atomically (see :func:`put_file`).

    A local target is staged in its own folder, so the final ``os.replace`` never crosses file
    systems (a temp file under ``/tmp`` cannot be renamed onto another mount).
    """
    try:
        if is_remote(uri):
            fd, tmp = tempfile.mkstemp(prefix=".demix-", suffix=".part")
            os.close(fd)
        else:
            tmp = _temp_beside(local_path(uri))
    except OSError as err:
        raise StorageError(uri, f"{type(err).__name__}: {err}") from err
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        put_file(tmp, uri)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _lost_race(err: BaseException) -> bool:
    """True when ``err`` (or an error it wraps) is S3's answer to a conditional create of an existing key."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, FileExistsError):
            return True
        response = getattr(seen, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "PreconditionFailed" or status == 412:
                return True
        seen = seen.__cause__ or seen.__context__
    return False


def create_once(uri: str, data: bytes) -> bool:
    """Create ``uri`` with ``data`` only if it does not exist; True when this call created it."""
    if is_remote(uri):
        fs, path = filesystem(uri)
        try:
            fs.pipe_file(path, data, mode="create")
            return True
        except Exception as err:  # noqa: BLE001 - botocore's PreconditionFailed comes in several wrappers
            if _lost_race(err):
                return False
            raise StorageError(uri, f"{type(err).__name__}: {err}") from err
    final = os.path.abspath(local_path(uri))
    try:
        tmp = _temp_beside(final)
    except OSError as err:
        raise StorageError(uri, f"{type(err).__name__}: {err}") from err
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _publish_mode(tmp)
        os.link(tmp, final)  # atomic create-if-absent on POSIX file systems
        return True
    except FileExistsError:
        return False
    except OSError as err:
        raise StorageError(uri, f"{type(err).__name__}: {err}") from err
    finally:
        os.unlink(tmp)
