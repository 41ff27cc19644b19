"""``kdsearch table``: pivot a stored study into the paper's tables, with known answers.

The study is built with Optuna directly in the default journal layout, so the CLI reads it the
way it reads a real run. Keys come from params (``teacher``), user attrs and the stored spec
(``family``, ``resolution``); FAIL trials, trials without the key and missing metric values are
left out of the cells.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState, create_trial

from kdsearch.errors import ConfigError
from kdsearch.report.pivot_table import pivot_table, render_csv, render_markdown

from cli_helpers import run_cli

NAME = "pivot"
TEACHER = CategoricalDistribution(["CNN", "ViT"])

# (state, teacher param or None, family, resolution, val_accuracy or None, macs)
ROWS = [
    (TrialState.COMPLETE, "CNN", "vgg", 32, 0.61, 4.2e6),
    (TrialState.COMPLETE, "CNN", "vgg", 224, 0.55, 2.06e8),
    (TrialState.COMPLETE, "CNN", "vit", 32, 0.40, 1.3e7),
    (TrialState.COMPLETE, "ViT", "vgg", 32, 0.58, 4.2e6),
    (TrialState.COMPLETE, "ViT", "vit", 32, 0.35, 1.3e7),
    (TrialState.COMPLETE, "ViT", "vit", 224, None, 2.27e7),  # accuracy missing: not in the cell
    (TrialState.FAIL, "CNN", "vgg", 32, 0.99, 4.2e6),  # FAIL: never tabulated
    (TrialState.COMPLETE, None, "vgg", 32, 0.97, 4.2e6),  # no teacher key: not in any row
]


def _build(run_dir: Path) -> optuna.Study:
    path = run_dir / NAME / "journal.log"
    path.parent.mkdir(parents=True)
    storage = JournalStorage(JournalFileBackend(str(path)))
    study = optuna.create_study(study_name=NAME, storage=storage, directions=["maximize", "minimize"])
    study.set_metric_names(["val_accuracy", "macs"])
    for state, teacher, family, res, acc, macs in ROWS:
        attrs = {"spec": {"family": family, "depth": 8, "width": 0.25, "resolution": res, "num_classes": 10},
                 "val_accuracy": acc, "macs": macs}
        params, dists = ({"teacher": teacher}, {"teacher": TEACHER}) if teacher else ({}, {})
        values = [acc if acc is not None else 0.0, macs] if state == TrialState.COMPLETE else None
        study.add_trial(create_trial(state=state, values=values, params=params, distributions=dists,
                                     user_attrs=attrs))
    return study


@pytest.fixture
def study(tmp_path: Path) -> optuna.Study:
    return _build(tmp_path)


def test_cells_counts_and_aggregations(study: optuna.Study) -> None:
    t = pivot_table(study, rows="teacher", cols="family", metric="val_accuracy")
    assert (t.row_labels, t.col_labels, t.unit) == (["CNN", "ViT"], ["vgg", "vit"], "fraction")
    assert t.cells == {("CNN", "vgg"): 0.61, ("CNN", "vit"): 0.40, ("ViT", "vgg"): 0.58, ("ViT", "vit"): 0.35}
    assert t.counts == {("CNN", "vgg"): 2, ("CNN", "vit"): 1, ("ViT", "vgg"): 1, ("ViT", "vit"): 1}
    assert pivot_table(study, rows="teacher", cols="family", metric="val_accuracy", agg="min").cells[("CNN", "vgg")] == 0.55
    assert pivot_table(study, rows="teacher", cols="family", metric="val_accuracy", agg="mean").cells[
        ("CNN", "vgg")] == pytest.approx(0.58)
    assert pivot_table(study, rows="teacher", cols="family", metric="val_accuracy", agg="median").cells[
        ("CNN", "vgg")] == pytest.approx(0.58)


def test_numeric_keys_sort_as_numbers_and_units_follow_the_metric(study: optuna.Study) -> None:
    t = pivot_table(study, rows="family", cols="resolution", metric="macs", agg="max")
    assert t.col_labels == [32, 224]  # not "224" < "32"
    assert t.unit == "MACs"
    assert t.cells[("vit", 224)] == 2.27e7 and t.counts[("vit", 224)] == 1
    # The ViT-teacher, ViT-student 224 px trial has no accuracy: its cell is empty, count 0.
    acc = pivot_table(study, rows="family", cols="resolution", metric="val_accuracy")
    assert acc.cells[("vit", 224)] is None and acc.counts[("vit", 224)] == 0


def test_markdown_is_exact(study: optuna.Study) -> None:
    md = render_markdown(pivot_table(study, rows="teacher", cols="family", metric="val_accuracy"))
    assert md == (
        "max of val_accuracy by teacher x family (n = trials per cell)\n"
        "\n"
        "| teacher \\ family | vgg | vit |\n"
        "|---|---|---|\n"
        "| CNN | 61.00% (n=2) | 40.00% (n=1) |\n"
        "| ViT | 58.00% (n=1) | 35.00% (n=1) |"
    )
    md = render_markdown(pivot_table(study, rows="teacher", cols="resolution", metric="macs", agg="min"))
    assert md.splitlines()[0] == "min of macs [MACs] by teacher x resolution (n = trials per cell)"
    assert md.splitlines()[4] == "| CNN | 4.2 M (n=2) | 206 M (n=1) |"
    assert md.splitlines()[5] == "| ViT | 4.2 M (n=2) | 22.7 M (n=1) |"


def test_csv_has_raw_values(study: optuna.Study) -> None:
    text = render_csv(pivot_table(study, rows="teacher", cols="family", metric="val_accuracy"))
    assert list(csv.reader(io.StringIO(text))) == [
        ["teacher\\family", "vgg", "vit"],
        ["CNN", "0.61", "0.4"],
        ["ViT", "0.58", "0.35"],
    ]


def test_unknown_key_suggests_a_close_match(study: optuna.Study) -> None:
    with pytest.raises(ConfigError, match="did you mean 'teacher'"):
        pivot_table(study, rows="teachr", cols="family", metric="val_accuracy")


def test_cli_prints_the_same_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    study = _build(tmp_path)
    args = ["table", "--study-name", NAME, "--run-dir", tmp_path, "--rows", "teacher", "--cols", "family",
            "--metric", "val_accuracy", "--format", "both"]
    assert run_cli(*args) == 0
    out = capsys.readouterr().out
    table = pivot_table(study, rows="teacher", cols="family", metric="val_accuracy")
    assert out == render_markdown(table) + "\n\n" + render_csv(table)


def test_categorical_labels_keep_the_study_files_order() -> None:
    from kdsearch.report.pivot_table import pivot_table, render_markdown

    study = optuna.create_study(directions=["maximize"])
    dists = {"size": optuna.distributions.CategoricalDistribution(["XS", "S", "M", "L", "XL"]),
             "resolution": optuna.distributions.CategoricalDistribution([32, 224])}
    for size, acc in [("XL", 0.5), ("XS", 0.2), ("M", 0.4)]:
        study.add_trial(optuna.trial.create_trial(
            params={"size": size, "resolution": 32}, distributions=dists, values=[acc],
            user_attrs={"val_accuracy": acc, "macs": None}))
    table = pivot_table(study, rows="size", cols="resolution", metric="val_accuracy")
    assert table.row_labels == ["XS", "M", "XL"]  # the study file's order, not alphabetical
    assert table.cells[("M", 32)] == 0.4
    # A cell whose trials have no finite value shows "—" with its count, not a blank.
    study.add_trial(optuna.trial.create_trial(
        params={"size": "S", "resolution": 224}, distributions=dists, values=[0.1],
        user_attrs={"val_accuracy": None, "macs": None}))
    assert "— (n=0)" in render_markdown(pivot_table(study, rows="size", cols="resolution", metric="val_accuracy"))
