"""Issue 21, item 3: the replay's zero-cost screen (``bench_search.py``'s ``tpe+es+zc``).

Each proposal is ranked on (zero-cost score, MACs) against every proposal scored before it, by
the rung pruner's own rule, before any training; one outside the top 1/eta stops at the score's
recorded cost. The replay decided against using it (``benchmarks/RESULTS.md``); this keeps the
strategy that decided it honest.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_search import load_table, run_optuna  # noqa: E402

SHARDS = sorted((ROOT / "benchmarks" / "search_table" / "hard-shards").glob("hard-*.jsonl"))


@pytest.fixture(scope="module")
def hard_table(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201 - bench_search.Table
    path = tmp_path_factory.mktemp("hard") / "hard.jsonl"
    path.write_text("".join(p.read_text() for p in SHARDS))
    return load_table(path)


def test_the_hard_table_carries_a_score_and_its_cost_for_every_vgg_row(hard_table) -> None:  # noqa: ANN001
    rows = list(hard_table.rows.values())
    assert len(rows) == 432
    assert all(r.zc is not None and math.isfinite(r.zc) for r in rows)
    assert all(0 < r.zc_box < 0.1 for r in rows)  # a batch or two: under a tenth of a (10 s CPU) box


def test_the_zero_cost_screen_stops_proposals_before_the_box_at_the_scores_cost(hard_table) -> None:  # noqa: ANN001
    budget = 8.0  # past the first min_competitors (3) full boxes
    plain = run_optuna("tpe+es", hard_table, 0, budget, None)
    zc = run_optuna("tpe+es+zc", hard_table, 0, budget, None)
    assert plain.screened == 0 and zc.screened > 0
    # Screened proposals cost only their score: many more proposals fit in the same budget.
    assert zc.screened + len(zc.started) > plain.screened + len(plain.started)
    assert plain.spent >= budget and zc.spent >= budget
