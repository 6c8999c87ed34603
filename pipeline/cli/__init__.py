"""The ``demix`` command line: the only place, with the flows, that prints or exits."""

from demix.pipeline.cli import _process  # noqa: F401  (before torch: sets OMP_WAIT_POLICY)
from demix.pipeline.cli._process import exit_process
from demix.pipeline.cli.main import main

__all__ = ["entry", "main"]


def entry() -> None:
    """The ``demix`` console script: :func:`main` with the process's arguments, then exit."""
    exit_process(main())
