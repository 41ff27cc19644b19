"""``kdsearch report``: a self-contained HTML report of a stored study (optional PNG figures)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from kdsearch.commands import COMMAND_HELP
from kdsearch.commands.arguments import add_storage_args

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    r = subparsers.add_parser("report", help=COMMAND_HELP["report"])
    add_storage_args(r)
    r.add_argument("--out", help="HTML file (default: <run-dir>/<study>/report.html)")
    r.add_argument("--png", help="also write static PNG figures here (needs kaleido)")
    r.set_defaults(run=run)
    return r


def run(args: argparse.Namespace) -> int:
    from kdsearch.commands.arguments import artifact_dir, storage_url
    from kdsearch.commands.output import stdout_console
    from kdsearch.report import build_report
    from kdsearch.storage import make_folder

    url = storage_url(args)
    out = Path(args.out or f"{args.run_dir}/{args.study_name}/report.html")
    make_folder(out.parent, "--out")  # a folder that cannot be made is one line, before any work
    path = build_report(
        storage_url=url, study_name=args.study_name, out_path=out,
        artifact_dir=artifact_dir(args), png_dir=Path(args.png) if args.png else None, run_dir=args.run_dir,
    )
    stdout_console().print(f"wrote {path}", highlight=False)
    return 0
