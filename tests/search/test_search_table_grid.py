"""Issue 21: the grids of ``benchmarks/record_search_table.py`` (the old table stays reproducible)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from record_search_table import grid_configs, student_dict  # noqa: E402

from kdsearch.models import StudentSpec  # noqa: E402


def test_the_old_grid_is_the_recorded_table_with_the_same_seeds() -> None:
    old = grid_configs("old")
    rows = [json.loads(line) for line in (ROOT / "benchmarks/search_table/table.jsonl").read_text().splitlines()]
    assert {c["id"] for c in old} == {r["id"] for r in rows}
    seeds = {c["id"]: 1000 + i for i, c in enumerate(old)}
    assert all(r["seed"] == seeds[r["id"]] for r in rows)


def test_the_hard_grid_is_wider_and_every_config_builds_a_student_spec() -> None:
    hard = grid_configs("hard")
    assert len(hard) >= 480 and len({c["id"] for c in hard}) == len(hard)
    vgg = [c for c in hard if c["family"] == "vgg"]
    assert max(c["depth"] for c in vgg) >= 11 and len({c["width"] for c in vgg}) >= 6
    assert {c["resolution"] for c in hard} == {16, 24, 32}
    assert any(c["family"] == "mobilenetv3" for c in hard)
    for c in hard:
        spec = StudentSpec.from_dict(student_dict(c, 10))
        assert spec.family == c["family"] and spec.resolution == c["resolution"]
