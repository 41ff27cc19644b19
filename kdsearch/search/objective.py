"""One trial, top to bottom: propose -> build -> distil -> measure -> store.

:func:`prepare_worker` does the per-process work that every trial shares (data on the device,
teachers created, fitted and cached). :func:`run_trial` is the objective: a plain function that
stores every metric as a user attr, sets the constraints, uploads the student checkpoint as an
Optuna artifact, and returns the objective values. A failure inside a trial becomes
:class:`~kdsearch.errors.TrialFailure` with ``fail_reason`` stored on the trial.

What the figures include (see also the metric registry, :mod:`kdsearch.metrics`):

* ``peak_kd_memory_mb`` / ``peak_kd_memory_total_mb``: the allocator peak of the KD training
  steps (the loop pauses the tracker around every validation), above the baseline resident at
  trial start and for the whole process. The teacher leaves the device once its logit cache is
  built, so the baseline is the data and the cache.
* ``kd_energy_j``, ``kd_energy_mj_per_image``, ``kd_mean_power_w``: NVML energy of the same
  training steps, per training image seen, and as mean power.
* Selection figures come from the validation split; test figures are stored beside them for
  reporting only (``test_accuracy``; with ``finetune.enabled`` the fine-tune stage stores
  ``pre_ft_val_accuracy`` / ``post_ft_val_accuracy`` / ``ft_gain_val`` and, for reports,
  ``pre_ft_accuracy`` / ``post_ft_accuracy`` / ``ft_gain`` on test).
* Precision: ``train_dtype`` (bf16, fp16 + GradScaler, or fp32; :mod:`kdsearch.distill.precision`)
  is chosen once per worker, used for the teacher's cache and every trial, and stored.
* GPU sharing: a worker pinned to a GPU that it cannot see fails loudly; the number of workers
  on the worker's GPU (``study.share_gpu``) is stored with every trial (``gpu_sharing``).

Before the box (issue 12), in this order, each able to end the trial in seconds:

1. **Fixed costs**: everything that depends on the architecture only (params, MACs, size,
   activation peak, latency at every batch size and device, inference memory and energy) is
   measured once, on the untrained student in the layout training will give it, under the same
   ``measure.max_time`` budget. A constraint on any of them that is broken ends the trial as
   PRUNED with ``screened: true``, ``screen_reason``, its values and its violations set with
   ``trial.set_constraint`` (0.0 for constraints that need training), so TPE and NSGA-II learn
   from it as from any infeasible trial. These figures are not measured again after KD: a trained
   student runs the same kernels as the untrained one of the same architecture (each method
   record says ``"measured_on": "untrained student, before KD"``).
2. **Memory probe** (CUDA only): :data:`PROBE_STEPS` real training steps of a copy of the student
   at the trial's batch and resolution, teacher targets included, give ``probe_peak_memory_mb``
   (the allocator peak above the same baseline as ``peak_kd_memory_mb``). Over the
   ``peak_kd_memory_mb`` constraint, or out of memory, the trial ends infeasible (PRUNED,
   ``screened: true``) with the reason. On the CPU the probe is skipped and the figure is missing
   with the reason.
3. **Rungs** (``study.pruning.enabled``): :class:`kdsearch.search.pruning.RungPruner` is the
   ``on_eval`` hook of the box and the loop evaluates at every rung fraction on top of its grid
   ``distill.eval_every_fraction`` (``distill(eval_at=rungs)``: with the defaults, 1/9, 1/4,
   1/3, 1/2, 3/4 and the end; a plateau stop's patience counts these evaluations). With a
   searched box (``study.trial_time`` a list) a trial competes only with trials of its own box. A trial
   stopped at a rung is stored as PRUNED with its partial curve (``kd_history``), ``pruned_rung``,
   ``pruned_rank``, ``pruned_front`` and the ``pruning`` record (every decision with the
   competitors it was taken against, so any decision can be recomputed from storage).

A pruned or screened trial raises :class:`optuna.TrialPruned` after storing all that; the worker
tells it as PRUNED.
"""

from __future__ import annotations

import copy
import gc
import math
import os
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
from kdsearch.device_record import DEVICE_INFO_ATTR
from kdsearch.distill import (
    DistillResult,
    FaultInjector,
    OnlineTeacher,
    TeacherCache,
    build_or_load_cache,
    distill,
    fit_teacher,
)
from kdsearch.distill.precision import autocast_dtype, train_dtype_for
from kdsearch.errors import KDSearchError, TrialFailure
from kdsearch.measure import (
    EnergyMeter,
    KDMemoryTracker,
    Measurements,
    collect_environment,
    environment_diff,
    evaluate_accuracy,
    measure_inference,
)
from kdsearch.measure.device import collect_cuda_facts, diagnose_no_cuda
from kdsearch.metrics import is_fixed_cost, metric_unit
from kdsearch.models import LoadedTeacher, build_student, create_teacher, teacher_needs_fit
from kdsearch.models.teacher import weak_teacher_warning
from kdsearch.search.pruning import OptunaRungStore, PruningConfig, RungEntry, RungPruner
from kdsearch.search.screening import screen_fixed_costs
from kdsearch.search.space import Proposal, suggest
from kdsearch.storage import RunPaths, artifact_store

__all__ = [
    "ProgressFn",
    "PreparedTeacher",
    "WorkerContext",
    "prepare_worker",
    "run_trial",
    "pick_device",
    "ENV_EXPECT_CUDA",
    "ENV_WORKERS_PER_GPU",
    "PROBE_STEPS",
    "UNTRAINED_NOTE",
]

PROBE_STEPS = 3
"""Training steps of the fail-fast memory probe (CUDA only)."""
UNTRAINED_NOTE = "untrained student, before KD"
"""``measured_on`` of every fixed-cost figure: latency and size do not depend on the weights."""

ENV_EXPECT_CUDA = "KDSEARCH_EXPECT_CUDA"
"""Set to ``1`` by the supervisor for a worker it pins to a GPU: finding none is then an error."""
ENV_WORKERS_PER_GPU = "KDSEARCH_WORKERS_PER_GPU"
"""Set by the supervisor: how many workers share this worker's GPU (> 1 only with study.share_gpu)."""

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
    train_dtype: str = "fp32"  # "bf16" | "fp16" | "fp32": kdsearch.distill.precision
    gpu_sharing: dict[str, Any] = field(default_factory=dict)
    device_info: dict[str, Any] = field(default_factory=dict)  # kdsearch.measure.device.describe_worker_device


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
    cfg: StudyConfig, paths: RunPaths, device: torch.device | None = None, progress: ProgressFn = _no_progress
) -> WorkerContext:
    """Load the data (resident on the device when it fits) and prepare every teacher once.

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
        _free_device_memory(device)  # the fit's optimiser state and activations
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
        )
        # No trial runs the teacher in cached mode: off the device, so the baseline of every
        # trial's memory figure is the data and the cache, not a ViT nobody uses.
        loaded.model.to("cpu")
        _free_device_memory(device)
    else:
        source = OnlineTeacher(loaded, view_spec, dtype=train_dtype)
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
    spec, hyper, box_s = proposal.spec, proposal.hyper, proposal.box_s
    teacher = ctx.teachers[proposal.teacher.display_name]
    # First, so the supervisor's hard limit (box + grace) reads this trial's own box from storage.
    trial.set_user_attr("box_s", box_s)
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
    if ctx.device_info:
        trial.set_user_attr(DEVICE_INFO_ATTR, ctx.device_info)
    trial.set_user_attr("train_dtype", ctx.train_dtype)
    trial.set_user_attr("gpu_sharing", ctx.gpu_sharing)
    inject = cfg.debug.inject
    if cfg.debug.inject_trial is not None and cfg.debug.inject_trial != trial.number:
        inject = None
    fault = FaultInjector(inject) if inject is not None else None  # test-only (debug.inject)

    seed = cfg.study.seed * 100_003 + trial.number
    torch.manual_seed(seed)
    try:
        student = build_student(spec)
    except Exception as exc:  # noqa: BLE001 - a student that cannot be built is this trial's failure
        raise _fail(trial, "error", f"{type(exc).__name__}: {exc}") from None

    # 1. Fixed costs, on the untrained student, then the constraints they decide.
    progress("measure", 0.0, "fixed costs of the untrained student")
    fixed = _measure_fixed_costs(ctx, student, spec.resolution)
    screen = screen_fixed_costs(fixed.values, cfg.constraints, [m for m in cfg.constraints if is_fixed_cost(m)])
    if not screen.feasible_so_far:
        cons, missing = _known_violations(cfg, fixed)
        _screen_out(trial, cfg, fixed, cons, "; ".join([screen.reason(cfg.constraints), *missing]))

    # 2. The fail-fast memory probe (CUDA only).
    probe_attrs = _memory_probe(ctx, student, spec, teacher, hyper, seed, fixed)
    limit = cfg.constraints.get("peak_kd_memory_mb")
    probe_mb = fixed.values.get("probe_peak_memory_mb")
    probe_reason = None
    if probe_attrs.get("oom"):
        probe_reason = f"out of memory in the {PROBE_STEPS}-step memory probe: {probe_attrs['oom']}"
    elif limit is not None and probe_mb is not None and probe_mb > limit:
        probe_reason = f"probe_peak_memory_mb={probe_mb:.4g} > peak_kd_memory_mb limit {limit:.4g}"
    if probe_reason is not None:
        cons, missing = _known_violations(cfg, fixed)
        probe_reason = "; ".join([probe_reason, *missing])
        if limit is not None:
            cons["peak_kd_memory_mb"] = 1e18 if probe_mb is None else float(probe_mb) - float(limit)
        _screen_out(trial, cfg, fixed, cons, probe_reason)

    # 3. The box, with the rung pruner when study.pruning is on.
    pruner = _rung_pruner(trial, cfg, fixed, box_s)
    rungs = pruner.config.rungs if pruner is not None else ()
    kd_memory = KDMemoryTracker(device)
    kd_energy = EnergyMeter.for_device(device, cfg.measure.energy.poll_interval_s)
    try:
        progress("distil", 0.0, spec.label)
        with kd_memory, kd_energy:  # both paused by distill() around every validation
            result: DistillResult = distill(
                student,
                train=ctx.train_source,
                val=ctx.bundle.val,
                bundle=ctx.bundle,
                teacher_source=teacher.source,
                hyper=hyper,
                cfg=cfg.distill,
                time_box_s=box_s,
                resolution=spec.resolution,
                device=device,
                seed=seed,
                view_spec=ctx.view_spec,
                progress=lambda frac, msg: progress("distil", frac, msg),
                eval_batch_size=cfg.measure.eval_batch_size,
                on_eval=pruner,
                on_step=fault,
                meters=(kd_memory, kd_energy),
                train_dtype=ctx.train_dtype,
                eval_at=rungs,  # every rung is evaluated, on top of distill.eval_every_fraction
            )
    except TrialFailure as exc:
        raise _fail(trial, exc.reason, exc.detail, exc.attrs) from None
    except torch.OutOfMemoryError as exc:
        _free_device_memory(device)
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise _fail(trial, "oom", f"{type(exc).__name__}: {first}", {
            "peak_kd_memory_mb": kd_memory.value_mb, "peak_kd_memory_total_mb": kd_memory.total_mb,
        }) from None
    except Exception as exc:  # noqa: BLE001 - any other error is data for this trial
        _free_device_memory(device)
        raise _fail(trial, "error", f"{type(exc).__name__}: {exc}") from None

    m = Measurements()
    m.set("kd_time_s", result.kd_time_s, {
        "method": "perf_counter" + (" + cuda synchronize" if device.type == "cuda" else ""),
        "box_s": box_s, "box_searched": cfg.study.box_searched, "steps": result.steps, "epochs": result.epochs,
        "stopped_early": result.stopped_early, "stop_requested_s": result.stop_requested_s,
        "cooldown_s": result.cooldown_s, "train_dtype": result.train_dtype,
        "eval_time_s": result.eval_time_s, "final_eval_time_s": result.final_eval_time_s,
        "evaluations": result.evaluations,
    })
    _store_kd_memory(m, kd_memory)
    _store_kd_energy(m, kd_energy, result)
    trial.set_user_attr("kd_history", _kd_history(result))
    if result.compile is not None:  # compiled (bool), compile_reason, compile_time_s (outside the box)
        for key, value in result.compile.to_attrs().items():
            trial.set_user_attr(key, value)
    if pruner is not None:
        trial.set_user_attr("pruning", _pruning_record(pruner, cfg.distill.eval_every_fraction))
    if pruner is not None and pruner.pruned_at is not None:
        _store_pruned(trial, cfg, m, fixed, pruner, student, device)

    progress("measure", 0.0, "accuracy")
    student.eval()
    # The training precision, at a batch no larger than the training batch: what fits for
    # training fits for evaluation (measure.eval_batch_size caps it).
    batch = max(1, min(cfg.measure.eval_batch_size, cfg.distill.batch_size))
    amp = autocast_dtype(result.train_dtype)
    acc_method = {"method": "top-1 on the held-out split, inference mode", "resolution": spec.resolution,
                  "dtype": result.train_dtype, "batch_size": batch}

    def accuracy(model: torch.nn.Module, split: Any) -> float:
        return evaluate_accuracy(model, split, spec.resolution, ctx.bundle.mean, ctx.bundle.std, device, batch,
                                 autocast_dtype=amp)

    # distill()'s final evaluation already ran on all of val with this precision and batch, on the
    # model as it is now: reuse it rather than evaluating val twice.
    val_acc = result.final_val_accuracy
    if val_acc is None:
        val_acc = accuracy(student, ctx.bundle.val)
    m.set("val_accuracy", val_acc, {**acc_method, "split": "val", "n": len(ctx.bundle.val)})
    m.set("test_accuracy", accuracy(student, ctx.bundle.test),
          {**acc_method, "split": "test", "n": len(ctx.bundle.test), "use": "reporting only"})

    if cfg.finetune.enabled and ctx.bundle.finetune is not None:
        from kdsearch.distill.head import train_head

        progress("finetune", 0.0, f"{cfg.finetune.epochs} epochs")
        # A copy: the stored checkpoint and the figures above are the distilled student's.
        tuned = copy.deepcopy(student).to(device)
        pre_val, pre_test = m.values["val_accuracy"], m.values["test_accuracy"]
        train_head(
            tuned, ctx.bundle.finetune, spec.resolution, ctx.bundle.mean, ctx.bundle.std,
            epochs=cfg.finetune.epochs, lr=cfg.finetune.lr, batch_size=cfg.finetune.batch_size,
            unfreeze_last_block=cfg.finetune.unfreeze_last_block, device=device, seed=seed,
        )
        post_val, post_test = accuracy(tuned, ctx.bundle.val), accuracy(tuned, ctx.bundle.test)
        del tuned
        ft_base = {"method": "frozen features, head trained on the finetune split", "epochs": cfg.finetune.epochs,
                   "lr": cfg.finetune.lr, "n_train": len(ctx.bundle.finetune), "dtype": result.train_dtype}
        ft_val = {**ft_base, "split": "val", "n": len(ctx.bundle.val), "use": "selection"}
        ft_test = {**ft_base, "split": "test", "n": len(ctx.bundle.test), "use": "reporting only"}
        assert pre_val is not None and pre_test is not None
        m.set("pre_ft_val_accuracy", pre_val, ft_val)
        m.set("post_ft_val_accuracy", post_val, ft_val)
        m.set("ft_gain_val", post_val - pre_val, ft_val)
        m.set("pre_ft_accuracy", pre_test, ft_test)
        m.set("post_ft_accuracy", post_test, ft_test)
        m.set("ft_gain", post_test - pre_test, ft_test)

    # Latency, size, inference memory and energy were measured before KD (fixed costs).
    m.update(fixed)
    values = m.values
    missing = m.missing

    env_now = collect_environment(device)
    diff = environment_diff(ctx.environment, env_now)
    for name, value in m.to_user_attrs().items():
        trial.set_user_attr(name, value)
    trial.set_user_attr("normalization", {"mean": list(ctx.bundle.mean), "std": list(ctx.bundle.std)})
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


def _measure_fixed_costs(ctx: WorkerContext, student: torch.nn.Module, resolution: int) -> Measurements:
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
    _free_device_memory(device)
    return fixed


class _ProbeDone(Exception):
    """Raised by the probe's step hook once its steps have run."""


class _StopAfter:
    """A :data:`~kdsearch.distill.hooks.StepHook` that ends the call after ``steps`` full steps."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def __call__(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        if step > self.steps:
            raise _ProbeDone
        return loss


def _memory_probe(
    ctx: WorkerContext, student: torch.nn.Module, spec: Any, teacher: PreparedTeacher, hyper: Any, seed: int,
    fixed: Measurements,
) -> dict[str, Any]:
    """Run :data:`PROBE_STEPS` KD steps of a copy of ``student`` (CUDA only) and set
    ``probe_peak_memory_mb`` in ``fixed``. Returns ``{"oom": message}`` when the probe ran out of
    memory, else ``{}``."""
    cfg, device = ctx.cfg, ctx.device
    how = {"method": f"{PROBE_STEPS} KD training steps of a copy of the untrained student before the box",
           "steps": PROBE_STEPS, "batch_size": cfg.distill.batch_size, "resolution": spec.resolution,
           "train_dtype": ctx.train_dtype}
    tracker = KDMemoryTracker(device)
    if not tracker.available:  # no allocator counters: the CPU
        fixed.set_missing("probe_peak_memory_mb", f"the memory probe runs on CUDA only; this worker runs on {device.type}",
                          {**how, "method": "skipped"})
        return {}
    probe = copy.deepcopy(student)
    out: dict[str, Any] = {}
    try:
        with tracker:
            distill(
                probe, train=ctx.train_source, val=ctx.bundle.val, bundle=ctx.bundle, teacher_source=teacher.source,
                hyper=hyper, cfg=cfg.distill, time_box_s=cfg.study.trial_time_s, resolution=spec.resolution,
                device=device, seed=seed, view_spec=ctx.view_spec, eval_batch_size=cfg.measure.eval_batch_size,
                on_step=_StopAfter(PROBE_STEPS), meters=(tracker,), train_dtype=ctx.train_dtype,
            )
    except _ProbeDone:
        pass
    except torch.OutOfMemoryError as exc:
        out["oom"] = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
    finally:
        del probe
        _free_device_memory(device)
    if tracker.value_mb is not None:
        fixed.set("probe_peak_memory_mb", tracker.value_mb, {**how, **tracker.method()})
    else:
        fixed.set_missing("probe_peak_memory_mb", out.get("oom") or str(tracker.reason or "not measured"),
                          {**how, **tracker.method()})
    return out


def _known_violations(cfg: StudyConfig, m: Measurements) -> tuple[dict[str, float], list[str]]:
    """``set_constraint`` values of a trial that ends before its final check: value - limit for
    each fixed cost measured; a fixed cost that could not be measured is infeasible (1e18, as in
    the final check: it will not be measured later), with its reason; 0.0 ("not known to be
    violated") for a constraint that needs training."""
    screen = screen_fixed_costs(m.values, cfg.constraints, [n for n in cfg.constraints if is_fixed_cost(n)])
    cons = screen.constraint_values(cfg.constraints)
    missing: list[str] = []
    for metric in cfg.constraints:
        if is_fixed_cost(metric) and metric not in screen.violations:
            cons[metric] = 1e18
            missing.append(f"{metric} missing ({m.missing.get(metric, 'not measured')})")
    return cons, missing


def _screen_out(
    trial: optuna.Trial, cfg: StudyConfig, fixed: Measurements, constraints: dict[str, float], reason: str
) -> None:
    """End the trial before the box: store what was measured and the violations, and raise
    :class:`optuna.TrialPruned` (told PRUNED, infeasible; the sampler learns from its constraints)."""
    for name, value in fixed.to_user_attrs().items():
        trial.set_user_attr(name, value)
    for metric, violation in constraints.items():
        trial.set_constraint(metric, violation)
    trial.set_user_attr("constraint_violations", constraints)
    trial.set_user_attr("feasible", False)
    trial.set_user_attr("infeasible_reason", reason)
    trial.set_user_attr("screened", True)
    trial.set_user_attr("screen_reason", reason)
    # The objectives it has (fixed costs); the rest (accuracy, ...) needs training: None.
    trial.set_user_attr("screened_values", {n: fixed.values.get(n) for n in cfg.metric_names})
    raise optuna.TrialPruned(f"screened before training: {reason}")


class _RecordingStore:
    """An :class:`OptunaRungStore` that remembers the competitors each decision was taken against."""

    def __init__(self, inner: OptunaRungStore) -> None:
        self.inner = inner
        self.seen: dict[int, list[RungEntry]] = {}

    def record(self, key: int, rung_index: int, fraction: float, values: Any, train_s: float) -> None:
        self.inner.record(key, rung_index, fraction, values, train_s)

    def competitors(self, key: int, rung_index: int) -> list[RungEntry]:
        found = self.inner.competitors(key, rung_index)
        self.seen[rung_index] = list(found)
        return found


def _rung_pruner(trial: optuna.Trial, cfg: StudyConfig, fixed: Measurements, box_s: float) -> RungPruner | None:
    """The ``on_eval`` hook of ``study.pruning`` (None when it is off): rung vectors are the
    validation accuracy and the fixed-cost objectives (log scale for counts and MACs). With a
    searched box (``study.trial_time`` a list) a trial competes only with trials of its own box:
    a rung is a fraction of the box and the LR schedule follows it, so the accuracy at 1/9 of a
    2-minute box and at 1/9 of a 10-minute one are not comparable (one bracket per box)."""
    p = cfg.study.pruning
    if not p.enabled:
        return None
    names = [n for n in cfg.metric_names if n != "val_accuracy" and is_fixed_cost(n)]
    values = [fixed.values.get(n) for n in names]
    return RungPruner(
        key=trial.number,
        store=_RecordingStore(OptunaRungStore(
            trial, ["val_accuracy", *names], bracket={"box_s": box_s} if cfg.study.box_searched else None)),
        config=PruningConfig(eta=p.eta, min_fraction=p.min_fraction, min_competitors=p.min_competitors),
        fixed_values=[math.nan if v is None else float(v) for v in values],
        directions=["maximize", *(cfg.objectives[n] for n in names)],
        scales=["linear", *("log" if metric_unit(n) in ("count", "MACs") else "linear" for n in names)],
    )


def _pruning_record(pruner: RungPruner, eval_every_fraction: float) -> dict[str, Any]:
    """User attr ``pruning``: the decisions, the curve, and what each decision was taken against
    (the rule's settings and the competitors' rung vectors), so :func:`decide_at_rung` can
    recompute it from storage alone."""
    store = pruner.store
    seen = store.seen if isinstance(store, _RecordingStore) else {}
    names = store.inner.names if isinstance(store, _RecordingStore) else []
    c = pruner.config
    return {
        **pruner.summary(),
        "eta": c.eta, "min_fraction": c.min_fraction, "min_competitors": c.min_competitors,
        "rungs": list(c.rungs), "names": names, "directions": list(pruner.directions),
        "bracket": store.inner.bracket if isinstance(store, _RecordingStore) else None,
        "scales": list(pruner.scales or ()), "eval_every_fraction": eval_every_fraction,
        "competitors": {str(k): [[e.key, list(e.values)] for e in v] for k, v in seen.items()},
    }


def _store_pruned(
    trial: optuna.Trial, cfg: StudyConfig, m: Measurements, fixed: Measurements, pruner: RungPruner,
    student: torch.nn.Module, device: torch.device,
) -> None:
    """Store a trial stopped at a rung (its figures so far, the rung, rank and front, its known
    constraint violations) and raise :class:`optuna.TrialPruned`."""
    d = pruner.pruned_at
    assert d is not None
    m.update(fixed)
    for name, value in m.to_user_attrs().items():
        trial.set_user_attr(name, value)
    trial.set_user_attr("pruned_rung", d.rung)
    trial.set_user_attr("pruned_rung_index", d.rung_index)
    trial.set_user_attr("pruned_rank", d.rank)
    trial.set_user_attr("pruned_front", d.front)
    trial.set_user_attr("prune_reason", d.reason)
    cons, _ = _known_violations(cfg, m)
    for metric, violation in cons.items():
        trial.set_constraint(metric, violation)
    trial.set_user_attr("constraint_violations", cons)
    del student
    _free_device_memory(device)
    raise optuna.TrialPruned(f"pruned at rung {d.rung:.3g} of the box: {d.reason}")


def _kd_history(result: DistillResult) -> dict[str, Any]:
    """User attr ``kd_history``: the validation curve (training s, accuracy) and the loop's counts."""
    return {
        "val": [[round(t, 3), a] for t, a in result.val_history],
        "steps": result.steps,
        "epochs": result.epochs,
        "images_seen": result.images_seen,
        "final_train_loss": result.final_train_loss,
        "stopped_early": result.stopped_early,
        "stop_requested_s": result.stop_requested_s,
        "cooldown_s": result.cooldown_s,
        "teacher_forward_count": result.teacher_forward_count,
        "train_dtype": result.train_dtype,
        "eval_time_s": result.eval_time_s,
        "final_eval_time_s": result.final_eval_time_s,
        "evaluations": result.evaluations,
    }


def _store_kd_memory(m: Measurements, tracker: KDMemoryTracker) -> None:
    """``peak_kd_memory_mb`` (above the baseline) and ``peak_kd_memory_total_mb``, one method."""
    how = tracker.method()
    for name, value in (("peak_kd_memory_mb", tracker.value_mb), ("peak_kd_memory_total_mb", tracker.total_mb)):
        if value is not None:
            m.set(name, value, how)
        else:
            m.set_missing(name, str(tracker.reason or "no training segment was measured"), how)


def _store_kd_energy(m: Measurements, meter: EnergyMeter, result: DistillResult) -> None:
    """``kd_energy_j`` over the training steps, per training image seen, and as mean power."""
    e = meter.result
    how = e.to_dict() if e is not None else None
    names = ("kd_energy_j", "kd_energy_mj_per_image", "kd_mean_power_w")
    if e is None or e.joules is None:
        reason = f"{e.method}: {e.reason}" if e is not None else "meter did not run"
        for name in names:
            m.set_missing(name, reason, how)
        return
    m.set("kd_energy_j", e.joules, how)
    if result.images_seen > 0:
        m.set("kd_energy_mj_per_image", e.joules * 1000.0 / result.images_seen,
              {**(how or {}), "images": result.images_seen})
    else:
        m.set_missing("kd_energy_mj_per_image", "no training image was seen", how)
    if e.mean_power_w is not None:
        m.set("kd_mean_power_w", e.mean_power_w, how)
    else:
        m.set_missing("kd_mean_power_w", "the window had no length", how)


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
