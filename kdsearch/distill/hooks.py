"""What :func:`kdsearch.distill.distill` calls back, and the hooks kdsearch ships.

Two hooks, both plain callables (no callback framework):

* ``on_eval(train_s, fraction, val_accuracy) -> stop?`` (:data:`EvalHook`) is called after every
  in-loop validation, the final one included, while the training clock is paused: its own cost is
  never training time. After a plateau stop the rules see nothing more: the final evaluation that
  follows the cool-down is taken at no point of the box's schedule (a rung inside the cool-down
  was never evaluated), so no rule may score it. ``train_s`` is the training time used so far (s), ``fraction`` is
  ``train_s / time_box_s`` (it can exceed 1 by one step at the final evaluation) and
  ``val_accuracy`` is top-1 on the validation split in [0, 1]. Returning True asks the loop to
  stop; a request at the final evaluation changes nothing. A stopping rule is an ``EvalHook``:
  :class:`PlateauStop` here; rules that need the whole study (pruning at rungs) live in
  ``kdsearch.search`` and are passed in by the objective. Combine them with :func:`any_stop`.
* ``on_step(step, loss) -> loss`` (:data:`StepHook`) is called at every training step after the
  loss is computed and before the backward pass; ``step`` counts from 1. It runs inside the timed
  step, so it must be cheap. It may raise (the exception leaves :func:`distill` as it would from
  the step itself) or return a different loss to back-propagate. :class:`FaultInjector` is one:
  the test-only fault injection of ``debug.inject``.

And one kind of observer: a :class:`TrainingMeter` (``pause()`` / ``resume()``) follows the
training clock. ``distill`` pauses every meter on entry (its set-up is not training), resumes it
when the training clock starts, pauses it when the clock stops for a validation and resumes it
when training restarts, so a meter opened around the call (the KD memory peak, the KD energy)
measures the training steps only. The meters are started and stopped by the caller.

A plateau stop (``distill.early_stop``: :class:`PlateauStop`) while box time is left is not a
hard cut: the loop cools the learning rate down linearly to its final value over
``distill.early_stop.cooldown_fraction`` of the box (or what is left of it), then runs the final
evaluation, so the stored accuracy is that of an annealed model. A stop asked by the caller's
``on_eval`` (a pruning rule, whose trial is abandoned) ends the loop at once. :class:`PlateauStop`
counts its patience in evaluations; the config refuses a patience the box's evaluations cannot
reach (``EarlyStopConfig``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from kdsearch.config import EarlyStopConfig

__all__ = [
    "EvalHook",
    "StepHook",
    "TrainingMeter",
    "FAULTS",
    "INJECT_STEP",
    "FaultInjector",
    "PlateauStop",
    "any_stop",
    "never_stop",
    "plain_step",
]

EvalHook = Callable[[float, float, float], bool]
"""``(train_s, fraction_of_box, val_accuracy) -> stop?``; see the module docstring."""

StepHook = Callable[[int, torch.Tensor], torch.Tensor]
"""``(step, loss) -> loss``; see the module docstring."""



class TrainingMeter(Protocol):
    """Follows the training clock of :func:`kdsearch.distill.distill` (see the module docstring):
    :class:`kdsearch.measure.KDMemoryTracker` and :class:`kdsearch.measure.EnergyMeter` are two."""

    def pause(self) -> None: ...

    def resume(self) -> None: ...


INJECT_STEP = 3  # FaultInjector fires at this (1-based) training step by default
FAULTS = ("nan", "oom", "hang", "error")


def never_stop(train_s: float, fraction: float, val_accuracy: float) -> bool:
    """The :data:`EvalHook` that never asks to stop (``distill``'s default)."""
    return False


def plain_step(step: int, loss: torch.Tensor) -> torch.Tensor:
    """The :data:`StepHook` that leaves the loss as it is (``distill``'s default)."""
    return loss


def any_stop(*hooks: EvalHook | None) -> EvalHook:
    """One :data:`EvalHook` that stops when any of ``hooks`` asks to (``None`` entries are skipped).

    Every hook sees every evaluation, also after an earlier one has asked to stop, so stateful
    rules (a plateau count, a rung report) never miss a value.
    """
    active = tuple(h for h in hooks if h is not None)
    if not active:
        return never_stop
    if len(active) == 1:
        return active[0]

    def combined(train_s: float, fraction: float, val_accuracy: float) -> bool:
        votes = [h(train_s, fraction, val_accuracy) for h in active]
        return any(votes)

    return combined


class PlateauStop:
    """Stop after ``patience`` evaluations in a row that do not beat the reference accuracy by
    more than ``min_delta`` (an accuracy, as a fraction). The reference is the last accuracy that
    did; the first evaluation always sets it. ``distill.early_stop`` in the study file.
    """

    def __init__(self, *, patience: int, min_delta: float) -> None:
        if patience < 1:
            raise ValueError(f"patience must be >= 1 evaluation, got {patience}")
        if not math.isfinite(min_delta) or min_delta < 0:
            raise ValueError(f"min_delta must be a finite accuracy >= 0, got {min_delta}")
        self.patience = patience
        self.min_delta = min_delta
        self.reference = -math.inf
        self.evals_without_gain = 0

    @classmethod
    def from_config(cls, cfg: EarlyStopConfig) -> PlateauStop | None:
        """The rule ``distill.early_stop`` asks for, or None when it is disabled."""
        return cls(patience=cfg.patience, min_delta=cfg.min_delta) if cfg.enabled else None

    def __call__(self, train_s: float, fraction: float, val_accuracy: float) -> bool:
        if val_accuracy > self.reference + self.min_delta:
            self.reference, self.evals_without_gain = val_accuracy, 0
        else:
            self.evals_without_gain += 1
        return self.evals_without_gain >= self.patience


class FaultInjector:
    """Test-only fault at training step ``step`` (``debug.inject``), a :data:`StepHook`.

    ``nan`` turns the loss into NaN (the loop then fails the trial as ``diverged``); ``oom``
    raises ``torch.OutOfMemoryError``; ``error`` raises ``RuntimeError``; ``hang`` sleeps until a
    supervisor kills the process (the trial ends as ``timeout``).
    """

    def __init__(self, fault: str, *, step: int = INJECT_STEP) -> None:
        if fault not in FAULTS:
            raise ValueError(f"fault must be one of {', '.join(FAULTS)}, got {fault!r}")
        if step < 1:
            raise ValueError(f"step must be >= 1 (steps count from 1), got {step}")
        self.fault = fault
        self.step = step

    def __call__(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        if step != self.step:
            return loss
        if self.fault == "nan":
            return loss * float("nan")
        if self.fault == "oom":
            raise torch.cuda.OutOfMemoryError("injected")
        if self.fault == "error":
            raise RuntimeError("injected error")
        while True:  # hang: only a supervisor's kill ends this
            time.sleep(1.0)
