"""lr_factor: warm-up then cosine, as a function of elapsed / box."""

from __future__ import annotations

from itertools import pairwise

import pytest

from kdsearch.distill import lr_factor


def test_warmup_then_cosine_decay() -> None:
    w, final = 0.1, 0.05
    xs = [i / 1000 for i in range(1001)]
    ys = [lr_factor(x, w, final) for x in xs]
    peak = xs[ys.index(max(ys))]
    assert peak == pytest.approx(w, abs=1e-3) and max(ys) == pytest.approx(1.0)
    assert ys[0] == 0.0 and lr_factor(w / 2, w, final) == pytest.approx(0.5)
    assert all(a <= b for a, b in pairwise(ys[:101]))  # rising during warm-up
    assert all(a >= b for a, b in pairwise(ys[100:]))  # falling afterwards
    assert ys[-1] == pytest.approx(final)
    assert lr_factor((1 + w) / 2, w, final) == pytest.approx(final + (1 - final) * 0.5)  # cosine midpoint
    assert lr_factor(-1.0, w, final) == 0.0 and lr_factor(2.0, w, final) == pytest.approx(final)


def test_no_warmup_starts_at_peak() -> None:
    assert lr_factor(0.0, 0.0, 0.0) == pytest.approx(1.0)
    assert lr_factor(1.0, 0.0, 0.0) == pytest.approx(0.0, abs=1e-12)
