"""Command-line arguments several commands share: typed numbers and the storage flags.

Light on purpose (argparse, ``kdsearch.errors`` and ``kdsearch.constants`` only): the parsers are built for ``--help``
too. The study-file package, the storage module (and Optuna with it) load only when a command runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from kdsearch.constants import DEFAULT_RUN_DIR
from kdsearch.errors import ConfigError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (a third of a --help)
if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["integer", "positive_int", "add_storage_args", "storage_url", "artifact_dir"]

def integer(flag: str) -> Callable[[str], int]:
    """An argparse ``type`` that turns text into an int, or a ConfigError naming ``flag``."""

    def conv(text: str) -> int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(flag, "must be an integer", text) from None

    return conv


def positive_int(flag: str) -> Callable[[str], int]:
    """Like :func:`integer`, and the value must be >= 1."""

    def conv(text: str) -> int:
        v = integer(flag)(text)
        if v < 1:
            raise ConfigError(flag, "must be >= 1", text)
        return v

    return conv


def add_storage_args(p: argparse.ArgumentParser) -> None:
    """``--study-name`` (required), ``--storage`` and ``--run-dir``: which stored study to read."""
    p.add_argument("--study-name", required=True, help="the study to read")
    p.add_argument("--storage", help="storage URL (default: the journal file in --run-dir/<study>/)")
    p.add_argument("--run-dir", default=DEFAULT_RUN_DIR, help=f"run folder (default: {DEFAULT_RUN_DIR})")


def storage_url(args: argparse.Namespace) -> str:
    """The storage URL the storage flags name, after checking ``--study-name`` and ``--storage``."""
    from kdsearch.storage import check_study_name, resolve_storage_url

    check_study_name(args.study_name)
    return resolve_storage_url(args.storage, args.run_dir, args.study_name)


def artifact_dir(args: argparse.Namespace) -> Path:
    """The study's artifact folder (``<run-dir>/<study>/artifacts``)."""
    from kdsearch.storage import run_paths

    return run_paths(args.run_dir, args.study_name).artifacts
