"""What an exported trial's card says: spec, input, every metric with unit and method, teacher,
data set, distillation settings, environment and the checkpoint it came from.

The card is written (with its README) by :func:`kdsearch.modelcard.write_card`.
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import FrozenTrial

from kdsearch import trial_record as tr
from kdsearch._version import __version__
from kdsearch.constants import EXPORT_CARD_KIND
from kdsearch.metrics import metric_unit
from kdsearch.models import StudentSpec
from kdsearch.report.pareto import feasible, metric_columns, metric_value

__all__ = ["PREPROCESSING", "export_card"]

PREPROCESSING = "RGB uint8 -> resize to resolution_px (bilinear, antialias) -> /255 -> (x - mean) / std"


def _metrics(study: optuna.Study, trial: FrozenTrial) -> dict[str, dict[str, Any]]:
    names = list(study.metric_names or [])
    missing = trial.user_attrs.get(tr.MISSING_METRICS) or {}
    methods = trial.user_attrs.get(tr.METHODS) or {}
    out: dict[str, dict[str, Any]] = {}
    for m in metric_columns(study, [trial]):
        value = metric_value(trial, m, names)
        entry: dict[str, Any] = {"value": value, "unit": metric_unit(m)}
        if m in methods:
            entry["method"] = methods[m]
        if value is None:
            entry["missing_reason"] = str(missing.get(m, "not recorded"))
        out[m] = entry
    return out


def _normalisation(study: optuna.Study, trial: FrozenTrial) -> dict[str, Any] | None:
    for attrs in (trial.user_attrs, study.user_attrs):
        norm = attrs.get(tr.NORMALIZATION)
        if isinstance(norm, dict) and "mean" in norm and "std" in norm:
            return {"mean": list(norm["mean"]), "std": list(norm["std"])}
    return None


def export_card(study: optuna.Study, trial: FrozenTrial, spec: StudentSpec, fmt: str) -> dict[str, Any]:
    """The card of ``trial``'s student exported as ``fmt`` (without ``verification`` and ``files``)."""
    ua = trial.user_attrs
    cfg = study.user_attrs.get(tr.CONFIG) if isinstance(study.user_attrs.get(tr.CONFIG), dict) else {}
    objectives = dict(zip(study.metric_names or [], [d.name.lower() for d in study.directions], strict=False))
    return {
        "kind": EXPORT_CARD_KIND,
        "kdsearch_version": __version__,
        "format": fmt,
        "study": study.study_name,
        "trial_number": trial.number,
        "student": spec.label,
        "spec": spec.to_dict(),
        "input": {
            "shape": ["batch", spec.in_chans, spec.resolution, spec.resolution],
            "resolution_px": spec.resolution,
            "preprocessing": PREPROCESSING,
            "normalization": _normalisation(study, trial),
        },
        "objectives": objectives,
        "constraints": cfg.get("constraints") if isinstance(cfg, dict) else None,
        "feasible": feasible(trial),
        "metrics": _metrics(study, trial),
        "teacher": ua.get(tr.TEACHER),
        "teacher_name": ua.get(tr.TEACHER_NAME),
        "dataset": ua.get(tr.DATASET) or (cfg.get("data", {}) or {}).get("dataset"),
        "distillation": {k: ua.get(k) for k in (tr.TEMPERATURE, tr.ALPHA, tr.LR)},
        "params": dict(trial.params),
        "environment": {
            "study": study.user_attrs.get(tr.ENVIRONMENT),
            "trial_device": ua.get(tr.DEVICE) or (ua.get(tr.WORKER) or {}).get("device"),
            "env_diff": ua.get(tr.ENV_DIFF),
        },
        "source": {"artifact_id": ua.get(tr.ARTIFACT_ID), "weights_sha256": ua.get(tr.WEIGHTS_SHA256)},
    }
