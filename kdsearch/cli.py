"""The ``kdsearch`` command line: wires the commands of :mod:`kdsearch.commands` and is the one
place that prints errors or exits.

Every user mistake is a :class:`~kdsearch.errors.KDSearchError`: one line on stderr, exit code 2,
and a traceback only with ``--debug``. Building the parser imports no torch, Optuna or timm, so
``kdsearch --help`` and ``kdsearch <command> --help`` answer at once. Only the command asked for
gets its full subparser (its module is imported); the others are listed from the static table
:data:`~kdsearch.commands.COMMAND_HELP`, so ``kdsearch --help`` imports no command module.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Sequence
from importlib import import_module

from kdsearch._version import __version__
from kdsearch.commands import COMMAND_HELP
from kdsearch.errors import ConfigError, KDSearchError

__all__ = ["main", "build_parser", "COMMANDS"]

COMMANDS: tuple[str, ...] = tuple(COMMAND_HELP)
"""The command names (each a module of :mod:`kdsearch.commands`), in the order ``kdsearch --help``
lists them."""


def _terminal_columns() -> int:
    """The terminal width as :func:`shutil.get_terminal_size` reads it (``COLUMNS``, then the
    terminal, else 80), without importing :mod:`shutil`: its imports (bz2, lzma, fnmatch) were a
    tenth of ``kdsearch --help``."""
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns if columns > 0 else 80


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, told the width (argparse would import shutil to ask)."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:
        width = _terminal_columns() - 2 if width is None else width  # argparse's own margin
        super().__init__(prog, indent_increment, max_help_position, width)


class _Parser(argparse.ArgumentParser):
    """argparse that raises a one-line ConfigError (exit 2) instead of printing usage."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(self.prog, message)


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The ``kdsearch`` parser: the full subparser of each command in ``commands`` (default: all of
    :data:`COMMANDS`; their modules are imported), and for every other command a bare one with its
    one-line help, so ``--help`` lists it and argparse still knows the name."""
    full = set(COMMANDS if commands is None else commands)
    p = _Parser(prog="kdsearch", description="Search for the best small CNN student to distil from a large teacher.")
    p.add_argument("--version", action="version", version=f"kdsearch {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, help_text in COMMAND_HELP.items():
        if name in full:
            import_module(f"kdsearch.commands.{name}").add_parser(sub)
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    return p


def _command_of(argv: Sequence[str]) -> str | None:
    """The command ``argv`` names: its first word that is not an option (the top-level options,
    ``--debug``, ``--version`` and ``--help``, take no value)."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns its exit code (2 for a user error, 130 for Ctrl-C)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        command = _command_of(argv)  # only its module is imported: the others are names and helps
        args = build_parser([command] if command else []).parse_args(argv)
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
