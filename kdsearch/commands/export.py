"""``kdsearch export``: ship a trial's student as safetensors, TorchScript or ONNX, with its card."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from kdsearch.commands.arguments import add_storage_args, integer

__all__ = ["add_parser", "run"]

FORMAT_CHOICES = ["safetensors", "torchscript", "onnx"]  # kdsearch.export.FORMATS, without importing torch


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    e = subparsers.add_parser("export", help="export a trial's student (safetensors, torchscript, onnx)")
    add_storage_args(e)
    e.add_argument("--trial", type=integer("--trial"), help="trial number")
    e.add_argument("--pick", help='selection rule, e.g. "max val_accuracy where latency_ms_b1 <= 2"')
    e.add_argument("--format", choices=FORMAT_CHOICES, default="safetensors")
    e.add_argument("--out", required=True, help="output folder")
    e.set_defaults(run=run)
    return e


def run(args: argparse.Namespace) -> int:
    from kdsearch.commands.arguments import artifact_dir, storage_url
    from kdsearch.commands.output import stdout_console
    from kdsearch.errors import ConfigError
    from kdsearch.export import export_trial
    from kdsearch.storage import check_study_name

    check_study_name(args.study_name)
    if (args.trial is None) == (args.pick is None):
        raise ConfigError("--trial/--pick", "give exactly one of --trial K or --pick RULE", None)
    result = export_trial(
        storage_url=storage_url(args),
        study_name=args.study_name,
        trial_number=args.trial,
        pick=args.pick,
        out_dir=Path(args.out),
        fmt=args.format,
        artifact_dir=artifact_dir(args),
    )
    console = stdout_console()
    console.print(f"exported trial {result.trial_number} as {args.format} to {result.out_dir}", highlight=False)
    for name, sha in result.files.items():
        console.print(f"  {name}  sha256 {sha}", highlight=False)
    if result.max_abs_diff is not None:
        console.print(f"  verified: max |diff| vs PyTorch = {result.max_abs_diff:.3g}", highlight=False)
    return 0
