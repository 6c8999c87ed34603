"""Fetching, verifying and loading weights.

Weights live at a URI: a local path, any fsspec URI (``s3://``, ``gs://``, ``file://``) or an
``http(s)://`` address. Remote files are copied once into a cache folder (``$DEMIX_CACHE`` or
``~/.cache/demix``) and their sha256 is checked before anything is deserialised. Files load with
safetensors (``.safetensors``) or ``torch.load(weights_only=True)``; state dicts load with a strict key
match. Nothing here downloads silently into the working tree or accepts a hash mismatch.

A weights file a user names (``--weights``) needs a checksum, see :func:`fetch_user_weights`: its
``--weights-sha256``, the registry entry's sha256, or a ``-<sha8>`` in its name; only an explicit
``--trust-weights`` loads it unverified. Each load says which one held (:data:`VERIFIED_BY`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import re
import shutil
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

import fsspec
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from demix.models.base import ModelLoadError
from demix.pipeline.io import put_file, staged_path

_CHUNK = 1 << 20
_SHA8_IN_NAME = re.compile(r"-([0-9a-f]{8})\.(?:th|pt|pth|safetensors)$")
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")

VERIFIED_BY = ("--weights-sha256", "registry sha256", "sha8 in name", "trusted (unverified)", "unverified (no sha256 in the registry)")
"""How loaded weights were verified (a model's ``weights_verified_by``): the user's sha256, the registry
entry's, the ``-<sha8>`` in the file name, ``--trust-weights``, or a registry entry without a sha256."""


def cache_dir() -> Path:
    """Folder where remote weights are kept: ``$DEMIX_CACHE`` or ``~/.cache/demix``."""
    return Path(os.environ.get("DEMIX_CACHE", Path.home() / ".cache" / "demix"))


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a local file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def _is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def _download(uri: str, dest: Path) -> None:
    """Copy ``uri`` to ``dest`` atomically (temp file in the same folder, then rename)."""
    with staged_path(dest, prefix=dest.name + ".", suffix=".part") as tmp:
        with open(tmp, "wb") as out:
            if _is_http(uri):
                with urllib.request.urlopen(uri, timeout=60) as resp:  # noqa: S310 - documented fetch
                    shutil.copyfileobj(resp, out, _CHUNK)
            else:
                with fsspec.open(uri, "rb") as src:
                    shutil.copyfileobj(src, out, _CHUNK)
        put_file(tmp, str(dest))


def fetch(uri: str, *, sha256: str | None = None, cache: Path | None = None) -> Path:
    """Return a local path holding the verified weights at ``uri``.

    Args:
        uri: local path, fsspec URI or http(s) address.
        sha256: expected hex digest; ``None`` skips the check only when the file name carries no
            ``-<sha8>`` suffix (demucs' ``<sig>-<sha8>.th`` convention is always checked).
        cache: cache folder for remote files (default :func:`cache_dir`).

    Raises:
        ModelLoadError: the file is missing, cannot be fetched (offline, for example) or its hash
            does not match.
    """
    path = _localise(uri, cache)
    verify(path, sha256=sha256, uri=uri)
    return path


def _localise(uri: str, cache: Path | None = None) -> Path:
    """A local path holding the bytes at ``uri`` (remote files are downloaded into the cache once)."""
    if _is_local(uri):
        path = Path(uri.removeprefix("file://")).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"weights file not found: {uri}")
        return path
    path = cache_path(uri, cache)
    if not path.is_file():
        try:
            _download(uri, path)
        except (urllib.error.URLError, OSError) as err:
            with contextlib.suppress(OSError):
                path.parent.rmdir()  # only if empty: nothing of a failed download stays in the cache
            raise ModelLoadError(
                f"could not download weights from {uri}: {err}. On a machine without network, fetch the "
                f"file elsewhere and pass it with --weights PATH_OR_URI (a local path, s3://..., etc.), "
                f"or copy it to {path}"
            ) from err
    return path


def cache_path(uri: str, cache: Path | None = None) -> Path:
    """Where the remote file at ``uri`` is (or would be) kept in the cache; a local path is itself."""
    if _is_local(uri):
        return Path(uri.removeprefix("file://")).expanduser()
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    # one folder per URI: two files of one name at two addresses (v1/model.pt, v2/model.pt) never share a copy
    return (cache or cache_dir()) / "weights" / hashlib.sha256(uri.encode()).hexdigest()[:16] / name


def fetch_user_weights(
    uri: str, *, sha256: str | None = None, registry_sha256: str | None = None, trust: bool = False,
    model: str = "this model", cache: Path | None = None,
) -> tuple[Path, str, str]:
    """Fetch and verify a weights file the user named (``--weights``); return ``(path, sha256, verified_by)``.

    Checked in this order, the first that applies saying how (``verified_by``, one of :data:`VERIFIED_BY`):
    ``sha256`` (``--weights-sha256``) must match; else the registry entry's ``registry_sha256`` when the
    file matches it; else a ``-<sha8>`` in the file name (always checked when present); else ``trust``
    (``--trust-weights``) loads it unverified. A file the registry's sha256 does not match, or one with
    no checksum at all, is refused (one with nothing to check it against before any download).

    Raises:
        ModelLoadError: missing, not fetched, a checksum mismatch, or no checksum and no ``trust``.
    """
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    if sha256 is None and registry_sha256 is None and not _SHA8_IN_NAME.search(name) and not trust:
        raise ModelLoadError(
            f"weights {uri} come with no checksum to verify them: pass their sha256 with --weights-sha256 HEX, "
            "name the file NAME-<first 8 hex of its sha256>.safetensors (as `demix train --export` does), "
            "or pass --trust-weights to load them unverified"
        )
    path = _localise(uri, cache)
    actual = verify(path, sha256=sha256, uri=uri)
    if sha256 is not None:
        return path, actual, VERIFIED_BY[0]
    if registry_sha256 is not None and actual == registry_sha256.lower():
        return path, actual, VERIFIED_BY[1]
    if _SHA8_IN_NAME.search(path.name):
        return path, actual, VERIFIED_BY[2]
    if trust:
        return path, actual, VERIFIED_BY[3]
    raise ModelLoadError(
        f"weights {uri} do not match the registry's sha256 for {model} (expected {registry_sha256[:12]}..., found "
        f"{actual[:12]}...); refusing to load. If this is another file you know, pass its sha256 with "
        "--weights-sha256 HEX, or pass --trust-weights to load it unverified"
    )


def fetch_registry_weights(uri: str, *, sha256: str | None) -> tuple[Path, str, str]:
    """Fetch a registry entry's own weights, checked against its ``sha256``; return ``(path, sha256, verified_by)``."""
    path = _localise(uri)
    actual = verify(path, sha256=sha256, uri=uri)
    how = VERIFIED_BY[1] if sha256 else VERIFIED_BY[2] if _SHA8_IN_NAME.search(path.name) else VERIFIED_BY[4]
    return path, actual, how


def verify(path: Path, *, sha256: str | None, uri: str | None = None) -> str:
    """Check ``path`` against ``sha256`` and any ``-<sha8>`` in its name; return the actual digest."""
    actual = sha256_file(path)
    where = uri or str(path)
    if sha256 is not None and actual != sha256.lower():
        raise ModelLoadError(f"sha256 mismatch for weights {where}: expected {sha256}, found {actual}; refusing to load")
    match = _SHA8_IN_NAME.search(path.name)
    if match and not actual.startswith(match.group(1)):
        raise ModelLoadError(
            f"sha256 mismatch for weights {where}: the file name promises {match.group(1)}..., found {actual[:8]}...; "
            "refusing to load"
        )
    return actual


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict from safetensors or a ``torch.save`` file (``weights_only=True``).

    A pickle holding anything but tensors is refused with demix's own message: PyTorch's (advice to
    load it with ``weights_only=False``, which would run its code) is never relayed, not even chained.
    """
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = _GLOBAL.search(str(err))
        if not found:  # not a refused global: a corrupt or non-pickle file (PyTorch's advice left out)
            raise ModelLoadError(f"cannot read weights {path}: not a readable torch.save file or safetensors") from None
        raise ModelLoadError(
            f"cannot read weights {path}: the file holds Python objects other than tensors ({found.group(1)}); "
            "demix loads only tensors and never runs code from a weights file. Convert it to safetensors or to "
            "a plain state dict of tensors (torch.save(model.state_dict(), path)), on a machine where you trust "
            "the file"
        ) from None
    except Exception as err:  # noqa: BLE001 - every deserialiser error becomes one typed error
        raise ModelLoadError(f"cannot read weights {path}: {type(err).__name__}: {err}") from err
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"weights {path} do not hold a state dict of tensors")
    return state


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], *, where: str) -> None:
    """``load_state_dict(strict=True)`` with an error that lists missing and unexpected keys."""
    expected = set(module.state_dict())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise ModelLoadError(
            f"weights {where} do not match the architecture: missing keys {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ModelLoadError(f"weights {where} do not match the architecture: {err}") from err


def save(state: Mapping[str, torch.Tensor], folder: str | os.PathLike, name: str, *, half: bool = False) -> tuple[Path, str]:
    """Write ``state`` as ``<folder>/<name>-<sha8>.safetensors`` atomically; return ``(path, sha256)``.

    The one place that names weights by their checksum (demucs' ``<sig>-<sha8>.th`` habit), beside the
    loader that checks the name (:func:`verify`). Tensors are moved to the CPU and made contiguous;
    ``half`` stores floating-point tensors as float16. The folder is created.
    """
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    if half:
        tensors = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    folder = Path(folder)
    with staged_path(folder / name, prefix=f".{name}.", suffix=".safetensors.part") as tmp:
        save_file(tensors, tmp)
        digest = sha256_file(tmp)
        path = folder / f"{name}-{digest[:8]}.safetensors"
        put_file(tmp, str(path))
    return path, digest
