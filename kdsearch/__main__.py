"""``python -m kdsearch``: the same entry point as the ``kdsearch`` console script."""

from __future__ import annotations

import sys

from kdsearch.cli import main

if __name__ == "__main__":
    sys.exit(main())
