"""``python -m demix.pipeline.cli``: the ``demix`` command."""

import sys

from demix.pipeline.cli import main

sys.exit(main())
