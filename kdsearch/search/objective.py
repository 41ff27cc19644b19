"""One trial, top to bottom: propose -> build -> distil -> measure -> store.

:func:`prepare_worker` does the per-process work that every trial shares (data on the device,
teachers created, fitted and cached). :func:`run_trial` is the objective: a plain function that
stores every metric as a user attr, sets the constraints, uploads the student checkpoint as an
Optuna artifact, and returns the objective values. A failure inside a trial becomes
:class:`~kdsearch.errors.TrialFailure` with ``fail_reason`` stored on the trial.
"""

from __future__ import annotations

import gc
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.artifacts import upload_artifact

from kdsearch.checkpoint import save_student
from kdsearch.config import StudyConfig, TeacherConfig
from kdsearch.data import BatchSource, DataBundle, ViewSpec, load_data, make_batch_source, should_be_resident
from kdsearch.distill import (
    DistillResult,
    FaultInjector,
    OnlineTeacher,
    TeacherCache,
    build_or_load_cache,
    distill,
    fit_teacher,
)
from kdsearch.errors import TrialFailure
from kdsearch.measure import (
    EnergyMeter,
    KDMemoryTracker,
    Measurements,
    collect_environment,
    environment_diff,
    evaluate_accuracy,
    measure_inference,
)
from kdsearch.models import LoadedTeacher, build_student, create_teacher, teacher_needs_fit
from kdsearch.models.teacher import weak_teacher_warning
from kdsearch.search.space import Proposal, suggest
from kdsearch.storage import RunPaths, artifact_store

__all__ = ["ProgressFn", "PreparedTeacher", "WorkerContext", "prepare_worker", "run_trial", "pick_device"]

# progress(phase, fraction in [0, 1] or None, message)
ProgressFn = Callable[[str, float | None, str], None]


def _no_progress(phase: str, fraction: float | None, message: str) -> None:
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
    """What one worker process holds for all its trials."""

    cfg: StudyConfig
    paths: RunPaths
    device: torch.device
    bundle: DataBundle
    train_source: BatchSource
    view_spec: ViewSpec
    teachers: dict[str, PreparedTeacher]
    environment: dict[str, Any]


def pick_device() -> torch.device:
    """CUDA when visible (workers are pinned by CUDA_VISIBLE_DEVICES), else CPU."""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def prepare_worker(
    cfg: StudyConfig, paths: RunPaths, device: torch.device | None = None, progress: ProgressFn = _no_progress
) -> WorkerContext:
    """Load the data (resident on the device when it fits) and prepare every teacher once."""
    device = device or pick_device()
    paths.ensure()
    progress("data", None, f"loading {cfg.data.dataset}")
    bundle = load_data(cfg.data)
    resident = should_be_resident(bundle, device, cfg.data.device_resident)
    if resident:
        bundle = bundle.to(device)
    train_source = make_batch_source(bundle.train, device, resident, cfg.data.num_workers)
    cache_cfg = cfg.teacher.cache
    view_spec = ViewSpec(image_size=bundle.image_size, padding=cache_cfg.crop_padding, flip=cache_cfg.flip)
    teachers: dict[str, PreparedTeacher] = {}
    for tcfg in cfg.teachers:
        teachers[tcfg.display_name] = _prepare_teacher(tcfg, cfg, paths, bundle, view_spec, device, progress)
    env = collect_environment(device)
    return WorkerContext(cfg, paths, device, bundle, train_source, view_spec, teachers, env)


def _prepare_teacher(
    tcfg: TeacherConfig,
    cfg: StudyConfig,
    paths: RunPaths,
    bundle: DataBundle,
    view_spec: ViewSpec,
    device: torch.device,
    progress: ProgressFn,
) -> PreparedTeacher:
    label = tcfg.display_name
    progress("teacher", None, f"creating teacher {label}")
    # Seeded: a teacher without weights gets the same random init in every worker and run, so
    # its fitted weights and logit cache are found again instead of rebuilt.
    torch.manual_seed(cfg.study.seed)
    loaded = create_teacher(tcfg, bundle.num_classes, device)
    fit_info: dict[str, Any] = {}
    if teacher_needs_fit(tcfg, loaded, bundle.num_classes):
        progress("teacher-fit", 0.0, f"fitting teacher {label} for {tcfg.fit.time_s:.0f}s")
        loaded, fit_info = fit_teacher(
            loaded,
            bundle,
            tcfg.fit,
            paths.teachers,
            device,
            progress=lambda done, total: progress("teacher-fit", done / max(total, 1e-9), f"fitting {label}"),
        )
    loaded.model.eval()
    batch = cfg.measure.eval_batch_size
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
        )
    else:
        source = OnlineTeacher(loaded, view_spec)
    return PreparedTeacher(loaded, source, val_acc, test_acc, fit_info)


def _fail(trial: optuna.Trial, reason: str, detail: str, attrs: dict[str, Any] | None = None) -> TrialFailure:
    trial.set_user_attr("fail_reason", reason)
    trial.set_user_attr("fail_detail", detail[:500])
    for k, v in (attrs or {}).items():
        trial.set_user_attr(k, v)
    return TrialFailure(reason, detail, attrs)


def _free_device_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_trial(ctx: WorkerContext, trial: optuna.Trial, progress: ProgressFn = _no_progress) -> list[float]:
    """The objective. Returns the objective values in the study's order, or raises TrialFailure."""
    cfg = ctx.cfg
    device = ctx.device
    proposal: Proposal = suggest(trial, cfg, ctx.bundle.num_classes)
    spec, hyper = proposal.spec, proposal.hyper
    teacher = ctx.teachers[proposal.teacher.display_name]
    trial.set_user_attr("spec", spec.to_dict())
    trial.set_user_attr("student", spec.label)
    trial.set_user_attr("teacher", proposal.teacher.display_name)
    trial.set_user_attr("teacher_name", proposal.teacher.name)
    trial.set_user_attr("teacher_mode", proposal.teacher.mode)
    trial.set_user_attr("temperature", hyper.temperature)
    trial.set_user_attr("alpha", hyper.alpha)
    trial.set_user_attr("lr", hyper.lr)
    trial.set_user_attr("dataset", cfg.data.dataset)
    trial.set_user_attr("device", str(device))
    inject = cfg.debug.inject
    if cfg.debug.inject_trial is not None and cfg.debug.inject_trial != trial.number:
        inject = None
    fault = FaultInjector(inject) if inject is not None else None  # test-only (debug.inject)

    seed = cfg.study.seed * 100_003 + trial.number
    kd_memory = KDMemoryTracker(device)
    kd_energy = EnergyMeter.for_device(device, cfg.measure.energy.poll_interval_s)
    try:
        torch.manual_seed(seed)
        student = build_student(spec)
        progress("distil", 0.0, spec.label)
        with kd_memory, kd_energy:
            result: DistillResult = distill(
                student,
                train=ctx.train_source,
                val=ctx.bundle.val,
                bundle=ctx.bundle,
                teacher_source=teacher.source,
                hyper=hyper,
                cfg=cfg.distill,
                time_box_s=cfg.study.trial_time_s,
                resolution=spec.resolution,
                device=device,
                seed=seed,
                view_spec=ctx.view_spec,
                progress=lambda frac, msg: progress("distil", frac, msg),
                eval_batch_size=cfg.measure.eval_batch_size,
                on_step=fault,
            )
    except TrialFailure as exc:
        raise _fail(trial, exc.reason, exc.detail, exc.attrs) from None
    except torch.OutOfMemoryError as exc:
        _free_device_memory(device)
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise _fail(trial, "oom", f"{type(exc).__name__}: {first}", {"peak_kd_memory_mb": kd_memory.value_mb}) from None
    except Exception as exc:  # noqa: BLE001 - any other error is data for this trial
        _free_device_memory(device)
        raise _fail(trial, "error", f"{type(exc).__name__}: {exc}") from None

    m = Measurements()
    m.set("kd_time_s", result.kd_time_s, {
        "method": "perf_counter" + (" + cuda synchronize" if device.type == "cuda" else ""),
        "box_s": cfg.study.trial_time_s, "steps": result.steps, "epochs": result.epochs,
        "stopped_early": result.stopped_early,
    })
    if kd_memory.value_mb is not None:
        m.set("peak_kd_memory_mb", kd_memory.value_mb, kd_memory.method())
    else:
        m.set_missing("peak_kd_memory_mb", str(kd_memory.reason), kd_memory.method())
    kd_e = kd_energy.result
    if kd_e is not None and kd_e.joules is not None:
        m.set("kd_energy_j", kd_e.joules, kd_e.to_dict())
    else:
        reason = f"{kd_e.method}: {kd_e.reason}" if kd_e is not None else "meter did not run"
        m.set_missing("kd_energy_j", reason, kd_e.to_dict() if kd_e is not None else None)

    progress("measure", 0.0, "accuracy")
    student.eval()
    batch = cfg.measure.eval_batch_size
    acc_method = {"method": "top-1 on the held-out split", "resolution": spec.resolution}
    m.set("val_accuracy", evaluate_accuracy(student, ctx.bundle.val, spec.resolution, ctx.bundle.mean,
                                            ctx.bundle.std, device, batch), {**acc_method, "split": "val", "n": len(ctx.bundle.val)})
    m.set("test_accuracy", evaluate_accuracy(student, ctx.bundle.test, spec.resolution, ctx.bundle.mean,
                                             ctx.bundle.std, device, batch), {**acc_method, "split": "test", "n": len(ctx.bundle.test)})

    if cfg.finetune.enabled and ctx.bundle.finetune is not None:
        from kdsearch.distill.head import finetune_model

        progress("finetune", 0.0, f"{cfg.finetune.epochs} epochs")
        pre, post = finetune_model(
            student,
            ctx.bundle.finetune,
            ctx.bundle.test,
            spec.resolution,
            ctx.bundle.mean,
            ctx.bundle.std,
            epochs=cfg.finetune.epochs,
            lr=cfg.finetune.lr,
            batch_size=cfg.finetune.batch_size,
            unfreeze_last_block=cfg.finetune.unfreeze_last_block,
            device=device,
            seed=seed,
        )
        ft_method = {"method": "frozen features, head trained on the finetune split; accuracy on test",
                     "epochs": cfg.finetune.epochs, "lr": cfg.finetune.lr, "n_train": len(ctx.bundle.finetune)}
        m.set("pre_ft_accuracy", pre, ft_method)
        m.set("post_ft_accuracy", post, ft_method)
        m.set("ft_gain", post - pre, ft_method)

    progress("measure", 0.3, "latency, memory, energy, ops")
    m.update(measure_inference(student, spec.resolution, device, cfg.measure,
                               budget_s=cfg.measure.budget_s(cfg.study.grace_s)))
    values = m.values
    missing = m.missing

    env_now = collect_environment(device)
    diff = environment_diff(ctx.environment, env_now)
    for name, value in m.to_user_attrs().items():
        trial.set_user_attr(name, value)
    trial.set_user_attr("normalization", {"mean": list(ctx.bundle.mean), "std": list(ctx.bundle.std)})
    trial.set_user_attr("kd_history", {
        "val": [[round(t, 3), a] for t, a in result.val_history],
        "steps": result.steps,
        "epochs": result.epochs,
        "images_seen": result.images_seen,
        "final_train_loss": result.final_train_loss,
        "stopped_early": result.stopped_early,
        "teacher_forward_count": result.teacher_forward_count,
    })
    if diff:
        trial.set_user_attr("env_diff", diff)

    # Constraints: value minus limit, <= 0 is feasible. A missing constrained metric is
    # infeasible (a large positive violation) and the trial says why.
    violations: dict[str, float] = {}
    reasons: list[str] = []
    for metric, limit in cfg.constraints.items():
        v = values.get(metric)
        if v is None or not math.isfinite(v):
            violation = 1e18
            reasons.append(f"{metric} missing ({missing.get(metric, 'not measured')})")
        else:
            violation = float(v) - float(limit)
            if violation > 0:
                reasons.append(f"{metric}={v:.4g} > {limit:.4g}")
        trial.set_constraint(metric, violation)
        violations[metric] = violation
    trial.set_user_attr("constraint_violations", violations)
    trial.set_user_attr("feasible", not reasons)
    if reasons:
        trial.set_user_attr("infeasible_reason", "; ".join(reasons))

    progress("store", 0.9, "checkpoint")
    with tempfile.TemporaryDirectory(prefix="kdsearch-ckpt-") as tmp:
        path = Path(tmp) / f"trial-{trial.number}-{spec.label.replace('@', '_')}.safetensors"
        sha = save_student(student, spec, path, {"teacher": proposal.teacher.display_name, "trial": str(trial.number)})
        artifact_id = upload_artifact(
            artifact_store=artifact_store(ctx.paths), file_path=str(path), study_or_trial=trial,
            mimetype="application/octet-stream",
        )
    trial.set_user_attr("artifact_id", artifact_id)
    trial.set_user_attr("weights_sha256", sha)
    del student
    _free_device_memory(device)

    out: list[float] = []
    for metric in cfg.metric_names:
        v = values.get(metric)
        if v is None or not math.isfinite(float(v)):
            raise _fail(trial, "missing_objective",
                        f"objective {metric} could not be measured: {missing.get(metric, 'not finite')}")
        out.append(float(v))
    progress("done", 1.0, "")
    return out


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
        }
        for label, t in ctx.teachers.items()
    }
