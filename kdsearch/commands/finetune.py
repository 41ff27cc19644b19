"""``kdsearch finetune``: fine-tune the head of an exported (distilled) student on local data, features frozen."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from kdsearch.commands import COMMAND_HELP
from kdsearch.commands.arguments import integer, positive_int

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    f = subparsers.add_parser("finetune", help=COMMAND_HELP["finetune"])
    f.add_argument("--checkpoint", required=True, help="an exported student folder")
    f.add_argument("--data", required=True, help="imagefolder:PATH, digits or synthetic")
    f.add_argument("--out", required=True, help="output folder for the fine-tuned student")
    f.add_argument("--epochs", type=positive_int("--epochs"), default=15)
    f.add_argument("--lr", type=float, default=1e-3)
    f.add_argument("--batch-size", type=positive_int("--batch-size"), default=128)
    f.add_argument("--holdout-fraction", type=float, default=0.2)
    f.add_argument("--unfreeze-last-block", action="store_true")
    f.add_argument("--seed", type=integer("--seed"), default=0)
    f.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    f.set_defaults(run=run)
    return f


def run(args: argparse.Namespace) -> int:
    import torch

    from kdsearch.commands.output import stdout_console
    from kdsearch.finetune import finetune_checkpoint

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    res = finetune_checkpoint(
        checkpoint_dir=Path(args.checkpoint), data_spec=args.data, out_dir=Path(args.out),
        epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, holdout_fraction=args.holdout_fraction,
        unfreeze_last_block=args.unfreeze_last_block, seed=args.seed, device=device,
    )
    stdout_console().print(
        f"fine-tuned {args.checkpoint} for {args.epochs} epochs: held-out accuracy "
        f"{100 * res.pre_accuracy:.2f}% -> {100 * res.post_accuracy:.2f}%; wrote {res.out_dir}",
        highlight=False,
    )
    return 0
