"""One self-contained HTML report of a stored study; it works offline.

The page opens with what a user asks first ("At a glance", :func:`glance_html`): each
teacher's accuracy, the student of the feasible Pareto front with the best value of each
objective (with its distance to the teacher's test accuracy: a split the teacher did
not train on, where its val accuracy may be inflated; a warning when it is), and the student the default export
picks (:data:`~kdsearch.export.pick.DEFAULT_PICK_RULE`, selected by the same
:func:`~kdsearch.export.pick.pick_trial` as ``kdsearch export --pick``), with a link to its
model card when an export of it sits beside the report, else the command that writes one. Then
the study's details, the front table, the other trials and the figures.

plotly.js is embedded inline once (the first figure, ``include_plotlyjs=True``; later figures
reuse it), the trial table sorts with a few lines of inline JavaScript, and nothing is loaded
from the network. The file is written atomically (temp file + ``os.replace``). Nothing here
imports torch: a report of a 1,000-trial study takes seconds.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import logging
import math
import os
import shlex
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import optuna
import plotly.io as pio
from optuna.trial import FrozenTrial, TrialState

from kdsearch import trial_record as tr
from kdsearch._version import __version__
from kdsearch.config import format_duration
from kdsearch.constants import EXPORT_CARD_KIND
from kdsearch.device_record import DEVICE_INFO_ATTR, format_device_banner
from kdsearch.errors import ConfigError
from kdsearch.export.pick import default_pick_rule, pick_trial
from kdsearch.metrics import format_metric, metric_unit
from kdsearch.report.figures import ReportFigure, all_figures
from kdsearch.report.pareto import (
    TrialRow,
    best_per_objective,
    feasible,
    infeasible_reason,
    metric_columns,
    metric_value,
    pareto_front,
    teacher_accuracies,
    trial_rows,
)
from kdsearch.report.trials_table import VS_TEACHER, leak_warnings
from kdsearch.storage import default_storage_url, load_study, redact_url

__all__ = ["build_report", "find_export", "glance_html", "render_report", "write_pngs"]


_log = logging.getLogger(__name__)

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{margin-bottom:4px} h2{margin-top:36px;border-bottom:1px solid #ddd;padding-bottom:4px}
.meta{display:grid;grid-template-columns:max-content auto;gap:4px 16px;font-size:14px}
.meta dt{font-weight:600} .meta dd{margin:0}
.note{color:#555;font-size:13px;margin:4px 0 12px} .warn{color:#a15c00}
table.trials{border-collapse:collapse;font-size:13px;margin:8px 0}
table.trials th,table.trials td{border:1px solid #ddd;padding:3px 7px;text-align:right;white-space:nowrap}
table.trials th{background:#f4f4f4;cursor:pointer;user-select:none;position:sticky;top:0}
table.trials th .unit{font-weight:normal;color:#666;font-size:11px}
table.trials th[aria-sort=ascending]::after{content:" \\25B2"} table.trials th[aria-sort=descending]::after{content:" \\25BC"}
table.trials td.text{text-align:left} td.missing{color:#999;cursor:help}
.figure{margin:12px 0 28px} .tablewrap{overflow-x:auto}
#glance{background:#f7f9fc;border:1px solid #d8e0ec;border-radius:6px;padding:4px 16px 12px;margin:12px 0 20px}
#glance h2{margin-top:12px;border:none} #glance tr.teacher td{background:#eef2f8;font-weight:600}
#glance td.role{text-align:left;font-weight:600} .pos{color:#1a7f37} .neg{color:#b42318}
code{background:#eef0f3;padding:1px 4px;border-radius:3px;font-size:12px}
"""

# Click a header to sort by it; click again to reverse. Cells carry data-sort (a number, or
# text); missing values (data-sort="") always sort last.
_SORT_JS = """
(function(){
  function key(td){var s=td.getAttribute('data-sort'); if(s===null){s=td.textContent;}
    if(s===''){return null;} var n=Number(s); return isNaN(n)?s.toLowerCase():n;}
  document.querySelectorAll('table.sortable').forEach(function(table){
    table.querySelectorAll('thead th').forEach(function(th,col){
      th.addEventListener('click',function(){
        var asc=th.getAttribute('aria-sort')!=='ascending';
        table.querySelectorAll('thead th').forEach(function(o){o.removeAttribute('aria-sort');});
        th.setAttribute('aria-sort',asc?'ascending':'descending');
        var body=table.tBodies[0]; var rows=Array.prototype.slice.call(body.rows);
        rows.sort(function(a,b){var x=key(a.cells[col]),y=key(b.cells[col]);
          if(x===null&&y===null){return 0;} if(x===null){return 1;} if(y===null){return -1;}
          if(typeof x!==typeof y){x=String(x);y=String(y);}
          var c=x<y?-1:(x>y?1:0); return asc?c:-c;});
        rows.forEach(function(r){body.appendChild(r);});
      });
    });
  });
})();
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


# ----------------------------------------------------------------------------------------------
# Header


def _teachers(study: optuna.Study, trials: list[optuna.trial.FrozenTrial]) -> str:
    stored = study.user_attrs.get(tr.TEACHERS)
    if isinstance(stored, dict) and stored:
        parts = []
        for label, info in stored.items():
            acc = []
            if isinstance(info, dict):
                for k in ("val_accuracy", "test_accuracy"):
                    v = info.get(k)
                    if isinstance(v, (int, float)):
                        acc.append(f"{k.split('_')[0]} {format_metric(k, v)}")
            parts.append(f"{label}" + (f" ({', '.join(acc)})" if acc else ""))
        return "; ".join(parts)
    labels = sorted({str(t.user_attrs[tr.TEACHER]) for t in trials if t.user_attrs.get(tr.TEACHER)})
    return ", ".join(labels) or "not recorded"


def _dataset(study: optuna.Study, trials: list[optuna.trial.FrozenTrial]) -> str:
    cfg = study.user_attrs.get(tr.CONFIG)
    if isinstance(cfg, dict) and isinstance(cfg.get("data"), dict) and cfg["data"].get("dataset"):
        data = cfg["data"]
        extra = f" (root {data['root']})" if data.get("root") else ""
        return f"{data['dataset']}{extra}"
    names = sorted({str(t.user_attrs[tr.DATASET]) for t in trials if t.user_attrs.get(tr.DATASET)})
    return ", ".join(names) or "not recorded"


def _constraints(study: optuna.Study, trials: list[optuna.trial.FrozenTrial]) -> str:
    cfg = study.user_attrs.get(tr.CONFIG)
    con = cfg.get("constraints") if isinstance(cfg, dict) else None
    if isinstance(con, dict) and con:
        return ", ".join(f"{m} ≤ {format_metric(m, v)}" for m, v in con.items())
    keys = sorted({k for t in trials for k in t.constraints})
    return ", ".join(f"{k} (limit not recorded)" for k in keys) or "none"


def _flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _flatten(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out


def _header(study: optuna.Study, trials: list[optuna.trial.FrozenTrial]) -> str:
    names = list(study.metric_names or [f"objective_{i}" for i in range(len(study.directions))])
    dirs = ", ".join(
        f"{n} ({'maximize ↑' if d == optuna.study.StudyDirection.MAXIMIZE else 'minimize ↓'}"
        f"{', ' + metric_unit(n) if metric_unit(n) else ''})"
        for n, d in zip(names, study.directions, strict=False)
    )
    states = Counter(t.state for t in trials)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    n_inf = sum(1 for t in complete if not feasible(t))
    fails = Counter(str(t.user_attrs.get(tr.FAIL_REASON, "unknown")) for t in trials if t.state == TrialState.FAIL)
    fail_txt = f"{states[TrialState.FAIL]} failed" + (
        f" ({', '.join(f'{r}: {c}' for r, c in sorted(fails.items()))})" if fails else ""
    )
    others = ", ".join(
        f"{states[s]} {s.name.lower()}" for s in (TrialState.RUNNING, TrialState.WAITING, TrialState.PRUNED) if states[s]
    )
    counts = (
        f"{len(trials)} trials: {len(complete)} complete ({len(complete) - n_inf} feasible, {n_inf} infeasible), "
        f"{fail_txt}" + (f", {others}" if others else "")
    )
    spent = study.user_attrs.get(tr.TIME_SPENT_S)
    spent_txt = format_duration(float(spent)) if isinstance(spent, (int, float)) else "not recorded"
    env = study.user_attrs.get(tr.ENVIRONMENT)
    env_items = _flatten(env) if isinstance(env, dict) else []
    env_short = ", ".join(f"{k}: {v}" for k, v in env_items[:6]) or "not recorded"
    env_full = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in env_items)
    rows = [
        ("Study", study.study_name),
        ("Objectives", dirs),
        ("Constraints", _constraints(study, trials)),
        ("Trials", counts),
        ("Teacher(s)", _teachers(study, trials)),
        ("Dataset", _dataset(study, trials)),
        ("Time spent", f"{spent_txt} (all runs, wall clock)"),
        ("Device", _devices(trials)),
        ("Environment", env_short),
        ("kdsearch", f"stored by {study.user_attrs.get(tr.KDSEARCH_VERSION, '?')}, report by {__version__}"),
        ("Generated", _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %z")),
    ]
    meta = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in rows)
    details = (
        f"<details><summary>Full environment</summary><dl class='meta'>{env_full}</dl></details>" if env_full else ""
    )
    return f"<h1>kdsearch report: {_e(study.study_name)}</h1><dl class='meta' id='summary'>{meta}</dl>{details}"


def _devices(trials: list[optuna.trial.FrozenTrial]) -> str:
    """What the trials trained on: each distinct device banner with its trial count."""
    banners = Counter(format_device_banner(info) for t in trials
                      if isinstance(info := t.user_attrs.get(DEVICE_INFO_ATTR), dict))
    return "; ".join(f"{b} ({n} trial{'s' if n != 1 else ''})" for b, n in banners.most_common()) or "not recorded"


# ----------------------------------------------------------------------------------------------
# At a glance


def find_export(study_name: str, trial_number: int, folders: list[Path]) -> Path | None:
    """A ``kdsearch export`` folder of ``trial_number`` of ``study_name`` directly inside one of
    ``folders`` (its ``card.json`` says so), or None. The newest card wins."""
    found: list[tuple[float, Path]] = []
    for folder in folders:
        try:
            cards = list(Path(folder).glob("*/card.json"))
        except OSError:
            continue
        for card in cards:
            try:
                data = json.loads(card.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if (isinstance(data, dict) and data.get("kind") == EXPORT_CARD_KIND
                    and data.get("study") == study_name and data.get("trial_number") == trial_number):
                found.append((card.stat().st_mtime, card.parent))
    return max(found)[1] if found else None


def _export_command(study: optuna.Study, rule: str, run_dir: Path | None, storage_url: str | None) -> str:
    """The shell command that exports the default pick (next to the report's default place)."""
    name = study.study_name
    parts = ["kdsearch", "export", "--study-name", name]
    run = run_dir if run_dir is not None else Path("runs")
    parts += ["--run-dir", str(run)]
    if storage_url and storage_url != default_storage_url(run, name):
        parts += ["--storage", redact_url(storage_url)]
    parts += ["--pick", rule, "--out", str(run / name / "best-student")]
    return " ".join(shlex.quote(p) for p in parts)


def _delta_points(trial: FrozenTrial, names: list[str], teachers: dict[str, float]) -> tuple[str, str]:
    """(text, css class) of the trial's test accuracy minus its teacher's (``teachers``: test
    accuracies), in percentage points: on a split the teacher did not train on."""
    acc = metric_value(trial, "test_accuracy", names)
    label = str(trial.user_attrs.get(tr.TEACHER, ""))
    ref = teachers.get(label)
    if ref is None and len(teachers) == 1:
        ref = next(iter(teachers.values()))
    if acc is None or ref is None:
        return "—", ""
    d = 100.0 * (acc - ref)
    return f"{d:+.2f} pts", "pos" if d >= 0 else "neg"


def _stored_teachers(study: optuna.Study) -> dict[str, dict[str, Any]]:
    stored = study.user_attrs.get(tr.TEACHERS)
    return {str(k): v for k, v in stored.items() if isinstance(v, dict)} if isinstance(stored, dict) else {}


_STOP_WORDS = {
    "target_accuracy": "stopped at its target val accuracy",
    "max_epochs": "stopped after teacher.fit.max_epochs",
    "time_cap": "stopped by its time cap (teacher.fit.time) before its target",
    "time": "trained for its time box (teacher.fit.time)",
}


def _fit_sentence(label: str, info: dict[str, Any]) -> str:
    """``"Teacher ViT-tiny was fitted on the train split: stopped at its target val accuracy
    after 21.0 epochs (38 s)."`` from the stored fit info; ``""`` when it was not fitted here."""
    fit = info.get("fit")
    if not isinstance(fit, dict) or not isinstance(fit.get("fit_time_s"), (int, float)):
        return ""
    why = _STOP_WORDS.get(str(fit.get("stop_reason", "time")), str(fit.get("stop_reason")))
    epochs = fit.get("epochs")
    ep = f" after {float(epochs):.1f} epochs" if isinstance(epochs, (int, float)) else ""
    return f"Teacher {label} was fitted on the train split: {why}{ep} ({format_duration(float(fit['fit_time_s']))})."


def _rule_words(rule: str) -> str:
    """``"max val_accuracy"`` -> ``"highest val_accuracy"``."""
    direction, _, metric = rule.partition(" ")
    return f"{'highest' if direction == 'max' else 'lowest'} {metric}"


def glance_html(
    study: optuna.Study,
    front: list[FrozenTrial],
    out_dir: Path | None = None,
    run_dir: Path | None = None,
    storage_url: str | None = None,
) -> str:
    """The "At a glance" section (see the module docstring); ``front``: the feasible Pareto front."""
    names = list(study.metric_names or [f"objective_{i}" for i in range(len(study.directions))])
    dirs = ["max" if d == optuna.study.StudyDirection.MAXIMIZE else "min" for d in study.directions]
    cols = names + ([] if "val_accuracy" in names else ["val_accuracy"])
    val_t, test_t = teacher_accuracies(study, "val"), teacher_accuracies(study, "test")
    head = ["", "#", "student"] + cols + [VS_TEACHER, "model card"]
    ths = "".join(
        f"<th>{_e(h)}" + (f"<br><span class='unit'>[{_e(metric_unit(h))}]</span>" if h in cols and metric_unit(h) else "")
        + "</th>"
        for h in head
    )
    rows: list[str] = []
    for label in sorted(set(val_t) | set(test_t)):
        cells = "".join(
            f"<td>{_e(format_metric(c, val_t[label]))}</td>" if c == "val_accuracy" and label in val_t else "<td>—</td>"
            for c in cols
        )
        test = f" (test {format_metric('test_accuracy', test_t[label])})" if label in test_t else ""
        rows.append(f"<tr class='teacher' data-teacher='{_e(label)}'><td class='role'>teacher</td><td>—</td>"
                    f"<td class='text'>{_e(label)}{_e(test)}</td>{cells}<td>—</td><td>—</td></tr>")
    notes: list[str] = []
    if not val_t:
        notes.append("The teachers' accuracies were not recorded with this study.")
    info_notes = [_fit_sentence(label, info) for label, info in _stored_teachers(study).items()]
    info_notes = [n for n in info_notes if n]
    pick: FrozenTrial | None = None
    rule = default_pick_rule(study, front)
    if front:
        try:
            pick = pick_trial(study, rule)
        except ConfigError as exc:
            notes.append(f"The default export rule {rule!r} picks nothing: {exc}")
    card_link, card_path = "—", None
    if pick is not None:
        folders = [p for p in (out_dir, (run_dir / study.study_name) if run_dir is not None else None) if p is not None]
        card_path = find_export(study.study_name, pick.number, folders)
        if card_path is not None:
            target = card_path / "README.md" if (card_path / "README.md").is_file() else card_path / "card.json"
            href = os.path.relpath(target, out_dir) if out_dir is not None else str(target)
            card_link = f"<a href='{_e(href)}' id='glance-card'>{_e(card_path.name)}/{_e(target.name)}</a>"
        else:
            card_link = "<span title='not exported yet: see the command below'>not exported</span>"
    best = best_per_objective(study, front)
    picked_rows: list[tuple[str, FrozenTrial]] = [
        (f"best {name} ({d})", best[name]) for name, d in zip(names, dirs, strict=False) if name in best
    ]
    if pick is not None:
        picked_rows.append(("default export", pick))
    for role, t in picked_rows:
        cells = []
        for c in cols:
            v = metric_value(t, c, names)
            bold = role.startswith("best ") and c == role.split(" ")[1]
            txt = _e(format_metric(c, v)) if v is not None else "—"
            cells.append(f"<td>{'<b>' + txt + '</b>' if bold else txt}</td>")
        delta, cls = _delta_points(t, names, test_t)
        link = card_link if role == "default export" else "—"
        rows.append(
            f"<tr data-trial='{t.number}' data-role='{_e(role)}'><td class='role'>{_e(role)}</td><td>{t.number}</td>"
            f"<td class='text'>{_e(t.user_attrs.get(tr.STUDENT, ''))}</td>{''.join(cells)}"
            f"<td class='{cls}'>{_e(delta)}</td><td class='text'>{link}</td></tr>"
        )
    if not front:
        notes.append("No feasible COMPLETE trial yet: no student to show or export.")
    table = (f"<div class='tablewrap'><table class='trials' id='glance-table'><thead><tr>{ths}</tr></thead>"
             f"<tbody>{''.join(rows)}</tbody></table></div>")
    export_txt = ""
    if pick is not None:
        cmd = _export_command(study, rule, run_dir, storage_url)
        where = (f"Its model card: <a href='{_e(os.path.relpath(card_path, out_dir) if out_dir else card_path)}'>"
                 f"{_e(card_path)}</a>. " if card_path is not None else "Not exported yet. ")
        export_txt = (
            f"<p class='note' id='glance-export'>Default export: trial {pick.number}, picked by "
            f"<code>--pick {_e(shlex.quote(rule))}</code>: the student with the {_e(_rule_words(rule))} on the "
            f"feasible Pareto front (ties: the lowest trial number; the same selection as "
            f"<code>kdsearch export --pick</code>). {where}Write or refresh it with "
            f"<code id='glance-export-command'>{_e(cmd)}</code></p>"
        )
    note_html = "".join(f"<p class='note warn teacher-leak'>{_e(n)}</p>" for n in leak_warnings(study))
    note_html += "".join(f"<p class='note teacher-fit'>{_e(n)}</p>" for n in info_notes)
    note_html += "".join(f"<p class='note warn'>{_e(n)}</p>" for n in notes)
    return (f"<section id='glance'><h2>At a glance</h2>{table}{export_txt}{note_html}"
            "<p class='note'>Best = the front student with the best value of that objective (bold). "
            "vs teacher (test) = the student's test accuracy minus its teacher's, in percentage points: test is a "
            "split the teacher did not train on (a pretrained teacher has usually seen the val images, carved from "
            "the training split); it only reports, students are selected on val.</p></section>")


# ----------------------------------------------------------------------------------------------
# Tables


def _num_attr(v: float | None) -> str:
    return "" if v is None or not math.isfinite(v) else repr(float(v))


def _front_table(study: optuna.Study, rows: list[TrialRow], columns: list[str], out_dir: Path | None,
                 artifact_dir: Path | None) -> str:
    head = ["#", "student", "teacher"] + columns + ["checkpoint"]
    ths = []
    for h in head:
        unit = metric_unit(h) if h in columns else None
        title = f"{h} [{unit}]" if unit else h
        unit_html = f"<br><span class='unit'>[{_e(unit)}]</span>" if unit else ""
        ths.append(f"<th title='{_e(title)}' data-metric='{_e(h)}'>{_e(h)}{unit_html}</th>")
    body = []
    for r in rows:
        tds = [
            f"<td data-sort='{r.number}'>{r.number}</td>",
            f"<td class='text'>{_e(r.student)}</td>",
            f"<td class='text'>{_e(r.teacher)}</td>",
        ]
        for m in columns:
            c = r.cells[m]
            if c.value is None:
                tds.append(f"<td class='missing' data-sort='' title='{_e(c.missing_reason or 'missing')}'>—</td>")
            else:
                tip = f"{c.value:.6g} {c.unit}".strip() + (f" (method: {c.method})" if c.method else "")
                tds.append(f"<td data-sort='{_num_attr(c.value)}' title='{_e(tip)}'>{_e(c.text())}</td>")
        link = ""
        if artifact_dir is not None and r.artifact_id:
            path = Path(artifact_dir) / r.artifact_id
            if path.is_file():
                href = os.path.relpath(path, out_dir) if out_dir is not None else str(path)
                link = f"<a href='{_e(href)}' title='sha256 {_e(r.weights_sha256 or '?')}'>safetensors</a>"
            else:
                link = f"<span class='missing' title='artifact {_e(r.artifact_id)} not in {_e(artifact_dir)}'>—</span>"
        tds.append(f"<td class='text' data-sort='{_e(r.artifact_id or '')}'>{link or '—'}</td>")
        body.append(f"<tr data-trial='{r.number}'>{''.join(tds)}</tr>")
    return (
        "<div class='tablewrap'><table class='trials sortable' id='pareto-table'>"
        f"<thead><tr>{''.join(ths)}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"
    )


def _other_table(trials: list[optuna.trial.FrozenTrial]) -> str:
    rows = []
    for t in trials:
        if t.state == TrialState.COMPLETE and not feasible(t):
            state, why = "INFEASIBLE", infeasible_reason(t) or ""
        elif t.state == TrialState.FAIL:
            reason = t.user_attrs.get(tr.FAIL_REASON, "unknown")
            detail = t.user_attrs.get(tr.FAIL_DETAIL, "")
            state, why = f"FAIL ({reason})", str(detail)
        else:
            continue
        rows.append(
            f"<tr data-trial='{t.number}'><td data-sort='{t.number}'>{t.number}</td><td class='text'>{_e(state)}</td>"
            f"<td class='text'>{_e(t.user_attrs.get(tr.STUDENT, ''))}</td><td class='text'>{_e(why)}</td></tr>"
        )
    if not rows:
        return "<p class='note'>None: every trial completed within the constraints.</p>"
    return (
        "<div class='tablewrap'><table class='trials sortable' id='other-table'><thead><tr><th>#</th><th>state</th>"
        f"<th>student</th><th>reason</th></tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
    )


# ----------------------------------------------------------------------------------------------
# Page


def _figure_html(f: ReportFigure, first: bool) -> str:
    note = f"<p class='note'>{_e(f.note)}</p>" if f.note else ""
    if f.figure is None:
        return (
            f"<section class='figure' id='{_e(f.key)}-section'><h3>{_e(f.title)}</h3>"
            f"<p class='note warn' id='{_e(f.key)}'>Not drawn: {_e(f.note or 'no data')}</p></section>"
        )
    div = pio.to_html(
        f.figure,
        full_html=False,
        include_plotlyjs=True if first else False,
        div_id=f.key,
        config={"displaylogo": False, "responsive": True},
        default_height="520px",
    )
    return f"<section class='figure' id='{_e(f.key)}-section'><h3>{_e(f.title)}</h3>{div}{note}</section>"


def render_report(
    study: optuna.Study,
    out_dir: Path | None = None,
    artifact_dir: Path | None = None,
    figures: list[ReportFigure] | None = None,
    extra_notes: list[str] | None = None,
    storage_url: str | None = None,
) -> str:
    """The report page as one HTML string (``out_dir``: where it will live, for checkpoint and
    model-card links; ``artifact_dir``: ``<run-dir>/<study>/artifacts``, which also names the run
    folder in the export command; ``storage_url``: added to that command when not the default)."""
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    figs = figures if figures is not None else all_figures(study)
    columns = metric_columns(study, trials)
    front = pareto_front(study, feasible_only=True, trials=trials)
    rows = trial_rows(study, trials=front, columns=columns)
    run_dir = Path(artifact_dir).parent.parent if artifact_dir is not None else None
    header = _header(study, trials)
    title_end = header.index("</h1>") + len("</h1>")
    parts = [header[:title_end], glance_html(study, front, out_dir, run_dir, storage_url), header[title_end:]]
    for note in extra_notes or []:
        parts.append(f"<p class='note warn'>{_e(note)}</p>")
    parts.append(f"<h2>Pareto front (feasible): {len(rows)} trials</h2>")
    parts.append(
        "<p class='note'>Click a column header to sort. '—' = not measured; hover it for the reason. "
        "Hover a value for its unit and measurement method.</p>"
    )
    parts.append(_front_table(study, rows, columns, out_dir, artifact_dir) if rows
                 else "<p class='note warn'>No feasible COMPLETE trial yet.</p>")
    parts.append("<h2>Infeasible and failed trials</h2>")
    parts.append(_other_table(trials))
    parts.append("<h2>Figures</h2>")
    first = True
    for f in figs:
        parts.append(_figure_html(f, first and f.figure is not None))
        if f.figure is not None:
            first = False
    data = {
        "study": study.study_name,
        "metric_names": list(study.metric_names or []),
        "directions": [d.name.lower() for d in study.directions],
        "figures": [f.key for f in figs if f.figure is not None],
        "notes": {f.key: f.note for f in figs if f.figure is None},
        "pareto_trials": [r.number for r in rows],
    }
    summary = json.dumps(data).replace("</", "<\\/")
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>kdsearch report: {_e(study.study_name)}</title><style>{_CSS}</style></head><body>"
        + "".join(parts)
        + f"<script type='application/json' id='kdsearch-report-data'>{summary}</script>"
        + f"<script>{_SORT_JS}</script></body></html>"
    )


def write_pngs(figures: list[ReportFigure], png_dir: Path) -> tuple[list[Path], str | None]:
    """Static PNGs of the drawn figures when kaleido can be imported; else ``([], why)``."""
    try:
        import kaleido  # noqa: F401
    except ImportError:
        return [], "--png: static images skipped: kaleido is not installed (pip install kaleido)"
    png_dir = Path(png_dir)
    png_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for f in figures:
        if f.figure is None:
            continue
        path = png_dir / f"{f.key}.png"
        try:
            f.figure.write_image(str(path), width=1000, height=600)
        except Exception as exc:  # kaleido needs a browser it can start; report, don't fail the HTML
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return written, f"--png: static images stopped at {f.key}: {first}"
        written.append(path)
    return written, None


def build_report(
    storage_url: str,
    study_name: str,
    out_path: str | Path,
    artifact_dir: str | Path | None = None,
    png_dir: str | Path | None = None,
    run_dir: str | Path | None = None,
) -> Path:
    """Write the study's self-contained offline HTML report to ``out_path``; return the path.

    ``artifact_dir`` (the study's FileSystemArtifactStore folder) adds links to each front
    trial's checkpoint. ``png_dir`` also writes one PNG per figure when kaleido is importable;
    when it is not, the page says so (and a warning is logged) instead of failing. ``run_dir``
    lets a database study start from its trial snapshot (:func:`kdsearch.storage.load_study`).
    """
    study = load_study(storage_url, study_name, run_dir)  # run_dir: a database study's trial snapshot
    out = Path(out_path)
    if out.exists() and out.is_dir():
        raise ConfigError("--out", "must be an HTML file path, not a folder", str(out), f"try {out / 'report.html'}")
    figs = all_figures(study)
    notes: list[str] = []
    if png_dir is not None:
        _written, why = write_pngs(figs, Path(png_dir))
        if why:
            notes.append(why)
            _log.warning(why)
    page = render_report(
        study,
        out_dir=out.resolve().parent,
        artifact_dir=Path(artifact_dir).resolve() if artifact_dir is not None else None,
        figures=figs,
        extra_notes=notes,
        storage_url=storage_url,
    )
    _atomic_write_text(out, page)
    return out


def _atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temp file beside it and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0o022)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # a page others may read (mkstemp makes it 0600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
