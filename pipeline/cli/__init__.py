"""The ``demix`` command line: the only place, with the flows, that prints or exits."""

from demix.pipeline.cli.main import main

__all__ = ["main"]
