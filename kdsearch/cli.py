"""The ``kdsearch`` command line: wires the commands of :mod:`kdsearch.commands` and is the one
place that prints errors or exits.

Every user mistake is a :class:`~kdsearch.errors.KDSearchError`: one line on stderr, exit code 2,
and a traceback only with ``--debug``. Building the parser imports no torch, Optuna or timm, so
``kdsearch --help`` and ``kdsearch <command> --help`` answer at once.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from kdsearch._version import __version__
from kdsearch.commands import (
    cache,
    dashboard,
    env,
    export,
    finetune,
    optimize,
    report,
    studies,
    table,
    trials,
    worker,
)
from kdsearch.errors import ConfigError, KDSearchError

__all__ = ["main", "build_parser", "COMMANDS"]

COMMANDS = (optimize, studies, trials, export, report, dashboard, finetune, table, cache, env, worker)
"""The command modules, in the order ``kdsearch --help`` lists them."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises a one-line ConfigError (exit 2) instead of printing usage."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(self.prog, message)


def build_parser() -> argparse.ArgumentParser:
    """The ``kdsearch`` parser with one subparser per module in :data:`COMMANDS`."""
    p = _Parser(prog="kdsearch", description="Search for the best small CNN student to distil from a large teacher.")
    p.add_argument("--version", action="version", version=f"kdsearch {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for command in COMMANDS:
        command.add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns its exit code (2 for a user error, 130 for Ctrl-C)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        import logging  # after parsing: --help and argument errors need no logging set-up

        logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        return int(args.run(args) or 0)
    except KDSearchError as exc:
        if debug:
            from rich.console import Console  # only here: rich costs ~15 ms, a third of --help

            Console(stderr=True, soft_wrap=True).print_exception()
        # Plain text: the message is one line of user-typed values, never markup.
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return 130
    except SystemExit as exc:  # --help / --version
        return int(exc.code or 0)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
