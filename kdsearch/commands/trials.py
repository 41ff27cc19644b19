"""``kdsearch trials``: list a study's trials (or its feasible Pareto front), as a table or JSON."""

from __future__ import annotations

import argparse
import json
import math
import sys

from kdsearch.commands import COMMAND_HELP
from kdsearch.commands.arguments import add_storage_args

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (a third of a --help)
if TYPE_CHECKING:
    from typing import Any

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    t = subparsers.add_parser("trials", help=COMMAND_HELP["trials"])
    add_storage_args(t)
    t.add_argument("--pareto", action="store_true", help="only the feasible Pareto front (infeasible marked)")
    t.add_argument("--json", action="store_true", help="print JSON: number, state, params, values, user_attrs")
    t.set_defaults(run=run)
    return t


def _json_default(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return str(obj)


def run(args: argparse.Namespace) -> int:
    from kdsearch.commands.arguments import storage_url
    from kdsearch.commands.output import stdout_console
    from kdsearch.report.trials_table import PARETO_FOOTNOTE, leak_warnings, trial_records, trials_table
    from kdsearch.storage import load_study

    study = load_study(storage_url(args), args.study_name, args.run_dir)
    if args.json:
        records = trial_records(study, args.pareto)
        sys.stdout.write(json.dumps(records, indent=1, default=_json_default) + "\n")
        return 0
    console = stdout_console()
    console.print(trials_table(study, args.pareto))
    if args.pareto:
        console.print(PARETO_FOOTNOTE)
    for warning in leak_warnings(study):
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    return 0
