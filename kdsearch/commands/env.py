"""``kdsearch env``: versions, devices and NVML status, and why torch has no usable GPU when it
has none (:func:`kdsearch.measure.device.diagnose_no_cuda`), for bug reports."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from kdsearch.commands import COMMAND_HELP

__all__ = ["add_parser", "run", "flatten"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    v = subparsers.add_parser("env", help=COMMAND_HELP["env"])
    v.add_argument("--json", action="store_true")
    v.set_defaults(run=run)
    return v


def flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested dicts as ``("a.b.c", value)`` pairs, in order."""
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.extend(flatten(v, key + "."))
        else:
            out.append((key, v))
    return out


def run(args: argparse.Namespace) -> int:
    import torch
    from rich.table import Table

    from kdsearch._version import __version__
    from kdsearch.commands.output import stdout_console
    from kdsearch.measure import collect_environment
    from kdsearch.measure.device import collect_cuda_facts, cuda_usable, diagnose_no_cuda

    facts = collect_cuda_facts()
    usable = cuda_usable(facts)
    device = torch.device("cuda", 0) if usable else torch.device("cpu")
    env = collect_environment(device)
    # Why torch has no usable GPU (the same diagnosis `optimize` gives), with what it is based on.
    env["cuda_usable"] = usable
    env["cuda_diagnosis"] = diagnose_no_cuda(facts)
    env["torch_arch_list"] = " ".join(facts.arch_list) or None
    env["driver_cuda"] = f"{facts.driver_cuda[0]}.{facts.driver_cuda[1]}" if facts.driver_cuda else None
    env["nvml_devices"] = [f"{name} ({cap[0]}.{cap[1]})" for name, cap in facts.devices]
    if args.json:
        sys.stdout.write(json.dumps(env, indent=1, default=str) + "\n")
        return 0
    table = Table(title=f"kdsearch {__version__} environment", show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value")
    for key, value in flatten(env):
        table.add_row(key, str(value))
    console = stdout_console()
    console.print(table)
    if env["cuda_diagnosis"]:
        console.print(f"no usable GPU: {env['cuda_diagnosis']}", highlight=False, markup=False)
    return 0
