"""The trial record: the user-attribute keys a search stores and the reports read, and the rules
that write them.

This module is the contract between ``search/`` (the writer) and ``report/``, ``export/``,
``progress`` and the commands (the readers): every key is a constant here, and nobody else spells
one as a string. The metric figures themselves (``val_accuracy``, ``macs``, ...) are user attrs
too, named by the metric registry (:mod:`kdsearch.metrics`), with ``methods`` and
``missing_metrics`` beside them.

The rules, each written once:

* a **failure record** (:func:`failure_attrs`): ``fail_reason`` and ``fail_detail``, the detail
  cut at :data:`FAIL_DETAIL_MAX_CHARS`, wherever the failure is stored (the objective, the worker,
  the stale-trial recovery);
* a **constraint verdict** (:func:`constraint_verdict`): limits, values and the reasons of missing
  ones in, ``value - limit`` per constraint out (``<= 0`` is feasible; a missing value is
  :data:`INFEASIBLE`), with one line of reasons; :func:`verdict_attrs` stores it;
* the **screened** and **pruned** records (:func:`screened_attrs`, :func:`pruned_attrs`) of a
  trial that ended before or inside its box.

Ground floor: no kdsearch import and no Optuna, so the light commands can read it.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = [
    "AttrWriter",
    "FAIL_DETAIL_MAX_CHARS",
    "INFEASIBLE",
    "Verdict",
    "constraint_verdict",
    "failure_attrs",
    "pruned_attrs",
    "rung_key",
    "rung_records",
    "screened_attrs",
    "stored_infeasible_reason",
    "verdict_attrs",
    "write",
]

# ----------------------------------------------------------------------------------------------
# Trial keys: what the trial is (written first, as it starts)

BOX_S = "box_s"
"""The KD time box of this trial, s (the supervisor's hard limit reads it from storage)."""
SPEC = "spec"
"""The student's :class:`~kdsearch.models.spec.StudentSpec` as a flat dict."""
SIZE_BY = "size_by"
"""``{"field", "unit"}``: the spec field that sizes the student (its family's ``size_field``, e.g.
VGG ``depth`` in layers). Trials stored before it existed are sized by ``depth``."""
STUDENT = "student"
"""The student's label, e.g. ``vgg3-w0.125@32``."""
TEACHER = "teacher"
"""The teacher's display label."""
TEACHER_NAME = "teacher_name"
TEACHER_MODE = "teacher_mode"
TEMPERATURE = "temperature"
ALPHA = "alpha"
LR = "lr"
DATASET = "dataset"
DEVICE = "device"
DEVICE_INFO = "device_info"
"""The worker's device as :func:`kdsearch.measure.device.describe_worker_device` gives it (read back
by :mod:`kdsearch.device_record`)."""
TRAIN_DTYPE = "train_dtype"
GPU_SHARING = "gpu_sharing"
NORMALIZATION = "normalization"
"""The student's input normalisation: ``{"mean": [...], "std": [...]}``."""
ENV_DIFF = "env_diff"
"""How the environment at the end of the trial differs from the worker's at its start."""

# Written by the worker and the recovery
INVOCATION = "invocation"
"""The ``kdsearch optimize`` run that claimed the trial."""
WORKER = "worker"
"""``{"host", "pid", "started_at"}`` of the worker that runs the trial."""
HEARTBEAT_AT = "heartbeat_at"
"""time.time() of the last heartbeat (journal and SQLite storages)."""
RETRY_OF = "retry_of"
RETRY_COUNT = "retry_count"

# Figures beside the metric values (kdsearch.measure.Measurements.to_user_attrs)
METHODS = "methods"
"""metric -> how it was measured."""
MISSING_METRICS = "missing_metrics"
"""metric -> why it could not be measured (its value is stored as None)."""

# Outcome
FAIL_REASON = "fail_reason"
FAIL_DETAIL = "fail_detail"
CONSTRAINT_VIOLATIONS = "constraint_violations"
FEASIBLE = "feasible"
INFEASIBLE_REASON = "infeasible_reason"
SCREENED = "screened"
SCREEN_REASON = "screen_reason"
SCREENED_VALUES = "screened_values"
PRUNED_RUNG = "pruned_rung"
PRUNED_RUNG_INDEX = "pruned_rung_index"
PRUNED_RANK = "pruned_rank"
PRUNED_FRONT = "pruned_front"
PRUNE_REASON = "prune_reason"
PRUNING = "pruning"
"""The rung pruner's record of every decision (:mod:`kdsearch.search.pruning`)."""
RUNG_PREFIX = "rung_"
"""``rung_<k>``: the trial's rung vector at rung k, which the other trials' pruning reads
(:func:`rung_key`, :func:`rung_records`)."""
SAMPLER_INPUT = "sampler_input"
"""What a rung-aware sampler (:mod:`kdsearch.search.samplers`) read when it proposed this trial:
``{"mode", "complete", "pruned", "pruned_presented"}`` (counts of the finished trials it saw)."""
KD_HISTORY = "kd_history"
"""The validation curve and the loop's counts."""
ARTIFACT_ID = "artifact_id"
"""The Optuna artifact holding the student's checkpoint."""
WEIGHTS_SHA256 = "weights_sha256"
REHEARSAL = "rehearsal"
"""A rehearsed trial's replay (:mod:`kdsearch.search.rehearsal`): table, row, distance, speed, why it
has no checkpoint, and the wall time of each ``on_eval`` call of its box."""

# ----------------------------------------------------------------------------------------------
# Study keys

CONFIG = "config"
"""The study file as a plain mapping (``kdsearch.config.config_to_dict``)."""
SIGNATURE = "signature"
KDSEARCH_VERSION = "kdsearch_version"
CREATED_ON_HOST = "created_on_host"
CREATED_AT = "created_at"
TIME_SPENT_S = "time_spent_s"
ENVIRONMENT = "environment"
TEACHERS = "teachers"
"""Per teacher label: its accuracy and identity."""

class AttrWriter(Protocol):
    """What the record is written to: an ``optuna.Trial`` (or a study, for the study keys)."""

    def set_user_attr(self, key: str, value: Any) -> None: ...


def write(target: AttrWriter, attrs: Mapping[str, Any]) -> None:
    """Set every user attr of ``attrs`` on ``target``, in order."""
    for key, value in attrs.items():
        target.set_user_attr(key, value)


# ----------------------------------------------------------------------------------------------
# Failure record

FAIL_DETAIL_MAX_CHARS = 500
"""``fail_detail`` is cut here: a detail is one line for a table; the traceback is in the worker log."""


def failure_attrs(reason: str, detail: str) -> dict[str, str]:
    """The user attrs of a failed trial: ``fail_reason`` and ``fail_detail`` (cut at
    :data:`FAIL_DETAIL_MAX_CHARS`)."""
    return {FAIL_REASON: reason, FAIL_DETAIL: detail[:FAIL_DETAIL_MAX_CHARS]}


# ----------------------------------------------------------------------------------------------
# Constraint verdict

INFEASIBLE = 1e18
"""The ``set_constraint`` value of a constrained metric that could not be measured: it is
infeasible, by more than any real violation (Optuna ranks infeasible trials by total violation)."""


@dataclass(frozen=True)
class Verdict:
    """The constraints' verdict on one trial.

    ``violations``: metric -> ``value - limit`` (``<= 0`` is feasible; :data:`INFEASIBLE` for a
    missing value; 0.0 "not known to be violated" for a constraint not checked yet).
    ``reasons``: one phrase per broken or missing constraint, in the constraints' order.
    """

    violations: dict[str, float] = field(default_factory=dict)
    reasons: tuple[str, ...] = ()

    @property
    def feasible(self) -> bool:
        return not self.reasons

    @property
    def reason(self) -> str:
        """The reasons as one line: ``macs=3.3e+05 > 3e+05; latency_ms_b1 missing (...)``."""
        return "; ".join(self.reasons)


def constraint_verdict(
    limits: Mapping[str, float],
    values: Mapping[str, float | None],
    missing: Mapping[str, str],
    checked: Collection[str] | None = None,
) -> Verdict:
    """Check ``values`` against the upper ``limits``.

    ``missing``: metric -> why it could not be measured. ``checked``: the constraints decided now
    (default: all); the others get 0.0 and no reason (before the box, the ones that need training).
    A checked metric without a finite value is infeasible (:data:`INFEASIBLE`) with its reason.
    """
    violations: dict[str, float] = {}
    reasons: list[str] = []
    for metric, limit in limits.items():
        if checked is not None and metric not in checked:
            violations[metric] = 0.0
            continue
        v = values.get(metric)
        if v is None or not math.isfinite(float(v)):
            violations[metric] = INFEASIBLE
            reasons.append(f"{metric} missing ({missing.get(metric, 'not measured')})")
            continue
        violations[metric] = float(v) - float(limit)
        if violations[metric] > 0:
            reasons.append(f"{metric}={float(v):.4g} > {float(limit):.4g}")
    return Verdict(violations, tuple(reasons))


def verdict_attrs(verdict: Verdict) -> dict[str, Any]:
    """The user attrs of a verdict: ``constraint_violations``, ``feasible`` and, when infeasible,
    ``infeasible_reason``. (The violations also go to ``trial.set_constraint``.)"""
    out: dict[str, Any] = {CONSTRAINT_VIOLATIONS: dict(verdict.violations), FEASIBLE: verdict.feasible}
    if not verdict.feasible:
        out[INFEASIBLE_REASON] = verdict.reason
    return out


def stored_infeasible_reason(
    constraints: Mapping[str, float], attrs: Mapping[str, Any]
) -> str | None:
    """Why a stored trial breaks a constraint, read back from its Optuna constraint values and
    user attrs (``None`` when it is feasible). A constrained metric stored as None (or NaN/Inf)
    is missing: infeasible whatever the stored violation says."""
    reasons: list[str] = []
    for metric, violation in sorted(constraints.items()):
        value = attrs.get(metric)
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))
        if metric in attrs and not number:
            why = (attrs.get(MISSING_METRICS) or {}).get(metric, "not measured")
            reasons.append(f"{metric} missing ({why})")
        elif not math.isfinite(violation) or violation > 0:
            reasons.append(f"{metric} exceeds its limit by {violation:.4g}")
    if not reasons and attrs.get(FEASIBLE) is False:
        reasons.append(str(attrs.get(INFEASIBLE_REASON) or "marked infeasible when stored"))
    return "; ".join(reasons) if reasons else None


# ----------------------------------------------------------------------------------------------
# Screened and pruned records


def screened_attrs(violations: Mapping[str, float], reason: str, values: Mapping[str, float | None]) -> dict[str, Any]:
    """The user attrs of a trial ended before its box: its constraint violations (infeasible, with
    ``reason``), ``screened``, ``screen_reason`` and ``screened_values`` (the objectives it has;
    None for those that need training)."""
    return {
        CONSTRAINT_VIOLATIONS: dict(violations), FEASIBLE: False, INFEASIBLE_REASON: reason,
        SCREENED: True, SCREEN_REASON: reason, SCREENED_VALUES: dict(values),
    }


def pruned_attrs(rung: float, rung_index: int, rank: int, front: int, reason: str) -> dict[str, Any]:
    """The user attrs of a trial stopped at a rung of its box."""
    return {PRUNED_RUNG: rung, PRUNED_RUNG_INDEX: rung_index, PRUNED_RANK: rank, PRUNED_FRONT: front,
            PRUNE_REASON: reason}


def rung_key(rung_index: int) -> str:
    """The user attr that holds a trial's rung vector at rung ``rung_index``: ``rung_<k>``."""
    return f"{RUNG_PREFIX}{rung_index}"


def rung_records(user_attrs: Mapping[str, Any]) -> dict[int, dict[str, Any]]:
    """A trial's rung vectors by rung index (user attrs ``rung_<k>``, written by the rung pruner
    as ``{fraction, values, names, train_s, time_unix_s[, bracket]}``), well-formed ones only."""
    out: dict[int, dict[str, Any]] = {}
    for key, rec in user_attrs.items():
        if not key.startswith(RUNG_PREFIX) or not isinstance(rec, dict):
            continue
        idx = key.removeprefix(RUNG_PREFIX)
        names, values = rec.get("names"), rec.get("values")
        if idx.isdigit() and isinstance(names, list) and isinstance(values, list) and len(names) == len(values):
            out[int(idx)] = rec
    return out
