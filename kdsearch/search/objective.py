"""One trial, top to bottom: :func:`run_trial`, the objective, reads as its phases.

1. **Prepare**: the proposal (:func:`kdsearch.search.space.suggest`), what the trial is (stored
   first, so the supervisor's hard limit reads this trial's own box), the untrained student.
2. **Fixed costs and screen** (:mod:`kdsearch.search.screening`): everything that depends on the
   architecture only, measured once on the untrained student; a constraint they break ends the
   trial before training (PRUNED, ``screened: true``, infeasible with the reason).
3. **Probe** (:func:`kdsearch.search.screening.memory_probe`, CUDA only): a few real training
   steps give ``probe_peak_memory_mb``; out of memory or over ``peak_kd_memory_mb``, the trial
   ends the same way.
4. **Box with rungs**: :func:`kdsearch.distill.distill` for the trial's box, with the rung pruner
   of ``study.pruning`` as its ``on_eval`` hook (:mod:`kdsearch.search.pruning`); a trial
   stopped at a rung is stored PRUNED with its partial curve and the decision.
5. **Final measures**: accuracy on val (selection) and test (reporting only), the fine-tune
   stage when ``finetune.enabled``; the meters turn their own readings into metrics
   (:meth:`kdsearch.measure.KDMemoryTracker.store_metrics`,
   :func:`kdsearch.measure.energy.kd_energy_metrics`).
6. **Store**: every metric as a user attr, the constraint verdict (``trial.set_constraint``;
   :mod:`kdsearch.trial_record`), the student checkpoint as an Optuna artifact; the objective
   values are returned.

What the figures include (see also the metric registry, :mod:`kdsearch.metrics`):

* ``peak_kd_memory_mb`` / ``peak_kd_memory_total_mb``: the allocator peak of the KD training
  steps (the loop pauses the tracker around every validation), above the baseline resident at
  trial start and for the whole process. The teacher leaves the device once its logit cache is
  built, so the baseline is the data and the cache.
* ``kd_energy_j``, ``kd_energy_mj_per_image``, ``kd_mean_power_w``: energy of the same training
  steps, per training image seen, and as mean power.
* Selection figures come from the validation split; test figures are stored beside them for
  reporting only (``test_accuracy``; with ``finetune.enabled`` the fine-tune stage stores
  ``pre_ft_val_accuracy`` / ``post_ft_val_accuracy`` / ``ft_gain_val`` and, for reports,
  ``pre_ft_accuracy`` / ``post_ft_accuracy`` / ``ft_gain`` on test).
* Precision: ``train_dtype`` is chosen once per worker (:mod:`kdsearch.search.worker_setup`),
  used for the teacher's cache and every trial, and stored. GPU sharing: the number of workers
  on the worker's GPU (``study.share_gpu``) is stored with every trial (``gpu_sharing``).

A failure inside a trial becomes :class:`~kdsearch.errors.TrialFailure` with ``fail_reason``
stored on the trial; a pruned or screened trial raises :class:`optuna.TrialPruned` after storing
its record; the worker tells either.

A **rehearsal** (the study's ``rehearsal`` section, :mod:`kdsearch.search.rehearsal`) replays the
nearest recorded trial instead of training: one branch per phase below (no student is built; the
row's fixed costs; no probe; the row's curve through the same ``on_eval`` hook; the row's
accuracies; no checkpoint). Screening, the rung pruner, the verdict and the store are the same.
"""

from __future__ import annotations

import copy
import math
import tempfile
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.artifacts import upload_artifact

from kdsearch import trial_record as tr
from kdsearch.checkpoint import save_student
from kdsearch.distill import DistillResult, FaultInjector, distill
from kdsearch.distill.precision import autocast_dtype
from kdsearch.errors import TrialFailure
from kdsearch.measure import (
    EnergyMeter,
    KDMemoryTracker,
    Measurements,
    collect_environment,
    environment_diff,
    evaluate_accuracy,
)
from kdsearch.measure.energy import kd_energy_metrics
from kdsearch.models import build_student
from kdsearch.search.pruning import RungPruner, pruning_record, rung_pruner, store_pruned
from kdsearch.search.rehearsal import Rehearsal, recorded_fixed_costs, rehearsed_row, replay_trial_box
from kdsearch.search.screening import (
    PROBE_STEPS,
    UNTRAINED_NOTE,
    fixed_cost_screen,
    measure_fixed_costs,
    memory_probe,
    screen_out,
)
from kdsearch.search.space import Proposal, suggest
from kdsearch.search.worker_setup import (
    PreparedTeacher,
    ProgressFn,
    WorkerContext,
    free_device_memory,
    no_progress,
)
from kdsearch.storage import artifact_store

__all__ = ["run_trial", "PROBE_STEPS", "UNTRAINED_NOTE"]


def run_trial(ctx: WorkerContext, trial: optuna.Trial, progress: ProgressFn = no_progress) -> list[float]:
    """The objective. Returns the objective values in the study's order, or raises TrialFailure
    (stored FAIL) or :class:`optuna.TrialPruned` (screened before the box, or stopped at a rung)."""
    cfg, device = ctx.cfg, ctx.device
    # 1. Prepare (a rehearsal: the recorded row this proposal replays, and no student).
    proposal = suggest(trial, cfg, ctx.num_classes)
    spec, hyper = proposal.spec, proposal.hyper
    seed = cfg.study.seed * 100_003 + trial.number
    teacher = ctx.teachers.get(proposal.teacher.display_name)  # None in a rehearsal
    row = rehearsed_row(ctx.rehearsal, trial, proposal)
    student = _prepare(ctx, trial, proposal, seed) if row is None else None

    # 2. Fixed costs, on the untrained student (or the row's), then the constraints they decide.
    progress("measure", 0.0, "fixed costs of the untrained student")
    if row is not None:
        fixed = recorded_fixed_costs(row, ctx.rehearsal.table.path)
    else:
        fixed = measure_fixed_costs(ctx, student, spec.resolution)
    if (screened := fixed_cost_screen(cfg, fixed)) is not None:
        screen_out(trial, cfg, fixed, *screened)

    # 3. The fail-fast memory probe (CUDA only; none in a rehearsal).
    if student is not None and teacher is not None:
        if (screened := memory_probe(ctx, student, spec, teacher, hyper, seed, fixed)) is not None:
            screen_out(trial, cfg, fixed, *screened)

    # 4. The box, with the rung pruner when study.pruning is on (a rehearsal replays the row's).
    pruner = rung_pruner(trial, cfg, fixed.values, proposal.box_s)
    if row is not None and ctx.rehearsal is not None:
        m, result = replay_trial_box(ctx.rehearsal, cfg, trial, proposal, row, pruner, progress)
        if pruner is not None:
            trial.set_user_attr(tr.PRUNING, pruning_record(pruner, cfg.distill.eval_every_fraction))
    else:
        assert student is not None and teacher is not None
        m, result = _train_box(ctx, trial, proposal, teacher, student, seed, pruner, progress)
    if pruner is not None and pruner.pruned_at is not None:
        if student is not None:
            del student  # the last reference: only now can the allocator's cache be freed
            free_device_memory(device)
        store_pruned(trial, cfg, m, fixed, pruner)  # raises TrialPruned

    # 5. Final measures; latency, size, inference memory and energy were measured before KD.
    if row is not None:
        Rehearsal.final_accuracy(row, m)
    else:
        assert student is not None
        _final_measures(ctx, student, proposal, seed, result, m, progress)
    m.update(fixed)

    # 6. Store (a rehearsal has no checkpoint).
    try:
        values = _store(ctx, trial, proposal, student, m, progress)
    finally:
        if student is not None:
            del student  # the last reference, also when an objective is missing
            free_device_memory(device)
    progress("done", 1.0, "")
    return values


def _fail(trial: optuna.Trial, reason: str, detail: str, attrs: dict[str, Any] | None = None) -> TrialFailure:
    """Store the failure record (and ``attrs``) on ``trial``; the error for the caller to raise."""
    tr.write(trial, {**tr.failure_attrs(reason, detail), **(attrs or {})})
    return TrialFailure(reason, detail, attrs)


def _prepare(ctx: WorkerContext, trial: optuna.Trial, proposal: Proposal, seed: int) -> torch.nn.Module:
    """Store what the trial is (first, so the supervisor's hard limit, box + grace, reads this
    trial's own box from storage) and build the untrained student (seeded)."""
    spec, hyper = proposal.spec, proposal.hyper
    tr.write(trial, {
        tr.BOX_S: proposal.box_s, tr.SPEC: spec.to_dict(), tr.SIZE_BY: spec.size_by(), tr.STUDENT: spec.label,
        tr.TEACHER: proposal.teacher.display_name, tr.TEACHER_NAME: proposal.teacher.name,
        tr.TEACHER_MODE: proposal.teacher.mode, tr.TEMPERATURE: hyper.temperature, tr.ALPHA: hyper.alpha,
        tr.LR: hyper.lr, tr.DATASET: ctx.cfg.data.dataset, tr.DEVICE: str(ctx.device),
        tr.TRAIN_DTYPE: ctx.train_dtype, tr.GPU_SHARING: ctx.gpu_sharing,
    })
    if ctx.device_info:
        trial.set_user_attr(tr.DEVICE_INFO, ctx.device_info)
    torch.manual_seed(seed)
    try:
        return build_student(spec)
    except Exception as exc:  # noqa: BLE001 - a student that cannot be built is this trial's failure
        raise _fail(trial, "error", f"{type(exc).__name__}: {exc}") from None


def _fault(ctx: WorkerContext, trial: optuna.Trial) -> FaultInjector | None:
    """The test-only fault of ``debug.inject`` for this trial (None: no fault)."""
    inject = ctx.cfg.debug.inject
    if inject is None or (ctx.cfg.debug.inject_trial is not None and ctx.cfg.debug.inject_trial != trial.number):
        return None
    return FaultInjector(inject)


def _train_box(
    ctx: WorkerContext, trial: optuna.Trial, proposal: Proposal, teacher: PreparedTeacher, student: torch.nn.Module,
    seed: int, pruner: RungPruner | None, progress: ProgressFn,
) -> tuple[Measurements, DistillResult]:
    """Distil ``student`` for the trial's box; store its curve (and the pruner's record). Returns
    the KD figures (``kd_time_s``, KD memory and energy) and the loop's result; a training error
    fails the trial."""
    cfg, device, spec, box_s = ctx.cfg, ctx.device, proposal.spec, proposal.box_s
    kd_memory = KDMemoryTracker(device)
    kd_energy = EnergyMeter.for_device(device, cfg.measure.energy.poll_interval_s)
    try:
        progress("distil", 0.0, spec.label)
        with kd_memory, kd_energy:  # both paused by distill() around every validation
            result: DistillResult = distill(
                student, train=ctx.train_source, val=ctx.bundle.val, bundle=ctx.bundle,
                teacher_source=teacher.source, hyper=proposal.hyper, cfg=cfg.distill, time_box_s=box_s,
                resolution=spec.resolution, device=device, seed=seed, view_spec=ctx.view_spec,
                progress=lambda frac, msg: progress("distil", frac, msg),
                eval_batch_size=cfg.measure.eval_batch_size, on_eval=pruner, on_step=_fault(ctx, trial),
                meters=(kd_memory, kd_energy), train_dtype=ctx.train_dtype,
                eval_at=pruner.config.rungs if pruner is not None else (),  # every rung is evaluated too
            )
    except TrialFailure as exc:
        raise _fail(trial, exc.reason, exc.detail, exc.attrs) from None
    except torch.OutOfMemoryError as exc:
        free_device_memory(device)
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise _fail(trial, "oom", f"{type(exc).__name__}: {first}", {
            "peak_kd_memory_mb": kd_memory.value_mb, "peak_kd_memory_total_mb": kd_memory.total_mb,
        }) from None
    except Exception as exc:  # noqa: BLE001 - any other error is data for this trial
        free_device_memory(device)
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
    kd_memory.store_metrics(m)
    kd_energy_metrics(kd_energy.result, result.images_seen, m)
    trial.set_user_attr(tr.KD_HISTORY, result.history())
    if result.compile is not None:  # compiled (bool), compile_reason, compile_time_s (outside the box)
        tr.write(trial, result.compile.to_attrs())
    if pruner is not None:
        trial.set_user_attr(tr.PRUNING, pruning_record(pruner, cfg.distill.eval_every_fraction))
    return m, result


def _final_measures(
    ctx: WorkerContext, student: torch.nn.Module, proposal: Proposal, seed: int, result: DistillResult,
    m: Measurements, progress: ProgressFn,
) -> None:
    """Set the accuracies of the trained ``student`` in ``m``: val (selection) and test (reporting
    only), and the fine-tune stage's when ``finetune.enabled``."""
    cfg, device, bundle, res = ctx.cfg, ctx.device, ctx.bundle, proposal.spec.resolution
    progress("measure", 0.0, "accuracy")
    student.eval()
    # The training precision, at a batch no larger than the training batch: what fits for
    # training fits for evaluation (measure.eval_batch_size caps it).
    batch = max(1, min(cfg.measure.eval_batch_size, cfg.distill.batch_size))
    amp = autocast_dtype(result.train_dtype)
    acc_method = {"method": "top-1 on the held-out split, inference mode", "resolution": res,
                  "dtype": result.train_dtype, "batch_size": batch}

    def accuracy(model: torch.nn.Module, split: Any) -> float:
        return evaluate_accuracy(model, split, res, bundle.mean, bundle.std, device, batch, autocast_dtype=amp)

    # distill()'s final evaluation already ran on all of val with this precision and batch, on the
    # model as it is now: reuse it rather than evaluating val twice.
    val_acc = result.final_val_accuracy
    if val_acc is None:
        val_acc = accuracy(student, bundle.val)
    m.set("val_accuracy", val_acc, {**acc_method, "split": "val", "n": len(bundle.val)})
    m.set("test_accuracy", accuracy(student, bundle.test),
          {**acc_method, "split": "test", "n": len(bundle.test), "use": "reporting only"})
    if not (cfg.finetune.enabled and bundle.finetune is not None):
        return
    from kdsearch.distill.head import train_head

    ft = cfg.finetune
    progress("finetune", 0.0, f"{ft.epochs} epochs")
    # A copy: the stored checkpoint and the figures above are the distilled student's.
    tuned = copy.deepcopy(student).to(device)
    pre_val, pre_test = val_acc, m.values["test_accuracy"]
    train_head(tuned, bundle.finetune, res, bundle.mean, bundle.std, epochs=ft.epochs, lr=ft.lr,
               batch_size=ft.batch_size, unfreeze_last_block=ft.unfreeze_last_block, device=device, seed=seed)
    post_val, post_test = accuracy(tuned, bundle.val), accuracy(tuned, bundle.test)
    del tuned
    ft_base = {"method": "frozen features, head trained on the finetune split", "epochs": ft.epochs,
               "lr": ft.lr, "n_train": len(bundle.finetune), "dtype": result.train_dtype}
    ft_val = {**ft_base, "split": "val", "n": len(bundle.val), "use": "selection"}
    ft_test = {**ft_base, "split": "test", "n": len(bundle.test), "use": "reporting only"}
    assert pre_val is not None and pre_test is not None
    m.set("pre_ft_val_accuracy", pre_val, ft_val)
    m.set("post_ft_val_accuracy", post_val, ft_val)
    m.set("ft_gain_val", post_val - pre_val, ft_val)
    m.set("pre_ft_accuracy", pre_test, ft_test)
    m.set("post_ft_accuracy", post_test, ft_test)
    m.set("ft_gain", post_test - pre_test, ft_test)


def _store(
    ctx: WorkerContext, trial: optuna.Trial, proposal: Proposal, student: torch.nn.Module | None, m: Measurements,
    progress: ProgressFn,
) -> list[float]:
    """Store every figure, the constraint verdict and the checkpoint (none in a rehearsal:
    ``student`` None); return the objective values (a missing objective fails the trial, after
    the rest is stored)."""
    cfg, spec = ctx.cfg, proposal.spec
    diff = environment_diff(ctx.environment, collect_environment(ctx.device))
    tr.write(trial, m.to_user_attrs())
    if ctx.bundle is not None:
        trial.set_user_attr(tr.NORMALIZATION, {"mean": list(ctx.bundle.mean), "std": list(ctx.bundle.std)})
    if diff:
        trial.set_user_attr(tr.ENV_DIFF, diff)
    # Constraints: value minus limit, <= 0 is feasible. A missing constrained metric is
    # infeasible (a large positive violation) and the trial says why.
    verdict = tr.constraint_verdict(cfg.constraints, m.values, m.missing)
    for metric, violation in verdict.violations.items():
        trial.set_constraint(metric, violation)
    tr.write(trial, tr.verdict_attrs(verdict))

    if student is not None:
        progress("store", 0.9, "checkpoint")
        with tempfile.TemporaryDirectory(prefix="kdsearch-ckpt-") as tmp:
            path = Path(tmp) / f"trial-{trial.number}-{spec.label.replace('@', '_')}.safetensors"
            sha = save_student(student, spec, path,
                               {"teacher": proposal.teacher.display_name, "trial": str(trial.number)})
            artifact_id = upload_artifact(
                artifact_store=artifact_store(ctx.paths), file_path=str(path), study_or_trial=trial,
                mimetype="application/octet-stream",
            )
        tr.write(trial, {tr.ARTIFACT_ID: artifact_id, tr.WEIGHTS_SHA256: sha})

    out: list[float] = []
    for metric in cfg.metric_names:
        v = m.values.get(metric)
        if v is None or not math.isfinite(float(v)):
            raise _fail(trial, "missing_objective",
                        f"objective {metric} could not be measured: {m.missing.get(metric, 'not finite')}")
        out.append(float(v))
    return out
