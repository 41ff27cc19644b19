"""Tiny real models for the measure tests (independent of kdsearch.models)."""

from __future__ import annotations

import random
import time

import torch
from torch import nn


def tiny_vgg(num_classes: int = 10) -> nn.Sequential:
    """2-conv VGG-like net for 16x16 inputs: conv-bn-relu-pool x2, flatten, linear."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, num_classes),
    )


def small_cnn(width: int = 16, num_classes: int = 10) -> nn.Sequential:
    """A VGG-ish CNN that works at any resolution (global pool before the head)."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, num_classes),
    )


class SleepNet(nn.Module):
    """A module of known cost: each forward sleeps ``ms`` milliseconds (plus optional jitter).

    Records the torch thread count and train/eval mode it saw, to check what the timer sets.
    """

    def __init__(self, ms: float = 5.0, jitter_ms: float = 0.0, seed: int = 0) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.ms = ms
        self.jitter_ms = jitter_ms
        self.rng = random.Random(seed)
        self.threads_seen: set[int] = set()
        self.training_seen: set[bool] = set()
        self.grad_seen: set[bool] = set()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.threads_seen.add(torch.get_num_threads())
        self.training_seen.add(self.training)
        self.grad_seen.add(torch.is_grad_enabled())
        delay = self.ms + (self.rng.uniform(-self.jitter_ms, self.jitter_ms) if self.jitter_ms else 0.0)
        time.sleep(max(0.0, delay) / 1e3)
        return x
