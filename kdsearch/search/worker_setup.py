"""Worker set-up: what one worker process prepares once and holds for all its trials.

:func:`pick_device` chooses the device (a worker the supervisor pinned to a GPU that sees none
fails loudly), :func:`prepare_worker` loads the data (resident on the device when it fits) and
prepares every teacher (created, fitted when it needs it, evaluated, its logits cached), and
:class:`WorkerContext` carries it all to :func:`kdsearch.search.objective.run_trial`. The
``ENV_*`` names are what the supervisor sets in a worker's environment.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from kdsearch.config import StudyConfig, TeacherConfig
from kdsearch.data import (
    BatchSource,
    DataBundle,
    ViewSpec,
    load_data,
    make_batch_source,
    share_pinned_train,
    should_be_resident,
)
from kdsearch.distill import OnlineTeacher, TeacherCache, build_or_load_cache, fit_teacher
from kdsearch.distill.precision import train_dtype_for
from kdsearch.errors import KDSearchError
from kdsearch.measure import collect_environment, evaluate_accuracy
from kdsearch.measure.device import collect_cuda_facts, diagnose_no_cuda
from kdsearch.models import LoadedTeacher, create_teacher, teacher_needs_fit
from kdsearch.models.teacher import val_leak_check, weak_teacher_warning
from kdsearch.search.rehearsal import TABLE_NUM_CLASSES, Rehearsal
from kdsearch.storage import RunPaths

__all__ = [
    "ENV_EXPECT_CUDA",
    "ENV_WORKERS_PER_GPU",
    "ProgressFn",
    "PreparedTeacher",
    "WorkerContext",
    "free_device_memory",
    "no_progress",
    "pick_device",
    "prepare_worker",
    "teacher_summary",
]

ENV_EXPECT_CUDA = "KDSEARCH_EXPECT_CUDA"
"""Set to ``1`` by the supervisor for a worker it pins to a GPU: finding none is then an error."""
ENV_WORKERS_PER_GPU = "KDSEARCH_WORKERS_PER_GPU"
"""Set by the supervisor: how many workers share this worker's GPU (> 1 only with study.share_gpu)."""

# progress(phase, fraction in [0, 1] or None, message)
ProgressFn = Callable[[str, float | None, str], None]


def no_progress(phase: str, fraction: float | None, message: str) -> None:
    """A :data:`ProgressFn` that reports nothing."""
    return None


@dataclass
class PreparedTeacher:
    """A teacher ready for every trial: weights, accuracy, and where its logits come from."""

    loaded: LoadedTeacher
    source: TeacherCache | OnlineTeacher
    val_accuracy: float
    test_accuracy: float
    fit_info: dict[str, Any] = field(default_factory=dict)


@dataclass
class WorkerContext:
    """What one worker process holds for all its trials. In a rehearsal (``rehearsal`` section)
    there is no data and no teacher (``bundle``, ``train_source``, ``view_spec`` None, ``teachers``
    empty): ``rehearsal`` replays recorded trials instead (:mod:`kdsearch.search.rehearsal`)."""

    cfg: StudyConfig
    paths: RunPaths
    device: torch.device
    bundle: DataBundle | None
    train_source: BatchSource | None
    view_spec: ViewSpec | None
    teachers: dict[str, PreparedTeacher]
    environment: dict[str, Any]
    train_dtype: str = "fp32"  # "bf16" | "fp16" | "fp32": kdsearch.distill.precision
    gpu_sharing: dict[str, Any] = field(default_factory=dict)
    rehearsal: Rehearsal | None = None
    device_info: dict[str, Any] = field(default_factory=dict)  # kdsearch.measure.device.describe_worker_device

    @property
    def num_classes(self) -> int:
        return TABLE_NUM_CLASSES if self.bundle is None else self.bundle.num_classes


def pick_device(expect_cuda: bool | None = None) -> torch.device:
    """CUDA when visible (workers are pinned by CUDA_VISIBLE_DEVICES), else CPU.

    ``expect_cuda`` (default: the supervisor's ``KDSEARCH_EXPECT_CUDA`` for this worker) makes a
    missing GPU an error instead of a silent fall-back to the CPU, which would measure latency,
    memory and energy on the wrong device.
    """
    if expect_cuda is None:
        expect_cuda = os.environ.get(ENV_EXPECT_CUDA) == "1"
    if torch.cuda.is_available():
        return torch.device("cuda", 0)
    if expect_cuda:
        why = diagnose_no_cuda(collect_cuda_facts()) or "torch sees no CUDA device"
        raise KDSearchError(
            f"worker: pinned to GPU {os.environ.get('CUDA_VISIBLE_DEVICES', '?')!r} but {why} "
            "(it would otherwise run on the CPU and measure the wrong device)"
        )
    return torch.device("cpu")


def _needs_cuda(cfg: StudyConfig) -> list[str]:
    """The objectives and constraints that only a CUDA device measures."""
    from kdsearch.metrics import metric_info  # noqa: PLC0415 - ground floor, read here only

    names = [*cfg.objectives, *cfg.constraints]
    return [n for n in names if (info := metric_info(n)) is not None and info.needs_cuda]


def prepare_worker(
    cfg: StudyConfig, paths: RunPaths, device: torch.device | None = None, progress: ProgressFn = no_progress
) -> WorkerContext:
    """Load the data (resident on the device when it fits) and prepare every teacher once (in a
    rehearsal: load the table instead; :mod:`kdsearch.search.rehearsal`).

    The teachers are fitted, evaluated and cached on ``device``, then (cached mode) moved off it:
    no trial uses them, and what stays resident is the baseline of every trial's memory figure.
    """
    device = device or pick_device()
    gpu_only = _needs_cuda(cfg)
    if device.type != "cuda" and gpu_only:
        raise KDSearchError(
            f"worker: {', '.join(gpu_only)} can only be measured on a CUDA device and this worker runs on "
            f"{device.type}; run it on a GPU machine, or drop those objectives/constraints"
        )
    train_dtype = train_dtype_for(device, cfg.distill.amp)
    paths.ensure()
    if cfg.rehearsal.enabled:  # no data set, no teacher: trials replay the table
        progress("data", None, f"loading the rehearsal table {cfg.rehearsal.table}")
        env = {**collect_environment(device), "train_dtype": train_dtype,
               "rehearsal": {"table": cfg.rehearsal.table, "speed": cfg.rehearsal.speed}}
        return WorkerContext(cfg, paths, device, None, None, None, {}, env, train_dtype, {},
                             Rehearsal.from_config(cfg.rehearsal))
    progress("data", None, f"loading {cfg.data.dataset}")
    bundle = load_data(cfg.data)
    resident = should_be_resident(bundle, device, cfg.data.device_resident)
    if resident:
        bundle = bundle.to(device)
    train_source = make_batch_source(bundle.train, device, resident, cfg.data.num_workers)
    bundle = share_pinned_train(bundle, train_source)  # one host copy of train (fit, cache build reuse it)
    cache_cfg = cfg.teacher.cache
    view_spec = ViewSpec(image_size=bundle.image_size, padding=cache_cfg.crop_padding, flip=cache_cfg.flip)
    teachers: dict[str, PreparedTeacher] = {}
    for tcfg in cfg.teachers:
        teachers[tcfg.display_name] = _prepare_teacher(
            tcfg, cfg, paths, bundle, view_spec, device, progress, train_dtype
        )
    env = collect_environment(device)
    sharing = {
        "workers_per_gpu": int(os.environ.get(ENV_WORKERS_PER_GPU, "1") or 1) if device.type == "cuda" else None,
        "share_gpu": cfg.study.share_gpu,
    }
    env["gpu_sharing"] = sharing
    env["train_dtype"] = train_dtype
    return WorkerContext(cfg, paths, device, bundle, train_source, view_spec, teachers, env, train_dtype, sharing)


def _prepare_teacher(
    tcfg: TeacherConfig,
    cfg: StudyConfig,
    paths: RunPaths,
    bundle: DataBundle,
    view_spec: ViewSpec,
    device: torch.device,
    progress: ProgressFn,
    train_dtype: str = "fp32",
) -> PreparedTeacher:
    label = tcfg.display_name
    progress("teacher", None, f"creating teacher {label}")
    # Seeded: a teacher without weights gets the same random init in every worker and run, so
    # its fitted weights and logit cache are found again instead of rebuilt.
    torch.manual_seed(cfg.study.seed)
    loaded = create_teacher(tcfg, bundle.num_classes, device)
    fit_info: dict[str, Any] = {}
    if teacher_needs_fit(tcfg, loaded, bundle.num_classes):
        progress("teacher-fit", 0.0, f"fitting teacher {label} {tcfg.fit.describe()}")
        loaded, fit_info = fit_teacher(
            loaded,
            bundle,
            tcfg.fit,
            paths.teachers,
            device,
            progress=lambda done, total: progress("teacher-fit", done / max(total, 1e-9), f"fitting {label}"),
        )
        free_device_memory(device)  # the fit's optimiser state and activations
    loaded.model.eval()
    batch = cfg.measure.eval_batch_size
    progress("teacher", None, f"measuring teacher {label} accuracy (val, test)")
    val_acc = evaluate_accuracy(loaded.model, bundle.val, loaded.input_size, loaded.mean, loaded.std, device, batch,
                                interpolation=loaded.interpolation)
    test_acc = evaluate_accuracy(loaded.model, bundle.test, loaded.input_size, loaded.mean, loaded.std, device, batch,
                                 interpolation=loaded.interpolation)
    weak_teacher_warning(loaded, val_acc, tcfg.expected_accuracy)
    source: TeacherCache | OnlineTeacher
    if tcfg.mode == "cached":
        source = build_or_load_cache(
            loaded,
            bundle,
            tcfg.cache,
            paths.cache,
            device,
            progress=lambda done, total: progress("cache", done / max(total, 1), f"teacher cache {label}"),
            dtype=train_dtype,
            used_by=paths.root.name,
        )
        # No trial runs the teacher in cached mode: off the device, so the baseline of every
        # trial's memory figure is the data and the cache, not a ViT nobody uses.
        loaded.model.to("cpu")
        free_device_memory(device)
    else:
        source = OnlineTeacher(loaded, view_spec, dtype=train_dtype)
    return PreparedTeacher(loaded, source, val_acc, test_acc, fit_info)


def free_device_memory(device: torch.device) -> None:
    """Collect garbage and return the allocator's cached blocks (CUDA): call it after the last
    reference to a model or a batch is dropped, or it frees nothing."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def teacher_summary(ctx: WorkerContext) -> dict[str, Any]:
    """Study user attr ``teachers``: per teacher label, its accuracy and identity."""
    return {
        label: {
            "name": t.loaded.name,
            "val_accuracy": t.val_accuracy,
            "test_accuracy": t.test_accuracy,
            "weights_sha256": t.loaded.weights_sha256,
            "input_size": t.loaded.input_size,
            "mean": list(t.loaded.mean), "std": list(t.loaded.std), "norm_source": t.loaded.norm_source,
            "interpolation": t.loaded.interpolation,
            "pretrained": t.loaded.pretrained,
            "mode": "cached" if isinstance(t.source, TeacherCache) else "online",
            "fit": t.fit_info,
            # A teacher trained on val (the rule: kdsearch.models.teacher.val_leak_check).
            "val_leak": val_leak_check(label, t.val_accuracy, t.test_accuracy, len(ctx.bundle.val), len(ctx.bundle.test)),
            "cache": t.source.describe() if isinstance(t.source, TeacherCache) else None,
        }
        for label, t in ctx.teachers.items()
    }
