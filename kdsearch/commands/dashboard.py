"""``kdsearch dashboard``: optuna-dashboard on a stored study until Ctrl-C."""

from __future__ import annotations

import argparse
from typing import Any

from kdsearch.commands import COMMAND_HELP
from kdsearch.commands.arguments import add_storage_args, integer

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    d = subparsers.add_parser("dashboard", help=COMMAND_HELP["dashboard"])
    add_storage_args(d)
    d.add_argument("--host", default="127.0.0.1")
    d.add_argument("--port", type=integer("--port"), default=8080, help="0 = any free port (range checked on start)")
    d.set_defaults(run=run)
    return d


def run(args: argparse.Namespace) -> int:
    from kdsearch.commands.arguments import artifact_dir, storage_url
    from kdsearch.commands.output import stdout_console
    from kdsearch.dashboard import start_dashboard
    from kdsearch.storage import load_study

    url = storage_url(args)
    load_study(url, args.study_name)  # one-line error if it does not exist
    handle = start_dashboard(url, artifact_dir(args), host=args.host, port=args.port)
    console = stdout_console()
    for warning in handle.warnings:
        console.print(f"warning: {warning}", highlight=False)
    console.print(f"optuna-dashboard for {args.study_name}: {handle.url}  (Ctrl-C to stop)", highlight=False)
    try:
        handle.wait()
    except KeyboardInterrupt:
        pass
    finally:
        handle.stop()
    return 0
