"""Paper-style pivot tables from storage for ``kdsearch table`` (the paper's Tables I-III, and any
other pivot). The per-trial table of ``kdsearch trials`` is :mod:`kdsearch.report.trials_table`.

A key (row, column) is looked up on each COMPLETE trial in this order: the trial's params, its
user attrs, then its StudentSpec fields (``depth``, ``width``, ``family``, ``resolution`` ...).
Cells aggregate a metric over the trials that share a (row, column) pair.
"""

from __future__ import annotations

import csv
import difflib
import io
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.trial import FrozenTrial, TrialState

from kdsearch import trial_record as tr
from kdsearch.errors import ConfigError
from kdsearch.metrics import format_metric, metric_unit

__all__ = ["PivotTable", "pivot_table", "render_markdown", "render_csv", "trial_key"]

_AGGS = {
    "max": max,
    "min": min,
    "mean": statistics.fmean,
    "median": statistics.median,
}


@dataclass(frozen=True)
class PivotTable:
    rows_key: str
    cols_key: str
    metric: str
    agg: str
    row_labels: list[Any]
    col_labels: list[Any]
    cells: dict[tuple[Any, Any], float | None]
    counts: dict[tuple[Any, Any], int]
    unit: str


def trial_key(trial: FrozenTrial, key: str) -> Any:
    """The value of ``key`` for a trial (params, then user attrs, then spec fields), or None."""
    if key in trial.params:
        return trial.params[key]
    if key in trial.user_attrs:
        return trial.user_attrs[key]
    spec = trial.user_attrs.get(tr.SPEC) or {}
    return spec.get(key)


def _known_keys(trials: Sequence[FrozenTrial]) -> list[str]:
    keys: set[str] = set()
    for t in trials:
        keys |= set(t.params) | {k for k, v in t.user_attrs.items() if not isinstance(v, (dict, list))}
        keys |= set((t.user_attrs.get(tr.SPEC) or {}).keys())
    return sorted(keys)


def pivot_table(study: optuna.Study, *, rows: str, cols: str, metric: str, agg: str = "max") -> PivotTable:
    """Pivot the COMPLETE trials of ``study``: one cell per (rows, cols) value, ``agg`` of ``metric``."""
    if agg not in _AGGS:
        raise ConfigError("--agg", f"must be one of {sorted(_AGGS)}", agg)
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not trials:
        raise ConfigError("--study-name", "the study has no COMPLETE trials to tabulate", study.study_name)
    known = _known_keys(trials)
    for flag, key in (("--rows", rows), ("--cols", cols), ("--metric", metric)):
        if not any(trial_key(t, key) is not None for t in trials):
            m = difflib.get_close_matches(key, known, n=1)
            raise ConfigError(flag, "is not a param, user attr or spec field of any COMPLETE trial", key,
                              f"did you mean {m[0]!r}?" if m else None)
    groups: dict[tuple[Any, Any], list[float]] = {}
    for t in trials:
        r, c, v = trial_key(t, rows), trial_key(t, cols), trial_key(t, metric)
        if r is None or c is None:
            continue
        bucket = groups.setdefault((r, c), [])
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            bucket.append(float(v))
    row_labels = _ordered({k[0] for k in groups}, trials, rows)
    col_labels = _ordered({k[1] for k in groups}, trials, cols)
    fn = _AGGS[agg]
    cells = {k: (fn(v) if v else None) for k, v in groups.items()}
    counts = {k: len(v) for k, v in groups.items()}
    return PivotTable(rows, cols, metric, agg, row_labels, col_labels, cells, counts, metric_unit(metric) or "")


def _sort_key(v: Any) -> tuple[int, Any]:
    return (0, v) if isinstance(v, (int, float)) else (1, str(v))


def _ordered(labels: set[Any], trials: Sequence[FrozenTrial], key: str) -> list[Any]:
    """Labels of a categorical param in the order the study file lists them (XS, S, M, L, XL);
    anything else numerically, then alphabetically."""
    for t in trials:
        dist = t.distributions.get(key)
        if isinstance(dist, CategoricalDistribution):
            order = {v: i for i, v in enumerate(dist.choices)}
            return sorted(labels, key=lambda v: (order.get(v, len(order)), _sort_key(v)))
    return sorted(labels, key=_sort_key)


def render_markdown(table: PivotTable) -> str:
    """A Markdown table; the header names the metric, its unit and the aggregation."""
    unit = f" [{table.unit}]" if table.unit and table.unit != "fraction" else ""
    corner = f"{table.rows_key} \\ {table.cols_key}"
    lines = [
        f"{table.agg} of {table.metric}{unit} by {table.rows_key} x {table.cols_key} (n = trials per cell)",
        "",
        "| " + " | ".join([corner, *map(str, table.col_labels)]) + " |",
        "|" + "---|" * (len(table.col_labels) + 1),
    ]
    for r in table.row_labels:
        cells = []
        for c in table.col_labels:
            if (r, c) in table.cells:  # trials exist here; "—" when none had a finite value
                cells.append(f"{format_metric(table.metric, table.cells[(r, c)], unit=False)} (n={table.counts[(r, c)]})")
            else:
                cells.append("")
        lines.append("| " + " | ".join([str(r), *cells]) + " |")
    return "\n".join(lines)


def render_csv(table: PivotTable) -> str:
    """CSV with raw (unformatted) values; empty cells where no trial matched."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow([f"{table.rows_key}\\{table.cols_key}", *table.col_labels])
    for r in table.row_labels:
        row = []
        for c in table.col_labels:
            v = table.cells.get((r, c))
            row.append("" if v is None else repr(v))
        w.writerow([r, *row])
    return buf.getvalue()
