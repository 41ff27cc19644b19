"""The HTML report: every figure with the study's real data, the sortable table, the header,
offline (plotly.js inline once), guards for thin studies, atomic writes."""

from __future__ import annotations

import html as htmllib
import json
import re
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from kdsearch.config import format_duration
from kdsearch.constants import EXPORT_CARD_KIND
from kdsearch.errors import ConfigError, StorageError
from kdsearch.export.pick import DEFAULT_PICK_RULE, pick_trial
from kdsearch.metrics import metric_unit
from kdsearch.report import build_report
from kdsearch.report.figures import all_figures, reference_point

from study_helpers import FIXTURE_ROWS, LATENCY_LIMIT_MS, FixtureStudy


def _plot_json(page: str, div_id: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The data and layout passed to Plotly.newPlot for ``div_id``."""
    m = re.search(r'Plotly\.newPlot\(\s*"' + re.escape(div_id) + r'",\s*', page)
    assert m, f"no Plotly.newPlot for {div_id}"
    dec = json.JSONDecoder()
    data, end = dec.raw_decode(page, m.end())
    rest = page[end:].lstrip().lstrip(",").lstrip()
    layout, _ = dec.raw_decode(rest)
    return data, layout


def _title(layout: dict[str, Any]) -> str:
    t = layout.get("title")
    return t.get("text", "") if isinstance(t, dict) else str(t or "")


@pytest.fixture(scope="module")
def report(fixture_study: FixtureStudy, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("report") / "sub" / "report.html"
    path = build_report(
        fixture_study.storage_url, fixture_study.study_name, out, artifact_dir=fixture_study.artifact_dir,
        png_dir=out.parent / "png",
    )
    assert path == out
    return path, path.read_text(encoding="utf-8")


def test_report_is_one_offline_file_with_plotly_inline_once(report: tuple[Path, str]) -> None:
    path, page = report
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert len(re.findall(r"\* plotly\.js v\d", page)) == 1  # the bundle's banner, embedded exactly once
    assert not re.search(r"<script[^>]+src=", page), "no external scripts"
    assert not re.search(r"<link[^>]+href=['\"]https?:", page), "no external stylesheets"
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_every_figure_is_drawn_with_the_real_trial_values(fixture_study: FixtureStudy, report: tuple[Path, str]) -> None:
    _, page = report
    figs = all_figures(fixture_study.open())
    keys = [f.key for f in figs]
    assert keys == [
        "fig-acc-macs",
        "fig-acc_latency",
        "fig-pareto-val_accuracy-macs",
        "fig-hypervolume",
        "fig-curves",
        "fig-parallel",
        "fig-importance-val_accuracy",
        "fig-importance-macs",
    ]
    summary = json.loads(re.search(r"id='kdsearch-report-data'>(.*?)</script>", page).group(1))
    assert summary["figures"] == keys and summary["notes"] == {}
    for f in figs:
        assert f.figure is not None, f.note
        assert f"<h3>{htmllib.escape(f.title)}</h3>" in page

    # Pareto front: every COMPLETE trial's (accuracy, MACs); trials 3 and 5 in the infeasible trace.
    data, layout = _plot_json(page, "fig-pareto-val_accuracy-macs")
    points = {(x, y) for trace in data for x, y in zip(trace["x"], trace["y"], strict=False)}
    assert points == {(r[3], r[4]) for r in FIXTURE_ROWS.values()}
    infeasible = next(t for t in data if "Infeasible" in t["hovertemplate"])
    assert set(zip(infeasible["x"], infeasible["y"], strict=False)) == {(FIXTURE_ROWS[n][3], FIXTURE_ROWS[n][4]) for n in (3, 5)}
    best = next(t for t in data if "Best Trial" in t["hovertemplate"])
    assert sorted(best["x"]) == sorted(FIXTURE_ROWS[n][3] for n in fixture_study.feasible_front)
    assert layout["xaxis"]["title"]["text"] == "val_accuracy (fraction)"

    # Accuracy vs latency: one trace per resolution, sizes by depth, trial 5 (no latency) left out.
    data, layout = _plot_json(page, "fig-acc_latency")
    assert sorted(t["name"] for t in data) == ["16 px", "32 px"]
    got = {(x, y) for t in data for x, y in zip(t["x"], t["y"], strict=False)}
    assert got == {(r[5], r[3]) for n, r in FIXTURE_ROWS.items() if n != 5}
    sizes = {n: s for t in data for n, s in zip(t["customdata"], t["marker"]["size"], strict=False)}
    assert sizes[0] < sizes[1] < sizes[7]  # depth 2 < 3 < 4
    assert "trial 5 (latency_ms_b1: error: RuntimeError during timing)" in page

    # Accuracy vs each cost objective (MACs here, log axis), every trial shown; on both, the
    # teacher's val accuracy (0.91) is a dashed line inside the y range.
    data, layout = _plot_json(page, "fig-acc-macs")
    assert {(x, y) for t in data for x, y in zip(t["x"], t["y"], strict=False)} == {(r[4], r[3]) for r in FIXTURE_ROWS.values()}
    assert layout["xaxis"]["type"] == "log" and layout["xaxis"]["title"]["text"] == "macs (MACs)"
    for key in ("fig-acc-macs", "fig-acc_latency"):
        _, layout = _plot_json(page, key)
        lines = [sh for sh in layout["shapes"] if sh.get("line", {}).get("dash") == "dash"]
        assert [(sh["y0"], sh["y1"]) for sh in lines] == [(0.91, 0.91)]
        assert [a["text"] for a in layout["annotations"]] == ["teacher deit_tiny: val 91.00%"]
        lo, hi = layout["yaxis"]["range"]
        assert lo < 0.41 and 0.91 < hi <= 1.0
    assert "Dashed: the teacher&#x27;s val accuracy (deit_tiny 91.00%)." in page

    # Hypervolume: stated reference point, one value per COMPLETE trial, non-decreasing.
    ref = reference_point(fixture_study.open())
    assert ref == pytest.approx([0.41 - 0.1 * (0.78 - 0.41), 4.0e6 + 0.1 * (4.0e6 - 1.0e5)])
    data, layout = _plot_json(page, "fig-hypervolume")
    assert data[0]["x"] == list(range(8))
    assert all(b >= a for a, b in zip(data[0]["y"], data[0]["y"][1:], strict=False)) and data[0]["y"][-1] > 0
    assert f"val_accuracy = {ref[0]:.6g}" in _title(layout) and f"macs = {ref[1]:.6g}" in _title(layout)
    assert "Reference point: val_accuracy = 0.373, macs = 4.39e+06" in page

    # Parallel coordinates over the searched parameters; importances one per objective.
    data, _ = _plot_json(page, "fig-parallel")
    assert len(data) >= 8
    for name in ("val_accuracy", "macs"):
        data, layout = _plot_json(page, f"fig-importance-{name}")
        assert _title(layout) == f"Parameter importance for {name}"
        assert data and set(data[0]["y"]) <= {"resolution", "vgg_depth", "vgg_width", "temperature", "alpha", "lr"}


def test_front_table_lists_every_metric_with_unit_and_missing_reasons(fixture_study: FixtureStudy, report: tuple[Path, str]) -> None:
    _, page = report
    table = re.search(r"<table class='trials sortable' id='pareto-table'>(.*?)</table>", page, re.S).group(1)
    assert re.findall(r"<tr data-trial='(\d+)'>", table) == ["0", "1", "4", "7"]
    for metric in ("val_accuracy", "macs", "test_accuracy", "latency_ms_b1", "kd_energy_j", "peak_kd_memory_mb"):
        unit = metric_unit(metric)
        assert f"data-metric='{metric}'>{metric}<br><span class='unit'>[{htmllib.escape(unit)}]</span></th>" in table
    assert "<td class='missing' data-sort='' title='unavailable: NVML not available on this machine'>—</td>" in table
    assert "data-sort='0.74'" in table and ">74.00%<" in table  # trial 7's accuracy, sortable as a number
    # The checkpoint link resolves (relative to the report) to the stored artifact.
    aid = fixture_study.open().trials[7].user_attrs["artifact_id"]
    assert re.search(r"href='[^']*" + re.escape(aid) + "'", table)
    other = re.search(r"id='other-table'>(.*?)</table>", page, re.S).group(1)
    assert re.findall(r"<tr data-trial='(\d+)'>", other) == ["3", "5", "8", "9"]
    assert "FAIL (oom)" in other and "CUDA out of memory" in other and "exceeds its limit by 1.5" in other
    assert "table.querySelectorAll('thead th')" in page  # the inline sorter


def test_header_states_counts_teacher_dataset_time_and_environment(report: tuple[Path, str]) -> None:
    _, page = report
    summary = re.search(r"<dl class='meta' id='summary'>(.*?)</dl>", page, re.S).group(1)
    text = htmllib.unescape(re.sub(r"<[^>]+>", " ", summary))
    assert "fixture" in text
    assert "val_accuracy (maximize ↑, fraction), macs (minimize ↓, MACs)" in text
    assert f"latency_ms_b1 ≤ {LATENCY_LIMIT_MS:g} ms" in text
    assert "10 trials: 8 complete (6 feasible, 2 infeasible), 2 failed (diverged: 1, oom: 1)" in text
    assert "deit_tiny (val 91.00%, test 90.00%)" in text
    assert "synthetic" in text and f"{format_duration(1234.5)} (all runs" in text and "Test CPU" in text


def test_png_without_kaleido_is_a_note_not_a_failure(report: tuple[Path, str]) -> None:
    _, page = report
    try:
        import kaleido  # noqa: F401
    except ImportError:
        assert "static images skipped: kaleido is not installed" in page
    else:  # pragma: no cover - depends on the environment
        assert "static images skipped" not in page


def test_three_objectives_get_every_pair_and_a_3d_front(fixture_study3: FixtureStudy, tmp_path: Path) -> None:
    page = build_report(fixture_study3.storage_url, fixture_study3.study_name, tmp_path / "r.html").read_text()
    for a, b in (("val_accuracy", "macs"), ("val_accuracy", "kd_time_s"), ("macs", "kd_time_s")):
        data, layout = _plot_json(page, f"fig-pareto-{a}-{b}")
        assert _title(layout) == f"Pareto front: {a} vs {b}"
    data, layout = _plot_json(page, "fig-pareto3d")
    assert {t["type"] for t in data} == {"scatter3d"}
    pts = {(x, y, z) for t in data for x, y, z in zip(t["x"], t["y"], t["z"], strict=False)}
    assert pts == {(r[3], r[4], r[6]) for r in FIXTURE_ROWS.values()}
    assert layout["scene"]["zaxis"]["title"]["text"] == "kd_time_s (s)"
    assert "fig-importance-kd_time_s" in page


def _tiny_study(tmp_path: Path, values: list[tuple[float, float]], same_params: bool = False) -> str:
    journal = tmp_path / "tiny.log"
    study = optuna.create_study(study_name="tiny", storage=JournalStorage(JournalFileBackend(str(journal))),
                                directions=["maximize", "minimize"])
    for _i, v in enumerate(values):
        t = study.ask()
        t.suggest_int("vgg_depth", 2, 19) if not same_params else t.suggest_categorical("vgg_depth", [4])
        t.set_user_attr("val_accuracy", v[0])
        study.tell(t, list(v))
    return f"journal:{journal}"


@pytest.mark.parametrize(
    ("values", "same", "expected"),
    [
        ([], False, ["no COMPLETE trials yet", "needs at least 2 COMPLETE trials (has 0)"]),
        ([(0.5, 10.0)], False, ["needs at least 2 COMPLETE trials (has 1)", "no latency metric stored"]),
        ([(0.5, 10.0), (0.5, 10.0)], True, ["every parameter has a single value"]),
    ],
    ids=["empty", "one-trial", "single-value"],
)
def test_thin_studies_get_notes_instead_of_failing(tmp_path: Path, values: list[tuple[float, float]], same: bool,
                                                   expected: list[str]) -> None:
    url = _tiny_study(tmp_path, values, same)
    page = build_report(url, "tiny", tmp_path / "r.html").read_text()
    for note in expected:
        assert note in page
    assert "Not drawn:" in page


def test_report_write_is_atomic_and_errors_are_one_line(fixture_study: FixtureStudy, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "report.html"
    out.write_text("previous report")
    import kdsearch.report.html as html_mod

    def boom(*a: Any, **k: Any) -> str:
        raise RuntimeError("render failed")

    monkeypatch.setattr(html_mod, "render_report", boom)
    with pytest.raises(RuntimeError):
        build_report(fixture_study.storage_url, fixture_study.study_name, out)
    assert out.read_text() == "previous report"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]
    monkeypatch.undo()
    with pytest.raises(StorageError, match="no study 'missing'"):
        build_report(fixture_study.storage_url, "missing", out)
    with pytest.raises(ConfigError, match="--out: must be an HTML file path"):
        build_report(fixture_study.storage_url, fixture_study.study_name, tmp_path)


def _glance(page: str) -> str:
    m = re.search(r"<section id='glance'>(.*?)</section>", page, re.S)
    assert m, "no At a glance section"
    return m.group(1)


def _rows(section: str) -> list[list[str]]:
    body = re.search(r"<tbody>(.*?)</tbody>", section, re.S).group(1)
    return [[htmllib.unescape(re.sub(r"<[^>]+>", "", c)) for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
            for row in re.findall(r"<tr[^>]*>(.*?)</tr>", body, re.S)]


def test_at_a_glance_opens_the_page_with_teacher_best_students_and_the_default_export(
    fixture_study: FixtureStudy, report: tuple[Path, str]
) -> None:
    path, page = report
    assert page.index("<section id='glance'>") < page.index("<dl class='meta' id='summary'>") < page.index("<h2>Pareto")
    section = _glance(page)
    rows = _rows(section)
    # role, #, student, val_accuracy, macs, vs teacher (test), model card
    assert rows[0] == ["teacher", "—", "deit_tiny (test 90.00%)", "91.00%", "—", "—", "—"]
    assert [r[:2] for r in rows[1:]] == [["best val_accuracy (max)", "7"], ["best macs (min)", "0"], ["default export", "7"]]
    # vs teacher on test (the fixture stores test = val - 1.25 points; the teacher's test is 90%)
    assert rows[1][3:6] == ["74.00%", "2.5 M", "-17.25 pts"] and rows[2][3:6] == ["41.00%", "0.1 M", "-50.25 pts"]
    # The default export is what `kdsearch export --pick` selects with the default rule.
    assert pick_trial(fixture_study.open(), DEFAULT_PICK_RULE).number == 7
    assert rows[3][-1] == "not exported"
    text = htmllib.unescape(re.sub(r"<[^>]+>", "", section))
    assert "Default export: trial 7, picked by --pick 'max val_accuracy': the student with the highest val_accuracy" in text
    cmd = htmllib.unescape(re.search(r"<code id='glance-export-command'>(.*?)</code>", section).group(1))
    assert cmd == (f"kdsearch export --study-name fixture --run-dir {fixture_study.run_dir} "
                   f"--pick 'max val_accuracy' --out {fixture_study.run_dir / 'fixture' / 'best-student'}")


def test_the_default_exports_card_is_linked_once_it_is_exported(fixture_study: FixtureStudy, tmp_path: Path) -> None:
    from kdsearch.export import export_trial

    out = tmp_path / "fixture" / "report.html"
    for number, folder in ((4, "other-student"), (7, "best-student")):  # only trial 7's card is the default's
        export_trial(fixture_study.storage_url, fixture_study.study_name, number, None, out.parent / folder,
                     artifact_dir=fixture_study.artifact_dir)
    page = build_report(fixture_study.storage_url, fixture_study.study_name, out,
                        artifact_dir=fixture_study.artifact_dir).read_text()
    section = _glance(page)
    assert _rows(section)[3][-1] == "best-student/README.md"
    href = re.search(r"<a href='([^']+)' id='glance-card'>", section).group(1)
    assert href == "best-student/README.md" and (out.parent / href).is_file()
    card = json.loads((out.parent / "best-student" / "card.json").read_text())
    assert (card["kind"], card["study"], card["trial_number"]) == (EXPORT_CARD_KIND, "fixture", 7)
    assert "Its model card:" in section and "Not exported yet" not in section


def test_at_a_glance_says_how_the_teacher_was_fitted_and_copes_without_a_front(tmp_path: Path) -> None:
    url = _tiny_study(tmp_path, [])
    study = optuna.load_study(study_name="tiny", storage=JournalStorage(JournalFileBackend(url.removeprefix("journal:"))))
    study.set_user_attr("teachers", {"ViT-tiny": {
        "val_accuracy": 0.955, "test_accuracy": 0.94,
        "fit": {"fit_time_s": 38.2, "epochs": 21.04, "stop_reason": "target_accuracy", "val_history": [[21.04, 0.955]]},
    }})
    page = build_report(url, "tiny", tmp_path / "r.html").read_text()
    section = htmllib.unescape(re.sub(r"<[^>]+>", "", _glance(page)))
    assert "Teacher ViT-tiny was fitted on the train split: stopped at its target val accuracy after 21.0 epochs (38.2s)." in section
    assert "No feasible COMPLETE trial yet" in section
    # No metric names stored: objective_0, objective_1, then val_accuracy for the teacher's figure.
    assert _rows(_glance(page)) == [["teacher", "—", "ViT-tiny (test 94.00%)", "—", "—", "95.50%", "—", "—"]]


def test_at_a_glance_names_a_teacher_that_trained_on_val(tmp_path: Path) -> None:
    """Issue 22: the stored verdict of kdsearch.models.teacher.val_leak_check is shown as a warning."""
    from kdsearch.models.teacher import val_leak_check

    url = _tiny_study(tmp_path, [])
    study = optuna.load_study(study_name="tiny", storage=JournalStorage(JournalFileBackend(url.removeprefix("journal:"))))
    leak = val_leak_check("ViT", 0.786, 0.6965, 5000, 10000)
    study.set_user_attr("teachers", {"ViT": {"val_accuracy": 0.786, "test_accuracy": 0.6965, "val_leak": leak}})
    section = _glance(build_report(url, "tiny", tmp_path / "r.html").read_text())
    warn = re.search(r"<p class='note warn teacher-leak'>(.*?)</p>", section)
    assert warn and htmllib.unescape(warn.group(1)) == leak["message"]
    assert "vs teacher (test) = the student's test accuracy minus its teacher's" in htmllib.unescape(section)
    # A teacher within the noise gets no warning.
    study.set_user_attr("teachers", {"ViT": {"val_accuracy": 0.70, "test_accuracy": 0.69,
                                             "val_leak": val_leak_check("ViT", 0.70, 0.69, 5000, 10000)}})
    assert "teacher-leak" not in _glance(build_report(url, "tiny", tmp_path / "r2.html").read_text())


def test_every_figure_has_the_report_template_and_plotly_default_is_put_back(fixture_study: FixtureStudy) -> None:
    """The template is given at creation (figures._in_template), not by a per-figure update."""
    import plotly.io as pio

    from kdsearch.report.figures import TEMPLATE

    before = pio.templates.default
    figs = [f.figure for f in all_figures(fixture_study.open()) if f.figure is not None]
    assert pio.templates.default == before != TEMPLATE
    assert figs
    white = pio.templates[TEMPLATE].layout.to_plotly_json()
    for fig in figs:
        assert fig.layout.template.layout.to_plotly_json() == white
