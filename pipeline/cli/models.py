"""``demix models``: the registry, one entry per model; ``--download NAME [--to URI]`` fetches and verifies
a model's published weights ahead of a run (and copies them where a cluster reads them)."""

from __future__ import annotations

import argparse

import fsspec

from demix.models import weights as _weights
from demix.models.base import ModelLoadError
from demix.models.registry import DEFAULT_MODEL, ModelEntry, get_entry, list_models, resolve_parts
from demix.pipeline.cli.common import fail
from demix.pipeline.learn.oracles import ORACLES


def add_parser(sub) -> None:
    p = sub.add_parser(
        "models", help="list registered models; --download fetches a model's weights",
        description=(
            "List registered models: stems, sample rate, size of the weights, the SDR the publisher states (labelled "
            "as published, with its source), the licence of the weights, and whether they are cached here "
            "($DEMIX_CACHE or ~/.cache/demix). Also the oracles `demix evaluate` computes from references (irm). "
            "With --download NAME: fetch the model's published weights into the cache and verify them (sha256, or the "
            "8-hex prefix in a demucs file name), so a later run needs no network; --to URI also copies them there "
            "(for example s3://bucket/weights/), to pass to a run with --weights."
        ),
    )
    p.add_argument("--download", metavar="NAME", help="fetch and verify the published weights of model NAME")
    p.add_argument("--to", metavar="URI", help="with --download: also copy the verified file(s) into this folder or URI prefix")
    p.set_defaults(handler=cmd_models)


def _cached(entry: ModelEntry) -> str:
    if entry.weights_uri is None:
        return "-"
    uris = [f"{entry.weights_uri.rstrip('/')}/{n}" for n in entry.bag] or [entry.weights_uri]
    if all("://" not in u or u.startswith("file://") for u in uris):
        return "shipped with demix"
    have = sum(_weights.cache_path(u).is_file() for u in uris)
    return "yes" if have == len(uris) else f"no (demix models --download {entry.name})" if have == 0 else f"{have} of {len(uris)} files"


def _describe(entry: ModelEntry) -> str:
    default = " (default)" if entry.name == DEFAULT_MODEL else ""
    kind = "" if entry.kind == "separator" else f" [{entry.kind} model: used by `demix run --presence`]"
    weights = entry.weights_uri
    if weights is None:
        trainable = any(True for _ in entry.factory().parameters())
        weights = "none: untrained unless --weights is given" if trainable else "none needed"
    elif entry.bag:
        weights = f"{len(entry.bag)} files under {weights}: {', '.join(entry.bag)}"
    lines = [f"{entry.name}{default}{kind}", f"  {entry.description}",
             f"  stems {', '.join(entry.sources)} ({len(entry.sources)}); rate {entry.sample_rate} Hz", f"  weights {weights}"]
    pub = entry.published
    if pub is not None:
        sdr = f"{pub.sdr:.2f} dB" if pub.sdr is not None else "none"
        lines += [
            f"  size {pub.size_mb:,.1f} MB ({pub.params:,} parameters); licence of the weights: {pub.licence}",
            f"  published SDR: {sdr} (as published, not measured by demix: {pub.sdr_note})",
            f"  source {pub.page}",
        ]
    elif entry.weights_uri is not None:
        lines.append(f"  size {_size_mb(entry)}; licence of the weights: MIT (demix's own, trained by demix)")
    lines.append(f"  cached locally: {_cached(entry)}")
    if entry.options():
        lines.append(f"  options: {', '.join(entry.options())}")
    return "\n".join(lines)


def _size_mb(entry: ModelEntry) -> str:
    path = _weights.cache_path(entry.weights_uri)
    return f"{path.stat().st_size / 1e6:.1f} MB" if path.is_file() else "unknown until downloaded"


def cmd_models(args: argparse.Namespace) -> int:
    if getattr(args, "download", None):
        return _download(args.download, getattr(args, "to", None))
    if getattr(args, "to", None):
        return fail("--to needs --download NAME")
    for entry in list_models():
        print(_describe(entry))
    registered = {entry.name for entry in list_models()}
    for name, description in ORACLES.items():
        if name not in registered:  # computed from the references: not a separator, nothing to load
            print(f"{name} [evaluation oracle: only `demix evaluate --model {name}`]\n  {description}\n  weights none needed")
    return 0


def _download(name: str, to: str | None) -> int:
    try:
        entry = get_entry(name)
        parts = resolve_parts(entry, None)
    except ModelLoadError as err:
        return fail(str(err))
    for path, digest, how in parts:
        print(f"{name}: {path} ({path.stat().st_size / 1e6:.1f} MB) sha256 {digest} verified by: {how}")
        if to:
            dest = f"{to.rstrip('/')}/{path.name}"
            fs, target = fsspec.core.url_to_fs(dest)
            fs.makedirs(fs._parent(target), exist_ok=True)
            fs.put_file(str(path), target)
            print(f"{name}: copied to {dest}; run with --weights {dest if not entry.bag else to.rstrip('/')}")
    return 0
