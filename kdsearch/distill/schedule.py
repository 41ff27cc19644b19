"""The learning-rate schedule of a time-boxed run, as a function of elapsed time over the box.

Because the schedule reads ``elapsed_s / box_s`` rather than a step or epoch count, every box
length gets a complete schedule: linear warm-up, then cosine decay to ``final_lr_fraction``.
Used by the distillation loop and by teacher fitting (one function, not two copies).
"""

from __future__ import annotations

import math

__all__ = ["lr_factor"]


def lr_factor(progress: float, warmup_fraction: float, final_lr_fraction: float = 0.0) -> float:
    """Multiplier on the peak LR at ``progress = elapsed / box`` (clamped to [0, 1]).

    Linear warm-up from 0 to 1 over ``[0, warmup_fraction]``, then a half cosine from 1 down to
    ``final_lr_fraction`` over ``[warmup_fraction, 1]``. The first optimiser step happens after
    some time has elapsed, so it never runs at LR 0.
    """
    p = min(max(progress, 0.0), 1.0)
    if warmup_fraction > 0 and p < warmup_fraction:
        return p / warmup_fraction
    span = 1.0 - warmup_fraction
    q = (p - warmup_fraction) / span if span > 0 else 1.0
    return final_lr_fraction + (1.0 - final_lr_fraction) * 0.5 * (1.0 + math.cos(math.pi * q))
