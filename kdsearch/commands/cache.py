"""``kdsearch cache``: the teacher-logit caches of a run folder, with their key, size and the
studies that used them; ``kdsearch cache rm KEY... --yes`` (or ``--all --yes``) removes them.

The caches are found by their content key (teacher and weights, data fingerprint, views,
normalisation, precision, top-k: :func:`kdsearch.distill.teacher_cache.cache_key`) in
``<run_dir>/_cache/logits``, shared by every study of the run folder; ``--cache-dir`` reads
another folder (the one ``optimize --cache-dir`` wrote to). A removed cache is rebuilt by the next
study that needs it.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from kdsearch.commands import COMMAND_HELP
from kdsearch.constants import DEFAULT_RUN_DIR
from kdsearch.errors import ConfigError

__all__ = ["add_parser", "run", "MIN_KEY_PREFIX"]

MIN_KEY_PREFIX = 6
"""Hex digits of a key that ``rm`` needs at least (the listing shows 16)."""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    c = subparsers.add_parser(
        "cache",
        help=COMMAND_HELP["cache"],
        description="List the teacher-logit caches of a run folder, shared by its studies, or remove them.",
    )
    c.add_argument("action", nargs="?", choices=["list", "rm"], default="list",
                   help="list (the default) or rm")
    c.add_argument("keys", nargs="*", metavar="KEY", help="with rm: the caches to remove (a key prefix, 6+ hex digits)")
    c.add_argument("--all", action="store_true", help="with rm: remove every cache")
    c.add_argument("--yes", action="store_true", help="with rm: really remove (without it, rm only says what it would)")
    c.add_argument("--run-dir", default=DEFAULT_RUN_DIR, help=f"run folder (default: {DEFAULT_RUN_DIR})")
    c.add_argument("--cache-dir", help="the cache folder, when optimize ran with --cache-dir")
    c.add_argument("--json", action="store_true", help="machine-readable listing")
    c.set_defaults(run=run)
    return c


def _size(nbytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kdsearch.storage import list_caches, remove_cache, shared_cache_paths

    folder = Path(args.cache_dir) if args.cache_dir else shared_cache_paths(args.run_dir)[0]
    entries = list_caches(folder)
    if args.action == "list":
        if args.keys or args.all:
            raise ConfigError("kdsearch cache", "KEY and --all go with rm", " ".join(args.keys) or "--all",
                              "kdsearch cache rm KEY --yes")
        if args.json:
            sys.stdout.write(json.dumps([e.describe() for e in entries], indent=1) + "\n")
            return 0
        if not entries:
            sys.stdout.write(f"no teacher caches in {folder}\n")
            return 0
        sys.stdout.write(f"teacher caches in {folder}:\n")
        sys.stdout.write(f"{'key':<16}  {'size':>9}  {'teacher':<14} {'dataset':<12} {'images':>8} {'views':>5} "
                         f"{'top-k':>5}  {'built in':>9}  studies\n")
        for e in entries:
            d = e.describe()
            built = f"{float(d['build_time_s']):.1f} s" if d["build_time_s"] is not None else "unfinished"
            sys.stdout.write(
                f"{e.key[:16]:<16}  {_size(e.nbytes):>9}  {str(d['teacher'] or '?'):<14} {str(d['dataset'] or '?'):<12} "
                f"{str(d['num_images'] or '?'):>8} {str(d['views'] or '?'):>5} {str(d['topk'] or 'all'):>5}  "
                f"{built:>9}  {', '.join(d['studies']) or '—'}\n"
            )
        total = sum(e.nbytes for e in entries)
        sys.stdout.write(f"{len(entries)} cache(s), {_size(total)}; remove with: kdsearch cache rm KEY --yes "
                         f"(or --all --yes)\n")
        return 0
    # rm
    if args.all == bool(args.keys):
        raise ConfigError("kdsearch cache rm", "give the KEYs to remove, or --all (one of the two)", " ".join(args.keys) or None,
                          "kdsearch cache rm KEY --yes")
    chosen = entries if args.all else [_one(entries, key, folder) for key in args.keys]
    if not args.yes:
        for e in chosen:
            sys.stdout.write(f"would remove {e.key[:16]} ({_size(e.nbytes)}, used by {', '.join(e.studies) or 'no study'})\n")
        sys.stdout.write(f"{len(chosen)} cache(s); add --yes to remove them\n")
        return 0
    for e in chosen:
        remove_cache(e)
        sys.stdout.write(f"removed {e.key[:16]} ({_size(e.nbytes)}, used by {', '.join(e.studies) or 'no study'})\n")
    return 0


def _one(entries: list[Any], key: str, folder: Any) -> Any:
    """The one cache whose key starts with ``key`` (case-insensitive), or a one-line ConfigError."""
    k = key.lower()
    if len(k) < MIN_KEY_PREFIX:
        raise ConfigError("kdsearch cache rm", f"a KEY needs at least {MIN_KEY_PREFIX} hex digits", key)
    found = [e for e in entries if e.key.lower().startswith(k) or e.folder.name.lower().startswith(k)]
    if len(found) != 1:
        what = "matches no cache" if not found else f"matches {len(found)} caches"
        known = ", ".join(e.key[:16] for e in entries) or "none"
        raise ConfigError("kdsearch cache rm", f"KEY {what} in {folder}", key, f"caches: {known}")
    return found[0]
