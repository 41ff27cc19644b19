"""``kdsearch table``: a paper-style pivot table from storage, as Markdown and/or CSV."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from kdsearch.commands import COMMAND_HELP
from kdsearch.commands.arguments import add_storage_args

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    tb = subparsers.add_parser("table", help=COMMAND_HELP["table"])
    add_storage_args(tb)
    tb.add_argument("--rows", required=True, help="row key: a param or user attr (e.g. teacher, family, vgg_depth)")
    tb.add_argument("--cols", required=True, help="column key (e.g. resolution)")
    tb.add_argument("--metric", required=True, help="cell value (e.g. val_accuracy, kd_time_s, macs)")
    tb.add_argument("--agg", choices=["max", "min", "mean", "median"], default="max")
    tb.add_argument("--format", choices=["markdown", "csv", "both"], default="both")
    tb.set_defaults(run=run)
    return tb


def run(args: argparse.Namespace) -> int:
    from kdsearch.commands.arguments import storage_url
    from kdsearch.report.pivot_table import pivot_table, render_csv, render_markdown
    from kdsearch.storage import load_study

    study = load_study(storage_url(args), args.study_name, args.run_dir)
    table = pivot_table(study, rows=args.rows, cols=args.cols, metric=args.metric, agg=args.agg)
    if args.format in ("markdown", "both"):
        sys.stdout.write(render_markdown(table) + "\n")
    if args.format == "both":
        sys.stdout.write("\n")
    if args.format in ("csv", "both"):
        sys.stdout.write(render_csv(table))
    return 0
