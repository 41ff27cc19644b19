"""``kdsearch studies``: the study files shipped with kdsearch, one line each; ``kdsearch studies
show NAME`` prints one, to copy and edit (``kdsearch studies show smoke > my-study.yaml``).

Any of these names works as ``kdsearch optimize --config NAME`` from any folder.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from kdsearch.commands import COMMAND_HELP

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    s = subparsers.add_parser(
        "studies",
        help=COMMAND_HELP["studies"],
        description="List the study files shipped with kdsearch (each usable as optimize --config NAME), "
        "or print one to copy and edit.",
    )
    actions = s.add_subparsers(dest="studies_action", metavar="{list,show}")
    actions.add_parser("list", help="one line per bundled study (the default)")
    show = actions.add_parser("show", help="print a bundled study file")
    show.add_argument("name", help="a bundled study's name, e.g. smoke or paper/table1-arch")
    s.set_defaults(run=run)
    return s


def run(args: argparse.Namespace) -> int:
    from kdsearch.config.loader import bundled_studies, bundled_study, study_description

    if getattr(args, "studies_action", None) == "show":
        sys.stdout.write(bundled_study(args.name).read_text(encoding="utf-8"))
        return 0
    studies = bundled_studies()
    if not studies:
        sys.stdout.write("no bundled studies (this kdsearch was installed without its study files)\n")
        return 0
    width = max(len(n) for n in studies)
    for name, resource in studies.items():
        sys.stdout.write(f"{name:<{width}}  {study_description(resource.read_text(encoding='utf-8'))}\n")
    sys.stdout.write("\nrun one: kdsearch optimize --config NAME; copy one: kdsearch studies show NAME > my-study.yaml\n")
    return 0
