"""Checks that run before a study is created or touched, so bad input writes nothing.

Everything a worker would trip over during preparation (a missing data folder, a teacher name
timm does not know, a checkpoint that does not fit) is found here first,
in the supervisor, and reported as one line with exit code 2.
"""

from __future__ import annotations

import torch

from kdsearch.config import StudyConfig
from kdsearch.data import load_data
from kdsearch.models import create_teacher

__all__ = ["preflight"]


def preflight(cfg: StudyConfig) -> int:
    """Validate data and teachers; return the data set's class count. Storage is checked when
    the study is opened, which writes nothing until the URL has opened."""
    bundle = load_data(cfg.data)
    for tcfg in cfg.teachers:
        # Builds the model on the CPU: catches unknown names, bad kwargs and checkpoints that do
        # not fit. The weights are dropped at once; workers build their own on their device.
        teacher = create_teacher(tcfg, bundle.num_classes, torch.device("cpu"))
        del teacher
    return bundle.num_classes
