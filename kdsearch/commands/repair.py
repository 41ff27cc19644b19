"""``kdsearch repair``: cut a study's journal file at its first torn record, after a backup.

A journal append cut short (a full disk under an older kdsearch, or a process killed in the middle
of a line) leaves a broken record; once another record follows it, Optuna cannot read the journal
and every command refuses the study with the file and the byte offset
(:class:`kdsearch.storage_faults.TornJournalError`). This command finds that record and, with
``--yes``, copies the journal to ``journal.log.torn-<time>`` and cuts it there
(:func:`kdsearch.storage_faults.repair_journal`). Without ``--yes`` it only says what it would do.
Stop ``kdsearch optimize`` on the study first. Database storages have no such records.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from kdsearch.commands import COMMAND_HELP
from kdsearch.constants import DEFAULT_RUN_DIR
from kdsearch.errors import ConfigError

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "repair",
        help=COMMAND_HELP["repair"],
        description="Cut a study's journal file at its first torn record (a write cut short by a full "
                    "disk or a crash), after copying it to journal.log.torn-<time>.",
    )
    p.add_argument("--study-name", help="the study whose journal to repair (in --run-dir)")
    p.add_argument("--storage", help="the journal file (journal:PATH or PATH), instead of --study-name")
    p.add_argument("--run-dir", default=DEFAULT_RUN_DIR, help=f"run folder (default: {DEFAULT_RUN_DIR})")
    p.add_argument("--yes", action="store_true", help="really cut (without it, only say what would be cut)")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kdsearch.storage import check_study_name, default_storage_url, redact_url, repair_journal

    if args.storage:
        url = str(args.storage)
        if "://" in url or url.startswith("sqlite:"):
            raise ConfigError("--storage", "kdsearch repair works on journal files; a database has no torn records",
                              redact_url(url))
    elif args.study_name:
        check_study_name(args.study_name)
        url = default_storage_url(args.run_dir, args.study_name)
    else:
        raise ConfigError("kdsearch repair", "needs --study-name (with --run-dir) or --storage", None,
                          "kdsearch repair --study-name NAME --yes")
    path = Path(url.removeprefix("journal:"))
    if not path.is_file():
        raise ConfigError("--storage" if args.storage else "--study-name", "no journal file there", str(path))
    r = repair_journal(path, apply=args.yes)
    if r.offset is None:
        sys.stdout.write(f"{path}: every record is whole; nothing to repair\n")
    elif r.backup is None:
        sys.stdout.write(f"{path}: torn record at byte {r.offset} (line {r.line}); would cut {r.dropped_bytes} "
                         "bytes from there, after a backup (add --yes)\n")
    else:
        sys.stdout.write(f"{path}: cut at byte {r.offset} (line {r.line}), {r.dropped_bytes} bytes dropped; "
                         f"the journal as it was: {r.backup}\n")
    return 0
