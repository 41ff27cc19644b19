"""``kdsearch export``: ship a trial's student as safetensors, TorchScript or ONNX (optionally int8), with its card."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kdsearch.commands import COMMAND_HELP
from kdsearch.commands.arguments import add_storage_args, integer, positive_int
from kdsearch.constants import (
    CALIBRATION_METHODS,
    DEFAULT_CALIBRATION_IMAGES,
    DEFAULT_MAX_INT8_DROP,
    EXPORT_FORMATS,
    QUANTIZE_CHOICES,
)
from kdsearch.errors import ConfigError

__all__ = ["add_parser", "run"]


def fraction(flag: str) -> Callable[[str], float]:
    """An argparse ``type``: a finite number (a fraction, 0.02 = 2 points), or a ConfigError."""

    def conv(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise ConfigError(flag, "must be a number (a fraction: 0.02 = 2 points)", text) from None
        if not math.isfinite(v):
            raise ConfigError(flag, "must be a finite number (a fraction: 0.02 = 2 points)", text)
        return v

    return conv


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    e = subparsers.add_parser("export", help=COMMAND_HELP["export"])
    add_storage_args(e)
    e.add_argument("--trial", type=integer("--trial"), help="trial number (default: the report's default pick)")
    e.add_argument("--pick", help='selection rule, e.g. "max val_accuracy where latency_ms_b1 <= 2" '
                   "(default: the report's default pick)")
    e.add_argument("--format", choices=EXPORT_FORMATS, default="safetensors")
    e.add_argument("--out", required=True, help="output folder")
    q = e.add_argument_group("int8 (with --format onnx)")
    q.add_argument(
        "--quantize", choices=QUANTIZE_CHOICES,
        help="also write model.int8.onnx: ONNX Runtime static quantization (QDQ, per-channel weights), "
        "calibrated on the study's training split; its val/test accuracy, CPU latency and top-1 agreement "
        "with fp32 go into the card",
    )
    q.add_argument(
        "--max-int8-drop", type=fraction("--max-int8-drop"), default=DEFAULT_MAX_INT8_DROP, metavar="FRACTION",
        help=f"warn (card and console) when int8 val accuracy drops by more than this (default "
        f"{DEFAULT_MAX_INT8_DROP}: 2 points); the model is written either way",
    )
    q.add_argument(
        "--calibration-images", type=positive_int("--calibration-images"), default=DEFAULT_CALIBRATION_IMAGES,
        metavar="N", help=f"training images to calibrate on (default {DEFAULT_CALIBRATION_IMAGES})",
    )
    q.add_argument(
        "--calibration-method", choices=CALIBRATION_METHODS, default="minmax",
        help="onnxruntime calibration method (default minmax)",
    )
    q.add_argument("--data-root", help="where the study's data lives now, if it has moved (overrides data.root)")
    e.set_defaults(run=run)
    return e


def run(args: argparse.Namespace) -> int:
    if args.quantize is not None and args.format != "onnx":
        raise ConfigError("--quantize", "needs --format onnx (ONNX Runtime quantizes the ONNX model)", args.format,
                          "add --format onnx")
    from kdsearch.commands.arguments import artifact_dir, storage_url
    from kdsearch.commands.output import stdout_console
    from kdsearch.export import export_trial
    from kdsearch.export.quantize import QuantizeSettings
    from kdsearch.storage import check_study_name

    check_study_name(args.study_name)
    if args.trial is not None and args.pick is not None:
        raise ConfigError("--trial/--pick", "give exactly one of --trial K or --pick RULE, or neither for the report's default pick", None)
    console = stdout_console()
    pick = args.pick
    if args.trial is None and pick is None:
        # The student the report's "At a glance" names as the default export.
        from kdsearch.export.pick import default_pick_rule
        from kdsearch.storage import load_study

        pick = default_pick_rule(load_study(storage_url(args), args.study_name, args.run_dir))
        console.print(f"no --trial or --pick: the report's default pick, --pick {pick!r}", highlight=False)
    settings = QuantizeSettings(args.calibration_method, args.calibration_images, args.max_int8_drop)
    result = export_trial(
        storage_url=storage_url(args),
        study_name=args.study_name,
        trial_number=args.trial,
        pick=pick,
        out_dir=Path(args.out),
        fmt=args.format,
        artifact_dir=artifact_dir(args),
        quantize=args.quantize,
        quantize_settings=settings,
        data_root=args.data_root,
        run_dir=args.run_dir,
    )
    what = args.format + (f" + {args.quantize}" if args.quantize else "")
    how = f" (picked by --pick {pick!r})" if pick is not None else ""
    console.print(f"exported trial {result.trial_number}{how} as {what} to {result.out_dir}", highlight=False)
    for name, sha in result.files.items():
        console.print(f"  {name}  sha256 {sha}", highlight=False)
    if result.max_abs_diff is not None:
        console.print(f"  verified: max |diff| vs PyTorch = {result.max_abs_diff:.3g}", highlight=False)
    q = result.quantization
    if q is not None:
        acc, lat = q["accuracy"], q["latency_ms"]
        console.print(
            f"  int8: val {100 * acc['fp32']['val']:.2f}% -> {100 * acc['int8']['val']:.2f}%, "
            f"test {100 * acc['fp32']['test']:.2f}% -> {100 * acc['int8']['test']:.2f}%, "
            f"top-1 agreement {100 * q['top1_agreement']['all']:.2f}%",
            highlight=False,
        )
        console.print(
            "  int8 CPU latency (onnxruntime, "
            f"{q['latency_method']['intra_op_threads']} thread(s)): "
            + ", ".join(
                f"batch {b[1:]} {lat['fp32'][b]:.4g} -> {lat['int8'][b]:.4g} ms ({lat['speedup'][b]:.2f}x)"
                for b in lat["fp32"]
            ),
            highlight=False,
        )
        if q.get("warning"):
            print(f"warning: {q['warning']}", file=sys.stderr, flush=True)
    return 0
