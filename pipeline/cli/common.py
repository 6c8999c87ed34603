"""What every command shares: one way to fail, the device choice, option parsing, progress callbacks."""

from __future__ import annotations

import argparse
import re
import sys

import torch

from demix.models.registry import add_model_flags
from demix.pipeline.engine import add_separation_flags, add_stem_flags
from demix.pipeline.io import add_encoding_flags


def fail(message: object) -> int:
    """Print ``demix: error: MESSAGE`` on stderr; returns the exit status for user errors (2)."""
    print(f"demix: error: {message}", file=sys.stderr)
    return 2


_DEVICE = re.compile(r"auto|cpu|mps|cuda(:[0-9]+)?")


def device(name: str) -> str:
    """``--device``: ``auto`` becomes ``cuda`` when torch sees a GPU, else ``cpu``.

    Raises:
        ValueError: a name other than auto, cpu, cuda, cuda:N or mps, or a device torch does not see.
    """
    if not _DEVICE.fullmatch(name):
        raise ValueError(f"--device must be auto, cpu, cuda, cuda:N or mps. Found: {name!r}")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(name.partition(":")[2] or 0)
        if index >= count:
            raise ValueError(f"--device {name} asked for, but torch sees {count} CUDA device(s)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps asked for, but torch sees no MPS device")
    return name


def parse_option(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` of ``--option``: an int, a float, true/false, or the string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--option expects KEY=VALUE. Found: {text!r}")
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    return key, {"true": True, "false": False}.get(value.lower(), value)


def progress(bar):
    """A ``progress(done, total)`` callback that moves the tqdm ``bar``."""

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    return update


def add_no_progress(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def separation_parent() -> argparse.ArgumentParser:
    """The options of every command that separates audio, each group declared by the module that owns it."""
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("model and separation")
    add_model_flags(g)
    add_stem_flags(g)
    add_encoding_flags(g)
    add_separation_flags(g)
    add_no_progress(g)
    return common


def evaluation_parent() -> argparse.ArgumentParser:
    """The options of ``demix evaluate``: the model and how it is applied; no stem choice or encoding
    (evaluation scores every source in memory and writes no audio)."""
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("model and separation")
    add_model_flags(g)
    add_separation_flags(g)
    add_no_progress(g)
    return common
