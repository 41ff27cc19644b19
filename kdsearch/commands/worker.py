"""``kdsearch worker``: join an existing study (usually on RDB storage) from this host with the
config the study stored when it was created."""

from __future__ import annotations

import argparse
from typing import Any

from kdsearch import trial_record as tr
from kdsearch.commands import COMMAND_HELP
from kdsearch.commands.arguments import add_storage_args, positive_int

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    w = subparsers.add_parser("worker", help=COMMAND_HELP["worker"])
    add_storage_args(w)
    w.add_argument("--budget", help="wall-clock budget of this worker")
    w.add_argument("--n-trials", type=positive_int("--n-trials"))
    w.add_argument("--workers", type=positive_int("--workers"), help="worker processes on this host")
    w.add_argument("--plain", action="store_true")
    w.set_defaults(run=run)
    return w


def run(args: argparse.Namespace) -> int:
    from kdsearch.commands.arguments import storage_url
    from kdsearch.commands.optimize import run_supervised
    from kdsearch.config import config_from_dict, parse_duration
    from kdsearch.errors import ConfigError
    from kdsearch.storage import load_study

    url = storage_url(args)
    stored = load_study(url, args.study_name).user_attrs.get(tr.CONFIG)
    if not stored:
        raise ConfigError("--study-name", "this study has no stored kdsearch config", args.study_name)
    stored["study"]["storage"] = url
    stored["study"]["run_dir"] = args.run_dir
    if args.budget:
        stored["study"]["budget"] = parse_duration(args.budget, "--budget")
    if args.n_trials:
        stored["study"]["n_trials"] = args.n_trials
    if args.workers:
        stored["study"]["workers"] = args.workers
    cfg = config_from_dict(stored)
    return run_supervised(cfg, plain=args.plain, create=False)
