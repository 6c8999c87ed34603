"""The ``demix`` command line: the parser composed from one module per command group, and ``main``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from demix.pipeline.cli._process import tune_process
from demix.pipeline.cli import batch, evaluate, gc, models, report, separate, train
from demix.pipeline.cli.common import separation_parent

EPILOG = """examples:
  demix separate song.mp3 "My Album/" s3://bucket/in/*.flac -o stems/
  demix separate song.wav -o out/ --two-stems vocals --format flac --bit-depth 24
  demix separate song.wav -o out/ --model hdemucs-musdb --weights /models/hdemucs_high_trained.pt
  demix run catalog.csv -o s3://bucket/stems --workers 2
  demix remix runs/catalog -o remixed/ --examples 500 --seed 0
  demix export --task lyrics runs/catalog -o exports/lyrics
  demix gc s3://bucket/stems --dry-run --keep 2
  demix report s3://bucket/stems --samples 8
  demix evaluate --presence synth-heldout/ -o reports/presence
  demix models
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="demix",
        description="Separate music catalogs into stems (vocals, drums, bass, other).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = separation_parent()
    separate.add_parser(sub, common)
    batch.add_parsers(sub, common)
    gc.add_parser(sub)
    report.add_parser(sub)
    train.add_parsers(sub)
    evaluate.add_parser(sub)
    models.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``demix`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    tune_process()
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
