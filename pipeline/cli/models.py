"""``demix models``: the registry, one entry per model."""

from __future__ import annotations

import argparse

from demix.models.registry import DEFAULT_MODEL, list_models


def add_parser(sub) -> None:
    p = sub.add_parser("models", help="list registered models", description="List registered models and where their weights live.")
    p.set_defaults(handler=cmd_models)


def cmd_models(_: argparse.Namespace) -> int:
    for entry in list_models():
        default = " (default)" if entry.name == DEFAULT_MODEL else ""
        weights = entry.weights_uri
        if weights is None:
            trainable = any(True for _ in entry.factory().parameters())
            weights = "none: untrained unless --weights is given" if trainable else "none needed"
        kind = "" if entry.kind == "separator" else f" [{entry.kind} model: used by `demix run --presence`]"
        print(f"{entry.name}{default}{kind}\n  {entry.description}\n  rate {entry.sample_rate} Hz, stems {', '.join(entry.sources)}\n  weights {weights}")
        if entry.options():
            print(f"  options: {', '.join(entry.options())}")
    return 0
