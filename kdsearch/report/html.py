"""One self-contained HTML report of a stored study; it works offline.

plotly.js is embedded inline once (the first figure, ``include_plotlyjs=True``; later figures
reuse it), the trial table sorts with a few lines of inline JavaScript, and nothing is loaded
from the network. The file is written atomically (temp file + ``os.replace``).
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import logging
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

import optuna
import plotly.io as pio
from optuna.trial import TrialState

from kdsearch._version import __version__
from kdsearch.checkpoint import atomic_write_text
from kdsearch.config import format_duration
from kdsearch.metrics import format_metric, metric_unit
from kdsearch.report.figures import ReportFigure, all_figures
from kdsearch.report.pareto import (
    TrialRow,
    feasible,
    infeasible_reason,
    metric_columns,
    trial_rows,
)
from kdsearch.storage import load_study

__all__ = ["build_report", "render_report", "write_pngs"]

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
    stored = study.user_attrs.get("teachers")
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
    labels = sorted({str(t.user_attrs["teacher"]) for t in trials if t.user_attrs.get("teacher")})
    return ", ".join(labels) or "not recorded"


def _dataset(study: optuna.Study, trials: list[optuna.trial.FrozenTrial]) -> str:
    cfg = study.user_attrs.get("config")
    if isinstance(cfg, dict) and isinstance(cfg.get("data"), dict) and cfg["data"].get("dataset"):
        data = cfg["data"]
        extra = f" (root {data['root']})" if data.get("root") else ""
        return f"{data['dataset']}{extra}"
    names = sorted({str(t.user_attrs["dataset"]) for t in trials if t.user_attrs.get("dataset")})
    return ", ".join(names) or "not recorded"


def _constraints(study: optuna.Study, trials: list[optuna.trial.FrozenTrial]) -> str:
    cfg = study.user_attrs.get("config")
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
    fails = Counter(str(t.user_attrs.get("fail_reason", "unknown")) for t in trials if t.state == TrialState.FAIL)
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
    spent = study.user_attrs.get("time_spent_s")
    spent_txt = format_duration(float(spent)) if isinstance(spent, (int, float)) else "not recorded"
    env = study.user_attrs.get("environment")
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
        ("Environment", env_short),
        ("kdsearch", f"stored by {study.user_attrs.get('kdsearch_version', '?')}, report by {__version__}"),
        ("Generated", _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %z")),
    ]
    meta = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in rows)
    details = (
        f"<details><summary>Full environment</summary><dl class='meta'>{env_full}</dl></details>" if env_full else ""
    )
    return f"<h1>kdsearch report: {_e(study.study_name)}</h1><dl class='meta' id='summary'>{meta}</dl>{details}"


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
            reason = t.user_attrs.get("fail_reason", "unknown")
            detail = t.user_attrs.get("fail_detail", "")
            state, why = f"FAIL ({reason})", str(detail)
        else:
            continue
        rows.append(
            f"<tr data-trial='{t.number}'><td data-sort='{t.number}'>{t.number}</td><td class='text'>{_e(state)}</td>"
            f"<td class='text'>{_e(t.user_attrs.get('student', ''))}</td><td class='text'>{_e(why)}</td></tr>"
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
) -> str:
    """The report page as one HTML string (``out_dir``: where it will live, for checkpoint links)."""
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    figs = figures if figures is not None else all_figures(study)
    columns = metric_columns(study, trials)
    rows = trial_rows(study, columns=columns)
    parts = [_header(study, trials)]
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
) -> Path:
    """Write the study's self-contained offline HTML report to ``out_path``; return the path.

    ``artifact_dir`` (the study's FileSystemArtifactStore folder) adds links to each front
    trial's checkpoint. ``png_dir`` also writes one PNG per figure when kaleido is importable;
    when it is not, the page says so (and a warning is logged) instead of failing.
    """
    study = load_study(storage_url, study_name)
    out = Path(out_path)
    if out.exists() and out.is_dir():
        from kdsearch.errors import ConfigError

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
    )
    atomic_write_text(out, page)
    return out
