"""The trial table printed by ``kdsearch trials`` and at the end of ``kdsearch optimize``: the
teacher's accuracy beside the students, the front sorted by the first objective."""

from __future__ import annotations

import io
import re

from rich.console import Console

from kdsearch.report.trials_table import PARETO_FOOTNOTE, table_trials, trial_records, trials_table

from study_helpers import FixtureStudy


def _text(table: object) -> list[list[str]]:
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(table)
    out = console.file.getvalue()  # type: ignore[attr-defined]
    return [[c.strip() for c in line.strip("│").split("│")] for line in out.splitlines() if line.startswith("│")]


def test_front_table_starts_with_the_teacher_and_is_sorted_by_the_first_objective(fixture_study: FixtureStudy) -> None:
    study = fixture_study.open()
    rows = _text(trials_table(study, pareto=True))
    # #, state, student, teacher, val_accuracy, macs, kd_time_s, vs teacher (test), front
    assert rows[0] == ["T", "teacher", "—", "deit_tiny", "91.00%", "—", "—", "test 90.00%", ""]
    assert [r[0] for r in rows[1:]] == ["7", "4", "1", "0", "3", "5"]  # front by accuracy, then the infeasible
    assert [r[1] for r in rows[1:]] == ["COMPLETE"] * 4 + ["INFEASIBLE"] * 2
    # vs teacher on test: trial 7's test accuracy 72.75% minus the teacher's 90.00%
    assert rows[1][4:] == ["74.00%", "2.5 M", "44 s", "-17.25 pts", "*"]
    assert "Sorted by the first objective" in PARETO_FOOTNOTE
    # Every trial, in number order, when not --pareto; the JSON records stay in number order.
    assert [r[0] for r in _text(trials_table(study, pareto=False))[1:]] == [str(n) for n in range(10)]
    assert [r["number"] for r in trial_records(study, pareto=True)] == [0, 1, 3, 4, 5, 7]
    trials, front = table_trials(study, pareto=True)
    assert front == {0, 1, 4, 7} and [t.number for t in trials] == [7, 4, 1, 0, 3, 5]
    assert all(re.fullmatch(r"[+-]\d+\.\d\d pts", r[-2]) for r in rows[1:])
