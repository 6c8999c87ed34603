"""``python -m demix.pipeline.cli``: the ``demix`` command."""

from demix.pipeline.cli import entry

entry()
