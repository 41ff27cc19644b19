"""Training-free (zero-cost) scores of an untrained student, for the replay table of issue 21.

Each row of the hard replay table (``benchmarks/record_search_table.py --grid hard``) stores these
scores, computed before the student is trained, so ``benchmarks/zero_cost_report.py`` can tell
whether any of them predicts the trained student's accuracy (Spearman, beside the 1/27 rung).
Whether the search uses one (a prior for the sampler, a screen before the box) is decided by the
replay; until then they live here, with the benchmarks.

Two teacher-conditioned scores, after DisWOT (Dong et al., CVPR 2023: "DisWOT: Student
Architecture Search for Distillation WithOut Training"), which ranks students by how similar
their relation matrices are to the teacher's. DisWOT builds them from Grad-CAM maps and
features; the table only has the teacher's cached *logits*, so both are built from logits here:

* :func:`sample_relation_score`: the N x N sample-relation matrix (cosine similarities between the
  batch's images) of the student against the teacher's;
* :func:`class_relation_score`: the C x C class-relation matrix (how the classes' responses
  co-vary over the batch) of the student against the teacher's.

Both are the negated mean squared difference of the row-normalised matrices (DisWOT's
normalisation), so **higher is more teacher-like**, 0 at best. The logits are centred over the
batch first: an untrained head's bias gives every image nearly the same logit vector, and without
centring that constant would make every relation matrix all ones.

One general proxy: :func:`synflow_score`, SynFlow (Tanaka et al., NeurIPS 2020; as a zero-cost
proxy: Abdelfattah et al., ICLR 2021): the sum over conv and linear weights of
``|theta * dR/dtheta|`` where ``R`` is the sum of the outputs of the network with every parameter
replaced by its absolute value, fed an all-ones input, in float64 with normalisation layers in eval
mode. It needs no data and no labels, is deterministic, and costs one forward and one backward.
It is returned as log10 (the raw value spans hundreds of orders of magnitude), or None when it
cannot be computed in float64 (overflow), with the reason.

Every function works on a deep copy: the student passed in is left exactly as it was (weights,
BN statistics, mode), so recording a score does not change the row that is then trained, and
no function draws from the global RNG.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

__all__ = [
    "class_relation_matrix",
    "class_relation_score",
    "sample_relation_matrix",
    "sample_relation_score",
    "student_logits",
    "synflow_score",
    "zero_cost_scores",
]


def _row_normalise(m: torch.Tensor) -> torch.Tensor:
    """Each row scaled to unit L2 norm (an all-zero row stays zero)."""
    return m / m.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _centred(z: torch.Tensor) -> torch.Tensor:
    """``z`` ([N, C]) in float64, minus its mean over the batch."""
    if z.ndim != 2 or z.shape[0] < 2:
        raise ValueError(f"logits must be [N >= 2, C], got {tuple(z.shape)}")
    z = z.detach().to(torch.float64)
    return z - z.mean(dim=0, keepdim=True)


def sample_relation_matrix(z: torch.Tensor) -> torch.Tensor:
    """The N x N sample-relation matrix of logits ``z`` ([N, C]): cosine similarity between the
    batch-centred logit vectors of every pair of images, then row-normalised (DisWOT)."""
    zc = _row_normalise(_centred(z))
    return _row_normalise(zc @ zc.T)


def class_relation_matrix(z: torch.Tensor) -> torch.Tensor:
    """The C x C class-relation matrix of logits ``z`` ([N, C]): the Gram matrix of the classes'
    batch-centred responses over the N images, row-normalised (DisWOT's class Gram, from logits)."""
    zc = _centred(z)
    return _row_normalise(zc.T @ zc)


def sample_relation_score(student_z: torch.Tensor, teacher_z: torch.Tensor) -> float:
    """``-mean((A_s - A_t)^2)`` of the sample-relation matrices; higher is more teacher-like."""
    if student_z.shape != teacher_z.shape:
        raise ValueError(f"student logits {tuple(student_z.shape)} != teacher logits {tuple(teacher_z.shape)}")
    d = sample_relation_matrix(student_z) - sample_relation_matrix(teacher_z)
    return -float(d.pow(2).mean())


def class_relation_score(student_z: torch.Tensor, teacher_z: torch.Tensor) -> float:
    """``-mean((G_s - G_t)^2)`` of the class-relation matrices; higher is more teacher-like."""
    if student_z.shape != teacher_z.shape:
        raise ValueError(f"student logits {tuple(student_z.shape)} != teacher logits {tuple(teacher_z.shape)}")
    d = class_relation_matrix(student_z) - class_relation_matrix(teacher_z)
    return -float(d.pow(2).mean())


@torch.no_grad()
def student_logits(student: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The untrained student's logits for the batch ``x``, from a copy of it in train mode (batch
    statistics in its normalisation layers, as the first training step sees them) with dropout
    off, so the result is deterministic and ``student`` is untouched."""
    net = copy.deepcopy(student)
    net.train()
    for m in net.modules():
        if isinstance(m, nn.Dropout | nn.Dropout2d | nn.AlphaDropout):
            m.eval()
    return net(x).float()


def synflow_score(student: nn.Module, input_shape: tuple[int, int, int]) -> tuple[float | None, str | None]:
    """log10 of the SynFlow score of ``student`` for inputs of ``input_shape`` (C, H, W), and None;
    or None and the reason when it cannot be computed (overflow in float64, or no gradient).

    On a float64 copy in eval mode: every parameter replaced by its absolute value, an all-ones
    input, ``R = sum(outputs)``; the score is ``sum |theta * dR/dtheta|`` over the weights of the
    Conv2d and Linear layers. Taken in log space per layer, so one layer's overflow of the sum
    is the only way to fail.
    """
    net = copy.deepcopy(student).to(torch.float64)
    net.eval()
    with torch.no_grad():
        for p in net.parameters():
            p.abs_()
    net.zero_grad(set_to_none=True)
    x = torch.ones((1, *input_shape), dtype=torch.float64)
    out = net(x)
    r = out.sum()
    if not math.isfinite(float(r.detach())):
        return None, f"the linearised network's output overflows float64 ({float(r.detach())})"
    r.backward()
    logs: list[float] = []
    for m in net.modules():
        if isinstance(m, nn.Conv2d | nn.Linear) and m.weight.grad is not None:
            s = float((m.weight.detach() * m.weight.grad).abs().sum())
            if not math.isfinite(s):
                return None, f"a layer's score overflows float64 ({type(m).__name__} {tuple(m.weight.shape)})"
            if s > 0:
                logs.append(math.log10(s))
    if not logs:
        return None, "no conv or linear weight received a gradient"
    top = max(logs)
    return top + math.log10(sum(10 ** (v - top) for v in logs)), None


def zero_cost_scores(
    student: nn.Module, x: torch.Tensor, teacher_z: torch.Tensor
) -> dict[str, Any]:
    """Every score of this module for one untrained ``student``, batch ``x`` ([N, C, H, W], the
    student's input) and the teacher's logits ``teacher_z`` ([N, classes]) for the same images.

    Returns ``zc_sample_relation``, ``zc_class_relation``, ``zc_synflow_log10`` (None with
    ``zc_synflow_note`` when it cannot be computed), ``zc_n`` (the batch size) and ``zc_s`` (CPU
    seconds the three took).
    """
    import time  # noqa: PLC0415

    t0 = time.process_time()
    z = student_logits(student, x)
    syn, note = synflow_score(student, tuple(x.shape[1:]))
    out: dict[str, Any] = {
        "zc_sample_relation": round(sample_relation_score(z, teacher_z), 8),
        "zc_class_relation": round(class_relation_score(z, teacher_z), 8),
        "zc_synflow_log10": None if syn is None else round(syn, 6),
        "zc_n": int(x.shape[0]),
    }
    if note is not None:
        out["zc_synflow_note"] = note
    out["zc_s"] = round(time.process_time() - t0, 4)
    return out
