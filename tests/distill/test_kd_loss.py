"""kd_loss and kd_loss_topk against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from kdsearch.distill import kd_loss, kd_loss_topk


def _by_hand(s: list[list[float]], t: list[list[float]], y: list[int], T: float, alpha: float) -> float:
    """alpha * T^2 * mean_b KL(p_t || p_s) + (1 - alpha) * mean_b CE, with plain Python floats."""

    def softmax(row: list[float], temp: float) -> list[float]:
        m = max(row)
        e = [math.exp((v - m) / temp) for v in row]
        z = sum(e)
        return [v / z for v in e]

    kl = ce = 0.0
    for srow, trow, label in zip(s, t, y, strict=True):
        ps, pt = softmax(srow, T), softmax(trow, T)
        kl += sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps, strict=True))
        ce += -math.log(softmax(srow, 1.0)[label])
    n = len(s)
    return alpha * T * T * kl / n + (1 - alpha) * ce / n


S = [[1.0, 2.0, 0.5, -1.0], [0.0, -0.5, 3.0, 1.0], [2.0, 2.0, 2.0, 0.0]]
TT = [[0.5, 3.0, 0.0, -2.0], [1.0, 0.0, 2.0, 2.5], [-1.0, 4.0, 1.0, 0.0]]
Y = [1, 2, 0]


@pytest.mark.parametrize("T,alpha", [(1.0, 0.5), (4.0, 0.9), (2.5, 1.0), (0.5, 0.3)])
def test_kd_loss_matches_hand_computation(T: float, alpha: float) -> None:
    got = kd_loss(torch.tensor(S), torch.tensor(TT), torch.tensor(Y), T, alpha)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(_by_hand(S, TT, Y, T, alpha), rel=1e-5)


def test_alpha_zero_and_no_teacher_are_cross_entropy() -> None:
    s, t, y = torch.tensor(S), torch.tensor(TT), torch.tensor(Y)
    ce = torch.nn.functional.cross_entropy(s, y)
    assert kd_loss(s, t, y, 4.0, 0.0).item() == pytest.approx(ce.item(), rel=1e-6)
    assert kd_loss(s, None, y, 4.0, 0.9).item() == pytest.approx(ce.item(), rel=1e-6)
    smoothed = torch.nn.functional.cross_entropy(s, y, label_smoothing=0.1)
    assert kd_loss(s, None, y, 4.0, 0.9, label_smoothing=0.1).item() == pytest.approx(
        smoothed.item(), rel=1e-6
    )


def test_soft_term_is_scaled_by_t_squared() -> None:
    s, t, y = torch.tensor(S), torch.tensor(TT), torch.tensor(Y)
    for T in (1.0, 2.0, 8.0):
        kl = _by_hand(S, TT, Y, T, 1.0) / (T * T)  # the unscaled KL at temperature T
        assert kd_loss(s, t, y, T, 1.0).item() == pytest.approx(T * T * kl, rel=1e-5)
    # Identical logits: no soft loss at any temperature.
    assert kd_loss(s, s.clone(), y, 4.0, 1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_low_precision_inputs_are_computed_in_fp32() -> None:
    s, t, y = torch.tensor(S), torch.tensor(TT), torch.tensor(Y)
    got = kd_loss(s.bfloat16(), t.half(), y, 4.0, 0.9)
    assert got.dtype == torch.float32
    ref = kd_loss(s.bfloat16().float(), t.half().float(), y, 4.0, 0.9)
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)


def _topk_targets(t: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    vals, idx = t.topk(k, dim=1)
    if k == t.shape[1]:
        rest = torch.full((t.shape[0],), float("-inf"))
    else:
        rest = torch.logsumexp(t.scatter(1, idx, float("-inf")), dim=1)
    return vals, idx, rest


@pytest.mark.parametrize("T,alpha", [(1.0, 0.5), (4.0, 0.9), (0.7, 1.0)])
def test_topk_with_k_equal_c_is_the_dense_loss(T: float, alpha: float) -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(16, 10, generator=g, requires_grad=True)
    t = 3 * torch.randn(16, 10, generator=g)
    y = torch.randint(0, 10, (16,), generator=g)
    vals, idx, rest = _topk_targets(t, 10)
    sparse = kd_loss_topk(s, vals, idx, rest, y, T, alpha)
    dense = kd_loss(s, t, y, T, alpha)
    assert sparse.item() == pytest.approx(dense.item(), rel=1e-5)
    (g_sparse,) = torch.autograd.grad(sparse, s)
    (g_dense,) = torch.autograd.grad(dense, s)
    assert torch.isfinite(g_sparse).all()
    torch.testing.assert_close(g_sparse, g_dense, rtol=1e-4, atol=1e-6)


def _bucketed_kl(s: torch.Tensor, t: torch.Tensor, idx: torch.Tensor, T: float) -> torch.Tensor:
    """Exact KL over (top-k classes + one bucket holding the rest), from the full teacher logits."""
    pt, ps = torch.softmax(t / T, 1), torch.softmax(s / T, 1)

    def bucket(p: torch.Tensor) -> torch.Tensor:
        top = p.gather(1, idx)
        return torch.cat([top, 1 - top.sum(1, keepdim=True)], 1)

    bt, bs = bucket(pt.double()), bucket(ps.double())
    return (bt * (bt.log() - bs.log())).sum(1).mean()


def test_topk_rest_bucket_is_exact_at_t1_and_close_elsewhere() -> None:
    g = torch.Generator().manual_seed(1)
    s = torch.randn(32, 20, generator=g)
    t = 2 * torch.randn(32, 20, generator=g)
    y = torch.randint(0, 20, (32,), generator=g)
    vals, idx, rest = _topk_targets(t, 5)
    at1 = kd_loss_topk(s, vals, idx, rest, y, 1.0, 1.0)
    assert at1.item() == pytest.approx(_bucketed_kl(s, t, idx, 1.0).item(), rel=1e-5)
    # At T != 1 the equal-logit rest is an approximation: close to, not equal to, the exact bucket KL.
    at4 = kd_loss_topk(s, vals, idx, rest, y, 4.0, 1.0) / 16
    exact4 = _bucketed_kl(s, t, idx, 4.0).item()
    assert at4.item() == pytest.approx(exact4, rel=0.5)
    assert at4.item() != pytest.approx(exact4, rel=1e-3)


def test_topk_is_exact_at_any_t_when_the_rest_logits_are_equal() -> None:
    g = torch.Generator().manual_seed(2)
    s = torch.randn(8, 12, generator=g)
    t = torch.zeros(8, 12)
    t[:, :3] = 3 + torch.rand(8, 3, generator=g)  # top-3 distinct, the other 9 all equal to 0
    y = torch.zeros(8, dtype=torch.long)
    vals, idx, rest = _topk_targets(t, 3)
    for T in (0.5, 2.0, 6.0):
        got = kd_loss_topk(s, vals, idx, rest, y, T, 1.0).item() / (T * T)
        assert got == pytest.approx(_bucketed_kl(s, t, idx, T).item(), rel=1e-5)
