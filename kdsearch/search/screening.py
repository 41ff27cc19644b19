"""Fixed-cost screening: end a trial in seconds when its architecture already breaks a constraint.

Before the box, in this order, each able to end the trial in seconds (the first phases of
:func:`kdsearch.search.objective.run_trial`):

1. **Fixed costs** (:func:`measure_fixed_costs`): everything that depends on the architecture
   only (params, MACs, size, activation peak, latency at every batch size and device, inference
   memory and energy) is measured once, on the untrained student in the layout training will
   give it, under the same ``measure.max_time`` budget. A constraint on any of them that is
   broken ends the trial as PRUNED with ``screened: true``, ``screen_reason``, its values and its
   violations set with ``trial.set_constraint`` (0.0 for constraints that need training), so TPE
   and NSGA-II learn from it as from any infeasible trial (:func:`screen_out`). These figures are
   not measured again after KD: a trained student runs the same kernels as the untrained one of
   the same architecture (each method record says ``"measured_on": "untrained student, before KD"``).
2. **Memory probe** (CUDA only, :func:`memory_probe`): :data:`PROBE_STEPS` real training steps
   (``distill(max_steps=...)``) of a copy of the student at the trial's batch and resolution,
   teacher targets included, give ``probe_peak_memory_mb`` (the allocator peak above the same
   baseline as ``peak_kd_memory_mb``). Over the ``peak_kd_memory_mb`` constraint, or out of
   memory, the trial ends infeasible (PRUNED, ``screened: true``) with the reason. On the CPU the
   probe is skipped and the figure is missing with the reason.

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

import copy
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

import optuna
import torch

from kdsearch import trial_record as tr
from kdsearch.config import StudyConfig
from kdsearch.distill import KDHyper, distill
from kdsearch.measure import KDMemoryTracker, Measurements, measure_inference
from kdsearch.metrics import is_fixed_cost
from kdsearch.models.spec import StudentSpec
from kdsearch.search.worker_setup import PreparedTeacher, WorkerContext, free_device_memory
from kdsearch.trial_record import constraint_verdict

__all__ = [
    "PROBE_STEPS",
    "UNTRAINED_NOTE",
    "ScreenResult",
    "known_verdict",
    "measure_fixed_costs",
    "memory_probe",
    "fixed_cost_screen",
    "screen_fixed_costs",
    "screen_out",
]

PROBE_STEPS = 3
"""Training steps of the fail-fast memory probe (CUDA only)."""
UNTRAINED_NOTE = "untrained student, before KD"
"""``measured_on`` of every fixed-cost figure: latency and size do not depend on the weights."""


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


def measure_fixed_costs(ctx: WorkerContext, student: torch.nn.Module, resolution: int) -> Measurements:
    """Every architecture-only figure of the untrained ``student``, in the memory layout the
    training loop gives it (channels-last on CUDA when ``distill.channels_last``), under the
    ``measure.max_time`` budget; the student goes back to the CPU afterwards, so the KD memory
    baseline is what it was."""
    cfg, device = ctx.cfg, ctx.device
    student.to(device)
    if device.type == "cuda" and cfg.distill.channels_last:
        student.to(memory_format=torch.channels_last)
    fixed = measure_inference(student, resolution, device, cfg.measure, budget_s=cfg.measure.budget_s(cfg.study.grace_s))
    for name in list(fixed.values):
        fixed.methods[name] = {**fixed.methods.get(name, {}), "measured_on": UNTRAINED_NOTE}
    student.to("cpu")
    free_device_memory(device)
    return fixed


def known_verdict(cfg: StudyConfig, m: Measurements) -> tr.Verdict:
    """The verdict of a trial that ends before its final check: value - limit for each fixed
    cost measured; a fixed cost that could not be measured is infeasible (as in the final check:
    it will not be measured later), with its reason; 0.0 ("not known to be violated") for a
    constraint that needs training."""
    return constraint_verdict(cfg.constraints, m.values, m.missing, [n for n in cfg.constraints if is_fixed_cost(n)])


def fixed_cost_screen(cfg: StudyConfig, fixed: Measurements) -> tuple[dict[str, float], str] | None:
    """``(violations, reason)`` when the fixed costs already break a constraint, else None."""
    screen = screen_fixed_costs(fixed.values, cfg.constraints, [m for m in cfg.constraints if is_fixed_cost(m)])
    if screen.feasible_so_far:
        return None
    known = known_verdict(cfg, fixed)
    return dict(known.violations), known.reason


def memory_probe(
    ctx: WorkerContext, student: torch.nn.Module, spec: StudentSpec, teacher: PreparedTeacher, hyper: KDHyper,
    seed: int, fixed: Measurements,
) -> tuple[dict[str, float], str] | None:
    """Run :data:`PROBE_STEPS` KD steps of a copy of ``student`` (CUDA only) and set
    ``probe_peak_memory_mb`` in ``fixed``. Returns ``(violations, reason)`` when the probe ran out
    of memory or its peak is over the ``peak_kd_memory_mb`` limit, else None."""
    cfg, device = ctx.cfg, ctx.device
    how = {"method": f"{PROBE_STEPS} KD training steps of a copy of the untrained student before the box",
           "steps": PROBE_STEPS, "batch_size": cfg.distill.batch_size, "resolution": spec.resolution,
           "train_dtype": ctx.train_dtype}
    tracker = KDMemoryTracker(device)
    if not tracker.available:  # no allocator counters: the CPU
        fixed.set_missing("probe_peak_memory_mb", f"the memory probe runs on CUDA only; this worker runs on {device.type}",
                          {**how, "method": "skipped"})
        return None
    probe = copy.deepcopy(student)
    oom: str | None = None
    try:
        with tracker:
            distill(
                probe, train=ctx.train_source, val=ctx.bundle.val, bundle=ctx.bundle, teacher_source=teacher.source,
                hyper=hyper, cfg=cfg.distill, time_box_s=cfg.study.trial_time_s, resolution=spec.resolution,
                device=device, seed=seed, view_spec=ctx.view_spec, eval_batch_size=cfg.measure.eval_batch_size,
                meters=(tracker,), train_dtype=ctx.train_dtype, max_steps=PROBE_STEPS,
            )
    except torch.OutOfMemoryError as exc:
        oom = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
    finally:
        del probe
        free_device_memory(device)
    if tracker.value_mb is not None:
        fixed.set("probe_peak_memory_mb", tracker.value_mb, {**how, **tracker.method()})
    else:
        fixed.set_missing("probe_peak_memory_mb", oom or str(tracker.reason or "not measured"),
                          {**how, **tracker.method()})
    limit = cfg.constraints.get("peak_kd_memory_mb")
    probe_mb = fixed.values.get("probe_peak_memory_mb")
    if oom:
        reason = f"out of memory in the {PROBE_STEPS}-step memory probe: {oom}"
    elif limit is not None and probe_mb is not None and probe_mb > limit:
        reason = f"probe_peak_memory_mb={probe_mb:.4g} > peak_kd_memory_mb limit {limit:.4g}"
    else:
        return None
    known = known_verdict(cfg, fixed)
    violations = dict(known.violations)
    if limit is not None:
        violations["peak_kd_memory_mb"] = tr.INFEASIBLE if probe_mb is None else float(probe_mb) - float(limit)
    return violations, "; ".join([reason, *known.reasons])


def screen_out(
    trial: optuna.Trial, cfg: StudyConfig, fixed: Measurements, violations: dict[str, float], reason: str
) -> None:
    """End the trial before the box: store what was measured and the violations, and raise
    :class:`optuna.TrialPruned` (told PRUNED, infeasible; the sampler learns from its constraints)."""
    tr.write(trial, fixed.to_user_attrs())
    for metric, violation in violations.items():
        trial.set_constraint(metric, violation)
    # The objectives it has (fixed costs); the rest (accuracy, ...) needs training: None.
    tr.write(trial, tr.screened_attrs(violations, reason, {n: fixed.values.get(n) for n in cfg.metric_names}))
    raise optuna.TrialPruned(f"screened before training: {reason}")
