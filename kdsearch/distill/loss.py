"""Hinton knowledge-distillation loss, dense and from a sparse (top-k) teacher cache.

Both losses are computed in fp32 whatever the autocast dtype of the logits:

    loss = alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, y)

KL is averaged over the batch ("batchmean"), the T^2 factor keeps the soft-target gradients on
the same scale as the hard-label gradients when T changes (Hinton et al., 2015).

Top-k ("sparse") teacher targets
--------------------------------
For large label spaces the cache stores, per view, the teacher's k largest logits (values and
class indices) and one number for everything else: ``rest_logit = logsumexp`` of the other
``m = C - k`` logits at T = 1. The loss runs over k + 1 buckets (the top-k classes plus "rest"):

* teacher: the top-k buckets get logits ``v_i / T``; the rest bucket is approximated as ``m``
  classes that share one equal logit ``r = rest_logit - log(m)`` (the value that reproduces the
  stored logsumexp), so its logit at temperature T is ``log(m) + r / T``. At T = 1 this is exact:
  the rest bucket carries exactly the teacher's remaining probability mass. At T > 1 it
  over-estimates the rest mass slightly (the power mean of order 1/T is below the arithmetic
  mean), at T < 1 it under-estimates it; the top-k buckets keep their exact relative shape.
* student: its full softmax at temperature T, the top-k classes taken as they are and the rest
  bucket = 1 - sum of its top-k probabilities, computed exactly and stably as the logsumexp of the
  student's non-top-k logits (no subtraction of probabilities).

With k = C the rest bucket is empty (``rest_logit = -inf``) and the loss equals :func:`kd_loss`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["TopKTargets", "kd_loss", "kd_loss_topk"]


@dataclass
class TopKTargets:
    """Sparse teacher targets for a batch: top-k logits, their classes, and the rest logsumexp."""

    values: torch.Tensor  # float32 [B, k], teacher logits at T = 1
    indices: torch.Tensor  # int64 [B, k], class ids of ``values``
    rest_logit: torch.Tensor  # float32 [B], logsumexp of the other C - k logits at T = 1 (-inf if k = C)


def _hard_loss(student: torch.Tensor, labels: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    return F.cross_entropy(student, labels, label_smoothing=label_smoothing)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Scalar KD loss (fp32). ``teacher_logits`` None -> plain cross-entropy (alpha ignored)."""
    s = student_logits.float()
    hard = _hard_loss(s, labels, label_smoothing)
    if teacher_logits is None:
        return hard
    t = teacher_logits.float()
    log_s = F.log_softmax(s / temperature, dim=1)
    log_t = F.log_softmax(t / temperature, dim=1)
    soft = F.kl_div(log_s, log_t, reduction="batchmean", log_target=True)
    return alpha * temperature * temperature * soft + (1.0 - alpha) * hard


def kd_loss_topk(
    student_logits: torch.Tensor,
    topk_values: torch.Tensor,
    topk_indices: torch.Tensor,
    rest_logit: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Scalar KD loss (fp32) against top-k teacher targets plus a "rest" bucket (module docstring)."""
    s = student_logits.float()
    hard = _hard_loss(s, labels, label_smoothing)
    num_classes = s.shape[1]
    k = topk_values.shape[1]
    rest_count = num_classes - k
    idx = topk_indices.long()
    T = float(temperature)

    s_T = s / T
    log_z = torch.logsumexp(s_T, dim=1, keepdim=True)
    t_logits = topk_values.float() / T
    s_logp = s_T.gather(1, idx) - log_z
    if rest_count > 0:
        # Teacher rest bucket: m equal logits r = rest_logit - log(m), at temperature T.
        t_rest = math.log(rest_count) + (rest_logit.float() - math.log(rest_count)) / T
        t_logits = torch.cat([t_logits, t_rest[:, None]], dim=1)
        # Student rest bucket, exact: logsumexp of its non-top-k logits (no 1 - sum(p) cancellation).
        s_rest = torch.logsumexp(s_T.scatter(1, idx, float("-inf")), dim=1, keepdim=True) - log_z
        s_logp = torch.cat([s_logp, s_rest], dim=1)
    # k = C: no rest bucket, and the top-k buckets are all C classes -> exactly kd_loss.
    log_t = torch.log_softmax(t_logits, dim=1)
    soft = F.kl_div(s_logp, log_t, reduction="batchmean", log_target=True)
    return alpha * T * T * soft + (1.0 - alpha) * hard
