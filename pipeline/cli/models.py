"""``demix models``: the registry, one entry per model."""

from __future__ import annotations

import argparse

from demix.models.registry import DEFAULT_MODEL, list_models
from demix.pipeline.learn.oracles import ORACLES


def add_parser(sub) -> None:
    p = sub.add_parser("models", help="list registered models", description="List registered models and where their weights live, and the oracles `demix evaluate` computes from references (irm).")
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
    registered = {entry.name for entry in list_models()}
    for name, description in ORACLES.items():
        if name not in registered:  # computed from the references: not a separator, nothing to load
            print(f"{name} [evaluation oracle: only `demix evaluate --model {name}`]\n  {description}\n  weights none needed")
    return 0
