"""The time-boxed distillation loop: one flat function, read it top to bottom.

Time accounting (the contract every caller relies on):

* The box ``time_box_s`` is a budget of *training* time. ``kd_time_s`` is the training time
  actually used (``time.perf_counter``; on CUDA the device is synchronised at every boundary
  where time is read for the record: start, each evaluation, the end).
* Validation passes are *not* training time: the clock pauses around them, so they neither count
  in ``kd_time_s`` nor move the LR schedule. The wall-clock length of a call is therefore
  ``kd_time_s`` + evaluation time (+ set-up); the trial supervisor's grace period covers that.
* The LR is ``peak * lr_factor(elapsed / box)``: linear warm-up over ``warmup_fraction`` then a
  cosine to ``final_lr_fraction``, so every box length gets a complete schedule. The loop stops
  at the first step boundary where the elapsed training time reaches the box (so ``kd_time_s``
  exceeds the box by at most one step plus, on CUDA, the queued kernels), or earlier when a
  stopping rule asks to. With ``cfg.compile`` the compilation happens in the first steps and
  counts as training time: it is part of what distilling this student costs.
* Hooks (:mod:`kdsearch.distill.hooks`): ``on_eval(train_s, fraction, val_accuracy) -> stop?``
  runs after every validation while the clock is paused (except the final one after a plateau
  stop's cool-down: see below), so its cost is not training time; the
  plateau stop of ``cfg.early_stop`` is one, composed with the caller's. ``on_step(step, loss)
  -> loss`` runs inside the timed step, before the backward pass. ``stopped_early`` is True only
  when a rule stopped the loop while box time was left.
* A plateau stop (``cfg.early_stop``) is not a hard cut: the model it leaves is the trial's
  result, so the LR falls linearly from its current value to ``peak * final_lr_fraction`` over
  ``cfg.early_stop.cooldown_fraction`` of the box (at most what is left of it; no in-box
  evaluation meanwhile), then the final evaluation runs. The cool-down is training time
  (``kd_time_s`` includes it, ``cooldown_s`` says how much); with a cool-down of 0 the stopping
  evaluation is the final one. The stopping rules do not see that final evaluation: it is taken
  at no point of the box's schedule (a rung of ``eval_at`` that falls in the cool-down was never
  evaluated, and must not be scored by an annealed model). A stop asked by the caller's
  ``on_eval`` (a pruning rule: the trial is abandoned) ends the loop at once, and wins when both
  ask.
* Meters (:class:`~kdsearch.distill.hooks.TrainingMeter`, e.g. the KD memory peak and energy)
  are paused on entry (the set-up -- student moved, optimiser built -- is not training), resumed
  when the training clock starts, and paused with the clock around every validation, so they
  see the training steps only; the validation subset is copied inside each pause and freed.
* Precision (:mod:`kdsearch.distill.precision`): bf16 autocast on a CUDA device that supports
  it, fp16 autocast with a ``GradScaler`` on one that does not, fp32 without ``cfg.amp`` or on
  the CPU; ``train_dtype`` records which. Validation runs under ``torch.inference_mode`` in the
  same precision, at a batch no larger than the training batch (``min(eval_batch_size,
  cfg.batch_size)``), so it never needs more memory than a training step. In-box evaluations
  (plateau, rungs) see a fixed, seeded, stratified subset of val (``cfg.eval_subset`` images),
  the same for every trial; the final evaluation, the one that is stored, sees all of val.
* Per-step time checks read the host clock without synchronising (a sync per step would stall
  the launch queue); on CUDA the loss is read back, and checked for NaN/Inf, every
  ``_CUDA_CHECK_EVERY`` steps and at the end. On the CPU it is checked every step.

Data: each epoch draws ONE view per image. With a :class:`TeacherCache` that is a random stored
view id per image (``view_ids = randint(K)``), so the student sees exactly the pixels the teacher
saw; with an :class:`OnlineTeacher` or no teacher it is a fresh :func:`sample_views`. Both paths
pay the same per-step work for views (one gather) and augmentation (one :func:`apply_views`).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kdsearch.config import DistillConfig
from kdsearch.data import ViewSpec, apply_views, sample_views, stratified_subset
from kdsearch.distill.compile import CompileInfo, compile_for_training
from kdsearch.distill.hooks import EvalHook, PlateauStop, StepHook, TrainingMeter, any_stop, plain_step
from kdsearch.distill.loss import TopKTargets, kd_loss, kd_loss_topk
from kdsearch.distill.online import OnlineTeacher
from kdsearch.distill.precision import autocast_dtype, train_dtype_for
from kdsearch.distill.schedule import lr_factor
from kdsearch.distill.teacher_cache import TeacherCache
from kdsearch.errors import TrialFailure
from kdsearch.models import param_groups

if TYPE_CHECKING:
    from kdsearch.data import BatchSource, DataBundle, ImageSplit

__all__ = ["KDHyper", "DistillResult", "distill"]

_CUDA_CHECK_EVERY = 8  # steps between loss read-backs (NaN check) on CUDA
_PROGRESS_EVERY_S = 0.5  # seconds of training between progress callbacks


@dataclass(frozen=True)
class KDHyper:
    """Per-trial KD hyper-parameters (from the search space)."""

    temperature: float  # softmax temperature T (> 0)
    alpha: float  # weight of the soft (KL) term in [0, 1]; 1 - alpha weighs the hard CE
    lr: float  # peak learning rate


@dataclass
class DistillResult:
    kd_time_s: float  # training time used (evaluation excluded), <= box + one step
    steps: int
    epochs: float  # images_seen / train images
    images_seen: int
    final_train_loss: float  # mean over the last (up to) 50 steps
    val_history: list[tuple[float, float]] = field(default_factory=list)  # (training s, val accuracy)
    stopped_early: bool = False  # a stopping rule ended the loop before the box was used
    teacher_forward_count: int = 0  # teacher forward passes during this call (0 with a cache)
    # Accuracy of the last evaluation when it saw all of val (the final one, on the trained model);
    # None when the loop ended on a subset evaluation (a hard stop at a rung).
    final_val_accuracy: float | None = None
    train_dtype: str = "fp32"  # "bf16" | "fp16" (autocast + GradScaler) | "fp32"
    stop_requested_s: float | None = None  # training s at which a rule asked to stop (None: none did)
    cooldown_s: float = 0.0  # training s of LR cool-down after that request (part of kd_time_s)
    # Wall s of the validation passes (not training time): the in-box ones on the subset, and the
    # final one on all of val (0.0 when the loop ended on a subset evaluation).
    eval_time_s: float = 0.0
    final_eval_time_s: float = 0.0
    evaluations: int = 0  # validation passes, the final one included
    compile: CompileInfo | None = None  # distill.compile: compiled or why not, and the compile time

    def history(self) -> dict[str, Any]:
        """The record a trial stores (user attr ``kd_history``): the validation curve (training s,
        accuracy) and the loop's counts."""
        return {
            "val": [[round(t, 3), a] for t, a in self.val_history],
            "steps": self.steps,
            "epochs": self.epochs,
            "images_seen": self.images_seen,
            "final_train_loss": self.final_train_loss,
            "stopped_early": self.stopped_early,
            "stop_requested_s": self.stop_requested_s,
            "cooldown_s": self.cooldown_s,
            "teacher_forward_count": self.teacher_forward_count,
            "train_dtype": self.train_dtype,
            "eval_time_s": self.eval_time_s,
            "final_eval_time_s": self.final_eval_time_s,
            "evaluations": self.evaluations,
        }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def distill(
    student: nn.Module,
    *,
    train: BatchSource,
    val: ImageSplit,
    bundle: DataBundle,
    teacher_source: TeacherCache | OnlineTeacher | None,
    hyper: KDHyper,
    cfg: DistillConfig,
    time_box_s: float,
    resolution: int,
    device: torch.device | str,
    seed: int,
    view_spec: ViewSpec,
    progress: Callable[[float, str], None] | None = None,
    eval_batch_size: int = 512,
    on_eval: EvalHook | None = None,
    on_step: StepHook | None = None,
    meters: Sequence[TrainingMeter] = (),
    train_dtype: str | None = None,
    eval_at: Sequence[float] = (),
    max_steps: int | None = None,
) -> DistillResult:
    """Distil ``teacher_source`` into ``student`` (trained in place) for ``time_box_s`` of training.

    ``train`` yields ``(idx, images_u8, labels)`` on ``device`` (``idx`` indexes the train split
    and the cache); ``val`` is evaluated at every ``cfg.eval_every_fraction`` of the box, at each
    fraction in ``eval_at`` (e.g. the rungs of a pruning rule, which need not lie on that grid),
    and at the end; ``bundle`` gives the student normalisation (``mean``/``std``); ``view_spec`` is the
    augmentation family (it must equal the cache's). ``teacher_source`` None trains on labels
    only (CE). ``on_eval`` is a stopping rule, combined with ``cfg.early_stop`` when that is
    enabled; ``on_step`` sees (and may replace) each step's loss: see
    :mod:`kdsearch.distill.hooks`. ``meters`` are paused and resumed with the training clock.
    ``train_dtype`` overrides the precision :func:`~kdsearch.distill.precision.train_dtype_for`
    picks for ``device`` and ``cfg.amp``. ``max_steps`` ends the call after that many full
    training steps (or the box, whichever comes first), with no evaluation: the memory probe of
    :mod:`kdsearch.search.screening` asks for a few. Raises :class:`TrialFailure` ("diverged") on
    a NaN/Inf loss.
    """
    from kdsearch.measure import evaluate_accuracy  # noqa: PLC0415 - measure/ sits after distill/

    device = torch.device(device)
    on_cuda = device.type == "cuda"
    if time_box_s <= 0:
        raise ValueError(f"time_box_s must be > 0 s, got {time_box_s}")
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    n = train.num_images
    cached = isinstance(teacher_source, TeacherCache)
    if cached and teacher_source.view_spec != view_spec:
        raise ValueError(f"the teacher cache was built for {teacher_source.view_spec}, not {view_spec}")
    if cached and teacher_source.num_images != n:
        raise ValueError(f"the teacher cache holds {teacher_source.num_images} images, the train source {n}")

    # -- set-up (not timed, not metered: the student moved, the optimiser built) ------------------
    for meter in meters:
        meter.pause()
    torch.manual_seed(seed)
    view_gen = torch.Generator(device="cpu").manual_seed(seed)  # views / view ids, one draw per epoch
    order_gen = torch.Generator(device="cpu").manual_seed(seed + 1)  # batch order
    channels_last = on_cuda and cfg.channels_last
    dtype_name = (train_dtype or train_dtype_for(device, cfg.amp)) if on_cuda else "fp32"  # CPU: always fp32
    amp_dtype = autocast_dtype(dtype_name)
    use_amp = amp_dtype is not None
    # fp16 needs loss scaling (its range underflows small gradients); bf16 and fp32 do not.
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    if on_cuda:
        torch.backends.cudnn.benchmark = True  # fixed shapes (drop_last): tune conv algorithms once
    model = student.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    groups = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(groups, lr=hyper.lr, momentum=0.9, nesterov=True)
    else:
        opt = torch.optim.AdamW(groups, lr=hyper.lr)
    # distill.compile: compiled here, before the clock (set-up, inside the grace), or it says why not.
    train_model, compile_info = compile_for_training(
        model, (min(cfg.batch_size, n), 3, resolution, resolution), device, enabled=cfg.compile,
        amp_dtype=amp_dtype, channels_last=channels_last)
    batch_size = min(cfg.batch_size, n)  # drop_last with batch > N would yield nothing
    T, alpha, ls = float(hyper.temperature), float(hyper.alpha), float(cfg.label_smoothing)
    mean, std = bundle.mean, bundle.std
    check_every = _CUDA_CHECK_EVERY if on_cuda else 1
    forwards_before = teacher_source.teacher_forward_count if teacher_source is not None else 0
    plateau_stop = any_stop(PlateauStop.from_config(cfg.early_stop))  # cools down, then ends
    caller_stop = any_stop(on_eval)  # ends at once (pruning)
    step_hook = on_step or plain_step
    val_batch = max(1, min(eval_batch_size, batch_size))
    # In-box evaluations see a fixed stratified subset of val (cheap, and the same images for every
    # trial, so rung values compare); the final evaluation sees all of val. The subset is copied at
    # each evaluation, inside the meters' pause, so it never sits in the training memory window.
    interim_idx = None
    if cfg.eval_subset is not None and cfg.eval_subset < len(val):
        interim_idx = stratified_subset(val.labels.cpu(), cfg.eval_subset, seed=0)
    final_lr = hyper.lr * cfg.final_lr_fraction

    steps = images_seen = 0
    recent_losses: deque[torch.Tensor] = deque(maxlen=50)
    last_loss = float("nan")
    val_history: list[tuple[float, float]] = []
    final_val_acc: float | None = None
    stopped_early = False
    stop_at_s: float | None = None  # training s when a rule asked to stop: the cool-down starts
    cooldown_len_s = 0.0
    lr_at_stop = lr = hyper.lr
    end_s = time_box_s  # training time at which the loop ends (earlier after a stop request)
    extra_evals = sorted(float(f) for f in eval_at if 0.0 < f < 1.0)

    def next_eval_after(fraction: float) -> float:
        # The first point of the grid (every cfg.eval_every_fraction) or of eval_at past fraction.
        grid = (math.floor(fraction / cfg.eval_every_fraction) + 1) * cfg.eval_every_fraction
        return min([grid, *(f for f in extra_evals if f > fraction)])

    next_eval = next_eval_after(0.0)  # as a fraction of the box
    train_s = 0.0  # training time accumulated before the current segment
    last_progress = 0.0
    stop = False
    eval_s = final_eval_s = 0.0

    _sync(device)
    for meter in meters:  # the meters open with the training clock
        meter.resume()
    seg_start = time.perf_counter()
    while not stop:
        # One view per image for this epoch: a stored view (cache) or a fresh one.
        if cached:
            epoch_view_ids = torch.randint(teacher_source.num_views, (n,), generator=view_gen).to(device)
        else:
            epoch_views = sample_views(n, 1, view_spec, view_gen)[0].to(device)
        steps_at_epoch_start = steps
        for idx, images, labels in train.epoch(batch_size, order_gen, shuffle=True, drop_last=True):
            elapsed = train_s + time.perf_counter() - seg_start
            if stop_at_s is None:
                lr = hyper.lr * lr_factor(elapsed / time_box_s, cfg.warmup_fraction, cfg.final_lr_fraction)
            else:  # cooling down after a stop request: linear to the schedule's final LR
                done = min((elapsed - stop_at_s) / cooldown_len_s, 1.0) if cooldown_len_s > 0 else 1.0
                lr = lr_at_stop + (final_lr - lr_at_stop) * done
            for g in opt.param_groups:
                g["lr"] = lr

            if cached:
                view_ids = epoch_view_ids[idx]
                views = teacher_source.views[view_ids, idx]
                targets = teacher_source.teacher_targets(view_ids, idx)
            else:
                views = epoch_views[idx]
                targets = teacher_source.teacher_logits(views, images) if teacher_source is not None else None
            x = apply_views(images, views, view_spec, resolution, mean, std, channels_last=channels_last)
            with torch.autocast("cuda", dtype=amp_dtype or torch.bfloat16, enabled=use_amp):
                logits = train_model(x)
            if isinstance(targets, TopKTargets):
                loss = kd_loss_topk(
                    logits, targets.values, targets.indices, targets.rest_logit, labels, T, alpha, ls
                )
            else:
                loss = kd_loss(logits, targets, labels, T, alpha, ls)
            steps += 1
            loss = step_hook(steps, loss)

            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()  # the identity unless fp16
            scaler.step(opt)
            scaler.update()
            images_seen += int(labels.shape[0])
            recent_losses.append(loss.detach())
            if steps % check_every == 0:
                last_loss = float(loss.item())
                if not math.isfinite(last_loss):
                    raise TrialFailure(
                        "diverged", f"loss {last_loss} at step {steps} (lr {lr:.3g}, T {T}, alpha {alpha})"
                    )

            if max_steps is not None and steps >= max_steps:  # the steps asked for: end, no evaluation
                _sync(device)
                train_s += time.perf_counter() - seg_start
                for meter in meters:
                    meter.pause()
                stop = True
                break
            elapsed = train_s + time.perf_counter() - seg_start
            stop = elapsed >= end_s
            if stop or (stop_at_s is None and elapsed >= next_eval * time_box_s):
                _sync(device)
                train_s += time.perf_counter() - seg_start  # pause the clock for evaluation
                for meter in meters:
                    meter.pause()
                eval_start = time.perf_counter()
                split = val if stop or interim_idx is None else val.subset(interim_idx)
                acc = evaluate_accuracy(model, split, resolution, mean, std, device, val_batch,
                                        autocast_dtype=amp_dtype)
                this_eval_s = time.perf_counter() - eval_start  # evaluate_accuracy reads back: synced
                eval_s += this_eval_s
                if split is val:
                    final_eval_s = this_eval_s
                final_val_acc = acc if split is val else None
                del split  # the subset copy is freed before training resumes
                model.train()
                val_history.append((train_s, acc))
                # Every rule sees every evaluation (stateful rules never miss one) until a stop was
                # requested: the final evaluation after a cool-down is not taken at any point of the
                # box's schedule (a rung in the cool-down was never evaluated), and it is annealed.
                asked = stop_at_s is not None
                plateau = not asked and plateau_stop(train_s, train_s / time_box_s, acc)
                abandon = not asked and caller_stop(train_s, train_s / time_box_s, acc)
                if (plateau or abandon) and not stop:  # only while box time is left
                    stopped_early = True
                    stop_at_s, lr_at_stop = train_s, lr
                    cooldown_len_s = 0.0 if abandon else min(
                        cfg.early_stop.cooldown_fraction * time_box_s, time_box_s - train_s
                    )
                    end_s = train_s + cooldown_len_s
                    stop = cooldown_len_s <= 0
                next_eval = next_eval_after(train_s / time_box_s)
                if progress is not None:
                    progress(
                        min(train_s / time_box_s, 1.0), f"step {steps} loss {last_loss:.3f} val {acc:.3f}"
                    )
                    last_progress = train_s
                if not stop:
                    for meter in meters:
                        meter.resume()
                seg_start = time.perf_counter()
            elif progress is not None and elapsed - last_progress >= _PROGRESS_EVERY_S:
                progress(elapsed / time_box_s, f"step {steps} loss {last_loss:.3f}")
                last_progress = elapsed
            if stop:
                break
        if steps == steps_at_epoch_start:
            raise RuntimeError(f"the train source yielded no batch of {batch_size} images (it holds {n})")

    # The clock was stopped at the final evaluation; check the steps since the last read-back.
    final_loss = (
        float(torch.stack(list(recent_losses)).float().mean().item()) if recent_losses else float("nan")
    )
    if not math.isfinite(final_loss):
        raise TrialFailure(
            "diverged", f"loss {final_loss} in the last {len(recent_losses)} steps (lr peak {hyper.lr:.3g})"
        )
    forwards = (teacher_source.teacher_forward_count - forwards_before) if teacher_source is not None else 0
    return DistillResult(
        kd_time_s=train_s,
        steps=steps,
        epochs=images_seen / n,
        images_seen=images_seen,
        final_train_loss=final_loss,
        val_history=val_history,
        stopped_early=stopped_early,
        teacher_forward_count=forwards,
        train_dtype=dtype_name,
        stop_requested_s=stop_at_s,
        cooldown_s=(train_s - stop_at_s) if stop_at_s is not None else 0.0,
        final_val_accuracy=final_val_acc,
        eval_time_s=eval_s,
        final_eval_time_s=final_eval_s if final_val_acc is not None else 0.0,
        evaluations=len(val_history),
        compile=compile_info,
    )
