"""Issue 21: the zero-cost scores of the hard replay table (``benchmarks/zero_cost.py``)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from zero_cost import (  # noqa: E402
    class_relation_matrix,
    class_relation_score,
    sample_relation_matrix,
    sample_relation_score,
    synflow_score,
    zero_cost_scores,
)


def _logits(n: int = 32, c: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, c, generator=torch.Generator().manual_seed(seed)) * 3


def test_relation_matrices_have_the_batch_and_class_shapes_and_unit_rows() -> None:
    z = _logits()
    a, g = sample_relation_matrix(z), class_relation_matrix(z)
    assert a.shape == (32, 32) and g.shape == (10, 10)
    assert torch.allclose(a.norm(dim=1), torch.ones(32, dtype=a.dtype))
    assert torch.allclose(g.norm(dim=1), torch.ones(10, dtype=g.dtype))


def test_a_student_with_the_teachers_relations_scores_best() -> None:
    t = _logits(seed=1)
    # the same logits up to a constant offset per class (an untrained head's bias) and a scale
    same = 2.0 * t + torch.arange(10.0)
    other = _logits(seed=2)
    for score in (sample_relation_score, class_relation_score):
        assert score(same, t) == pytest.approx(0.0, abs=1e-12)
        assert score(other, t) < -1e-4
        # closer to the teacher -> higher
        assert score(t + 0.3 * other, t) > score(t + 3.0 * other, t)


def test_mismatched_logits_are_refused() -> None:
    with pytest.raises(ValueError, match="teacher logits"):
        sample_relation_score(_logits(32), _logits(16))
    with pytest.raises(ValueError, match="N >= 2"):
        class_relation_matrix(torch.zeros(1, 10))


def test_synflow_of_a_linear_layer_is_the_sum_of_its_absolute_weights() -> None:
    lin = nn.Linear(3 * 2 * 2, 5, bias=False)
    net = nn.Sequential(nn.Flatten(), lin)
    # R = sum_j sum_i |W_ji| * 1, so dR/dW = 1 and the score is sum |W|
    expected = math.log10(float(lin.weight.detach().double().abs().sum()))
    got, note = synflow_score(net, (3, 2, 2))
    assert note is None and got == pytest.approx(expected, rel=1e-9)


def test_synflow_overflow_is_missing_with_a_reason() -> None:
    layers = [nn.Linear(4, 4, bias=False, dtype=torch.float64) for _ in range(3)]
    for lin in layers:
        nn.init.constant_(lin.weight, 1e120)
    got, note = synflow_score(nn.Sequential(nn.Flatten(), *layers), (4, 1, 1))
    assert got is None and "overflows float64" in note


def test_scores_leave_the_student_untouched_and_repeat_exactly() -> None:
    torch.manual_seed(0)
    student = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Dropout(0.5), nn.Linear(8, 10),
    )
    student.eval()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    t = _logits(16, seed=4)
    rng_before = torch.random.get_rng_state()
    first = zero_cost_scores(student, x, t)
    second = zero_cost_scores(student, x, t)
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert not student.training
    for k, v in student.state_dict().items():
        assert torch.equal(v, before[k]), k
    for key in ("zc_sample_relation", "zc_class_relation", "zc_synflow_log10"):
        assert first[key] == second[key] and math.isfinite(first[key]), key
    assert first["zc_n"] == 16 and first["zc_sample_relation"] <= 0 and first["zc_class_relation"] <= 0


def _row(i: int, res: int, val: float, **extra: object) -> dict[str, object]:
    return {"id": f"r{i}", "resolution": res, "val_accuracy": val, "curve": [[0.037, val / 2], [1.0, val]],
            "params": 100 - i, "macs": 5, "zc_sample_relation": val * 10, "zc_class_relation": -val,
            "zc_synflow_log10": None, **extra}


def test_the_report_ranks_each_score_against_the_final_accuracy_per_resolution(tmp_path: Path) -> None:
    from zero_cost_report import load_rows, main, report

    rows = [_row(i, 16 if i % 2 else 32, 0.1 + 0.01 * i) for i in range(12)]
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps(r) + "\n" for r in rows[:8]))
    b.write_text("".join(json.dumps(r) + "\n" for r in rows[6:]))  # rows 6, 7 twice: counted once
    loaded = load_rows([a, b])
    assert len(loaded) == 12 and loaded[0]["rung_1_27"] == pytest.approx(0.05)
    by_group = {e["group"]: e for e in report(loaded)}
    assert set(by_group) == {"all", "r16", "r32"} and by_group["r16"]["rows"] == 6
    assert by_group["all"]["zc_sample_relation"] == {"rho": 1.0, "n": 12}
    assert by_group["all"]["zc_class_relation"]["rho"] == -1.0
    assert by_group["all"]["rung_1_27"]["rho"] == 1.0 and by_group["all"]["params"]["rho"] == -1.0
    # a missing score and a constant column have no correlation (not 0)
    assert by_group["all"]["zc_synflow_log10"] == {"rho": None, "n": 0}
    assert by_group["r32"]["macs"]["rho"] is None
    assert main([str(tmp_path / "none.jsonl")]) == 2
