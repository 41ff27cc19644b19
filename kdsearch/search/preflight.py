"""Checks that run before a study is created or touched, so bad input writes nothing.

Everything a worker would trip over during preparation (a missing data folder, a teacher name
timm does not know, a checkpoint that does not fit) is found here first,
in the supervisor, and reported as one line with exit code 2.
"""

from __future__ import annotations

import torch

from kdsearch.config import Space, StudyConfig
from kdsearch.data import load_data
from kdsearch.distill.cache_size import check_caches_fit
from kdsearch.models import create_teacher, get_family

__all__ = ["preflight"]


def preflight(cfg: StudyConfig) -> int:
    """Run each listed student family's preflight check, then validate the data and teachers;
    return the data set's class count. Storage is checked when the study is opened, which writes
    nothing until the URL has opened."""
    resolutions = _int_values(cfg.student.resolution)
    for name in cfg.student.families:
        # e.g. a ViT needs a patch size that divides every resolution the study can propose
        get_family(name).preflight(cfg.student.section(name), resolutions)
    bundle = load_data(cfg.data)
    check_caches_fit([t.cache for t in cfg.teachers if t.mode == "cached"], len(bundle.train), bundle.num_classes)
    for tcfg in cfg.teachers:
        # Builds the model on the CPU: catches unknown names, bad kwargs and checkpoints that do
        # not fit. The weights are dropped at once; workers build their own on their device.
        teacher = create_teacher(tcfg, bundle.num_classes, torch.device("cpu"))
        del teacher
    return bundle.num_classes


def _int_values(space: Space) -> list[int]:
    if space.choices is not None:
        return [int(v) for v in space.choices]
    step = int(space.step or 1)
    return list(range(int(space.low), int(space.high) + 1, step))  # type: ignore[arg-type]
