"""kdsearch.distill: KD loss, teacher-logit cache, online teacher, time-boxed loop, teacher fitting.

Data flows one way: this package uses ``kdsearch.data`` (views, batches) and ``kdsearch.models``
(the LoadedTeacher type, weight hashes) and, for validation inside the loop,
``kdsearch.measure.evaluate_accuracy``; nothing under ``data``/``models`` imports it.
"""

from __future__ import annotations

from kdsearch.distill.fit import fit_key, fit_teacher
from kdsearch.distill.hooks import INJECT_STEP, EvalHook, FaultInjector, PlateauStop, StepHook, any_stop
from kdsearch.distill.loop import DistillResult, KDHyper, distill
from kdsearch.distill.loss import TopKTargets, kd_loss, kd_loss_topk
from kdsearch.distill.online import OnlineTeacher
from kdsearch.distill.schedule import lr_factor
from kdsearch.distill.teacher_cache import CACHE_FORMAT_VERSION, TeacherCache, build_or_load_cache, cache_key

__all__ = [
    "kd_loss",
    "kd_loss_topk",
    "TopKTargets",
    "lr_factor",
    "TeacherCache",
    "build_or_load_cache",
    "cache_key",
    "CACHE_FORMAT_VERSION",
    "OnlineTeacher",
    "KDHyper",
    "DistillResult",
    "distill",
    "EvalHook",
    "StepHook",
    "PlateauStop",
    "FaultInjector",
    "any_stop",
    "INJECT_STEP",
    "fit_teacher",
    "fit_key",
]
