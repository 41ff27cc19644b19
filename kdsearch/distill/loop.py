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
  runs after every validation while the clock is paused, so its cost is not training time; the
  plateau stop of ``cfg.early_stop`` is one, composed with the caller's. ``on_step(step, loss)
  -> loss`` runs inside the timed step, before the backward pass. ``stopped_early`` is True only
  when a rule stopped the loop while box time was left.
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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from kdsearch.config import DistillConfig
from kdsearch.data import ViewSpec, apply_views, sample_views
from kdsearch.distill.hooks import EvalHook, PlateauStop, StepHook, any_stop, plain_step
from kdsearch.distill.loss import TopKTargets, kd_loss, kd_loss_topk
from kdsearch.distill.online import OnlineTeacher
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
    best_val_accuracy: float | None
    val_history: list[tuple[float, float]] = field(default_factory=list)  # (training s, val accuracy)
    stopped_early: bool = False  # a stopping rule ended the loop before the box was used
    teacher_forward_count: int = 0  # teacher forward passes during this call (0 with a cache)


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
) -> DistillResult:
    """Distil ``teacher_source`` into ``student`` (trained in place) for ``time_box_s`` of training.

    ``train`` yields ``(idx, images_u8, labels)`` on ``device`` (``idx`` indexes the train split
    and the cache); ``val`` is evaluated at every ``cfg.eval_every_fraction`` of the box and at
    the end; ``bundle`` gives the student normalisation (``mean``/``std``); ``view_spec`` is the
    augmentation family (it must equal the cache's). ``teacher_source`` None trains on labels
    only (CE). ``on_eval`` is a stopping rule, combined with ``cfg.early_stop`` when that is
    enabled; ``on_step`` sees (and may replace) each step's loss: see
    :mod:`kdsearch.distill.hooks`. Raises :class:`TrialFailure` ("diverged") on a NaN/Inf loss.
    """
    from kdsearch.measure import evaluate_accuracy  # noqa: PLC0415 - measure/ sits after distill/

    device = torch.device(device)
    on_cuda = device.type == "cuda"
    if time_box_s <= 0:
        raise ValueError(f"time_box_s must be > 0 s, got {time_box_s}")
    n = train.num_images
    cached = isinstance(teacher_source, TeacherCache)
    if cached and teacher_source.view_spec != view_spec:
        raise ValueError(f"the teacher cache was built for {teacher_source.view_spec}, not {view_spec}")
    if cached and teacher_source.num_images != n:
        raise ValueError(f"the teacher cache holds {teacher_source.num_images} images, the train source {n}")

    # -- set-up (not timed) --------------------------------------------------------------------
    torch.manual_seed(seed)
    view_gen = torch.Generator(device="cpu").manual_seed(seed)  # views / view ids, one draw per epoch
    order_gen = torch.Generator(device="cpu").manual_seed(seed + 1)  # batch order
    channels_last = on_cuda and cfg.channels_last
    use_amp = on_cuda and cfg.amp  # bf16 autocast; the CPU always trains in fp32
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
    train_model = torch.compile(model) if cfg.compile else model
    batch_size = min(cfg.batch_size, n)  # drop_last with batch > N would yield nothing
    T, alpha, ls = float(hyper.temperature), float(hyper.alpha), float(cfg.label_smoothing)
    mean, std = bundle.mean, bundle.std
    check_every = _CUDA_CHECK_EVERY if on_cuda else 1
    forwards_before = teacher_source.teacher_forward_count if teacher_source is not None else 0
    should_stop = any_stop(PlateauStop.from_config(cfg.early_stop), on_eval)
    step_hook = on_step or plain_step

    steps = images_seen = 0
    recent_losses: deque[torch.Tensor] = deque(maxlen=50)
    last_loss = float("nan")
    val_history: list[tuple[float, float]] = []
    best_acc: float | None = None
    stopped_early = False
    next_eval = cfg.eval_every_fraction  # as a fraction of the box
    train_s = 0.0  # training time accumulated before the current segment
    last_progress = 0.0
    stop = False

    _sync(device)
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
            lr = hyper.lr * lr_factor(elapsed / time_box_s, cfg.warmup_fraction, cfg.final_lr_fraction)
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
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
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
            loss.backward()
            opt.step()
            images_seen += int(labels.shape[0])
            recent_losses.append(loss.detach())
            if steps % check_every == 0:
                last_loss = float(loss.item())
                if not math.isfinite(last_loss):
                    raise TrialFailure(
                        "diverged", f"loss {last_loss} at step {steps} (lr {lr:.3g}, T {T}, alpha {alpha})"
                    )

            elapsed = train_s + time.perf_counter() - seg_start
            stop = elapsed >= time_box_s
            if stop or elapsed >= next_eval * time_box_s:
                _sync(device)
                train_s += time.perf_counter() - seg_start  # pause the clock for evaluation
                acc = evaluate_accuracy(model, val, resolution, mean, std, device, eval_batch_size)
                model.train()
                val_history.append((train_s, acc))
                best_acc = acc if best_acc is None else max(best_acc, acc)
                if should_stop(train_s, train_s / time_box_s, acc) and not stop:
                    stopped_early = stop = True  # only while box time is left
                next_eval = (
                    math.floor(train_s / time_box_s / cfg.eval_every_fraction) + 1
                ) * cfg.eval_every_fraction
                if progress is not None:
                    progress(
                        min(train_s / time_box_s, 1.0), f"step {steps} loss {last_loss:.3f} val {acc:.3f}"
                    )
                    last_progress = train_s
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
        best_val_accuracy=best_acc,
        val_history=val_history,
        stopped_early=stopped_early,
        teacher_forward_count=forwards,
    )
