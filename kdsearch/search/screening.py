"""Fixed-cost screening: end a trial in seconds when its architecture already breaks a constraint.

Params, MACs, model size, activation peak and latency depend on the architecture only, so they
are measured on the untrained student before the KD box starts. A constraint on any of them that
is broken is known then; training the student would only spend the box to confirm it.

A constraint is an upper limit (``value <= limit``), stored as ``value - limit`` (<= 0 is
feasible), as :func:`optuna.trial.Trial.set_constraint` expects. A screened-out trial stores the
violations it measured and 0.0 ("not known to be violated") for the constraints that need
training (accuracy, KD memory, ...); it ends infeasible, and TPE and NSGA-II learn from it as
from any infeasible trial (Optuna ranks infeasible trials by their total violation, after every
feasible one).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from kdsearch.trial_record import constraint_verdict

__all__ = ["ScreenResult", "screen_fixed_costs"]


@dataclass(frozen=True)
class ScreenResult:
    """The verdict of the fixed costs on the study's constraints.

    ``violations``: metric -> ``value - limit`` for each constraint checked now (> 0 is broken).
    ``violated``: the broken ones, in the constraints' order. ``unchecked``: metric -> why it is
    not checked before training (it needs training, or the fixed measurement is missing; a
    missing fixed cost is left to the final check, which stores it as infeasible with its reason).
    """

    violations: dict[str, float] = field(default_factory=dict)
    violated: tuple[str, ...] = ()
    unchecked: dict[str, str] = field(default_factory=dict)
    reasons: tuple[str, ...] = ()

    @property
    def feasible_so_far(self) -> bool:
        """No constraint checked before training is broken."""
        return not self.violated

    def reason(self, limits: Mapping[str, float] | None = None) -> str:
        """One line for the trial: ``params=1.2e+05 > 1e+05; macs=...`` (the verdict's phrases,
        :func:`kdsearch.trial_record.constraint_verdict`)."""
        return "; ".join(self.reasons)

    def constraint_values(self, names: Collection[str]) -> dict[str, float]:
        """``set_constraint`` values for ``names``: the measured violation, else 0.0 (not known)."""
        return {m: float(self.violations.get(m, 0.0)) for m in names}


def screen_fixed_costs(
    measured: Mapping[str, float | None],
    constraints: Mapping[str, float],
    fixed_metrics: Collection[str],
) -> ScreenResult:
    """Check every constraint whose metric is a fixed cost against its value in ``measured``.

    ``measured``: metric -> value measured on the untrained student (None = could not be
    measured). ``constraints``: metric -> upper limit, in the metric's unit. ``fixed_metrics``:
    the metric names that depend on the architecture only (the metric registry knows them).
    """
    unchecked: dict[str, str] = {}
    for metric in constraints:
        value = measured.get(metric)
        if metric not in fixed_metrics:
            unchecked[metric] = "needs training"
        elif value is None or not math.isfinite(float(value)):
            unchecked[metric] = "not measured before training"
    checked = [m for m in constraints if m not in unchecked]
    verdict = constraint_verdict(constraints, measured, {}, checked)
    violations = {m: verdict.violations[m] for m in checked}
    violated = tuple(m for m in checked if violations[m] > 0)
    return ScreenResult(violations, violated, unchecked, verdict.reasons)
