"""kdsearch: multi-objective search for the best small CNN student to distil from a large teacher.

See README.md and docs/ARCHITECTURE.md. ``load_student(DIR)`` rebuilds an exported student.

This module imports only :mod:`kdsearch._version` when it loads (not even ``typing``), so ``import kdsearch`` (and
``kdsearch --help``) does not pull in torch. ``load_student`` comes from
:mod:`kdsearch.checkpoint` on first use; no kdsearch module imports this one back.
"""

from __future__ import annotations

from kdsearch._version import __version__

__all__ = ["__version__", "load_student"]


def __getattr__(name: str) -> object:
    # PEP 562: the checkpoint format (and torch with it) loads only when load_student is asked for.
    if name == "load_student":
        from kdsearch.checkpoint import load_student

        return load_student
    raise AttributeError(f"module 'kdsearch' has no attribute {name!r}")
