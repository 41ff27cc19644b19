"""Plotly figures of a stored study, each with a stable key (the HTML div id) and a title.

Optuna's visualisation module draws what it can (Pareto front with infeasible trials greyed out
through the stored constraints, hypervolume history, parallel coordinates, parameter
importances); the accuracy-vs-cost scatters (one per cost objective, plus latency: the paper's
facets 2 and 3 at a glance: colour = input resolution, marker size = the student's size (VGG
depth), the teacher's val accuracy as a dashed horizontal line) are drawn here with plotly graph objects.

Optuna's plots read ``study.trials`` (a deep copy of every trial with all its user attributes)
once per parameter, which made a 1,000-trial report take minutes. They are given
:func:`plot_study` instead: an in-memory view holding a light copy of each trial (params,
distributions, values, state, constraints; of the user attributes only ``student`` and
``teacher``, which also keeps the hover text short) that is never deep-copied again.

A figure that cannot be drawn (too few trials, a single distinct value, no such metric) comes
back as a :class:`ReportFigure` with ``figure=None`` and a ``note`` saying why; the report shows
the note instead of failing.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import re
import sys
import warnings
from collections.abc import Callable, Container, Iterator
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

import optuna
import plotly.graph_objects as go
import plotly.io as pio
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from kdsearch import trial_record as tr
from kdsearch.config import format_duration
from kdsearch.metrics import metric_unit
from kdsearch.report.pareto import feasible, metric_columns, metric_value, pareto_front, teacher_accuracies

__all__ = [
    "ReportFigure",
    "axis_title",
    "reference_point",
    "pareto_figures",
    "hypervolume_figure",
    "parallel_coordinate_figure",
    "importance_figures",
    "learning_curves_figure",
    "accuracy_latency_figure",
    "accuracy_cost_figures",
    "cost_metrics",
    "latency_metric",
    "plot_study",
    "all_figures",
]

HV_MARGIN = 0.10  # reference point = worst value per objective pushed out by 10% of its span
MAX_CURVE_TRACES = 60  # learning curves: above this many trials, one trace per kind instead of per trial
MAX_RUNG_BOXES = 3  # learning curves: rung lines are drawn for at most this many distinct boxes
MAX_PARALLEL_LINES = 300  # parallel coordinates: above this many COMPLETE trials, a spread sample
TEMPLATE = "plotly_white"  # every report figure's plotly template

_P = ParamSpec("_P")
_R = TypeVar("_R")


@dataclass
class ReportFigure:
    """One figure of the report: ``key`` is its HTML div id; ``note`` explains a missing figure
    (``figure is None``) or adds context under a drawn one."""

    key: str
    title: str
    figure: go.Figure | None
    note: str | None = None


def axis_title(metric: str) -> str:
    """``"val_accuracy (fraction)"``: the metric with its unit."""
    unit = metric_unit(metric)
    return f"{metric} ({unit})" if unit else metric


def _key(*parts: str) -> str:
    return "fig-" + "-".join(re.sub(r"[^A-Za-z0-9_]+", "_", p) for p in parts)


# ----------------------------------------------------------------------------------------------
# A light study for Optuna's plots

_PLOT_USER_ATTRS = (tr.STUDENT, tr.TEACHER)


class _TrialListStudy(optuna.Study):
    """An in-memory study (directions and metric names copied) whose trials are a fixed list,
    handed out without copying: Optuna's plots only read them."""

    def __init__(self, source: optuna.Study, trials: list[FrozenTrial]) -> None:
        storage = optuna.storages.InMemoryStorage()
        level = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "new study created" line in the CLI
        try:
            storage.create_new_study(directions=list(source.directions), study_name=source.study_name)
        finally:
            optuna.logging.set_verbosity(level)
        super().__init__(source.study_name, storage)
        if source.metric_names:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.set_metric_names(list(source.metric_names))
        self.kd_trials = trials

    def get_trials(self, deepcopy: bool = True, states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        return [t for t in self.kd_trials if states is None or t.state in states]


def _light(t: FrozenTrial) -> FrozenTrial:
    # Optuna's plots use COMPLETE trials only; any other state stays as a FAIL placeholder so that
    # trial numbers (the hypervolume history's x axis) are kept.
    complete = t.state == TrialState.COMPLETE
    return FrozenTrial(
        number=t.number,
        state=t.state if complete or t.state.is_finished() else TrialState.FAIL,
        value=None,
        values=t.values if complete else None,
        datetime_start=t.datetime_start,
        datetime_complete=t.datetime_complete,
        params=t.params,
        distributions=t.distributions,
        user_attrs={k: t.user_attrs[k] for k in _PLOT_USER_ATTRS if k in t.user_attrs},
        system_attrs=t.system_attrs,
        intermediate_values=t.intermediate_values,
        trial_id=t.number,  # the storage id is not read by the plots
    )


def plot_study(study: optuna.Study) -> optuna.Study:
    """A read-only stand-in for ``study`` to hand to Optuna's plots (see the module docstring).

    A study that is already one is returned as it is.
    """
    if isinstance(study, _TrialListStudy):
        return study
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    return _TrialListStudy(study, [_light(t) for t in trials])


def _complete(study: optuna.Study) -> list[FrozenTrial]:
    return [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.values is not None and all(math.isfinite(v) for v in t.values)
    ]


def _names(study: optuna.Study) -> list[str]:
    return list(study.metric_names or [f"objective_{i}" for i in range(len(study.directions))])


def _quiet(fn: Callable[[], go.Figure]) -> go.Figure:
    """Run an Optuna plot without its experimental/deprecation warnings (the report is the UI)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


def _outline_best(fig: go.Figure) -> go.Figure:
    # Optuna colours front trials by trial number from near-white: a dark outline keeps the
    # earliest ones visible.
    for trace in fig.data:
        if "Best Trial" in str(getattr(trace, "hovertemplate", "") or ""):
            trace.marker.line = {"color": "#333333", "width": 1}
    return fig


@contextlib.contextmanager
def _template_default(name: str = TEMPLATE) -> Iterator[None]:
    """Make ``name`` plotly's default template while the block runs, then put the old one back.

    A figure created inside gets the template at creation, as plotly gives every figure its
    default (without validating it again); setting it afterwards through
    ``update_layout(template=...)`` validates the whole template, ~25 ms per figure, a tenth of
    a report's figure time on a soaked study.
    """
    before = pio.templates.default
    pio.templates.default = name
    try:
        yield
    finally:
        pio.templates.default = before


def _in_template(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Decorate a figure builder that creates plotly figures: every one has :data:`TEMPLATE`
    (builders that only call decorated ones need not be)."""

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with _template_default():
            return fn(*args, **kwargs)

    return wrapper


def _titled(fig: go.Figure, title: str) -> go.Figure:
    fig.update_layout(title={"text": title})  # the template came at creation (_in_template)
    return fig


# ----------------------------------------------------------------------------------------------
# Pareto fronts


@_in_template
def pareto_figures(study: optuna.Study) -> list[ReportFigure]:
    """One 2-D Pareto-front figure per pair of objectives, plus a 3-D one for three objectives.

    Optuna marks infeasible trials (any stored constraint > 0) in grey. With more than two
    objectives, "best" in a pair figure means on the front over *all* objectives (projected).
    """
    study = plot_study(study)
    names = _names(study)
    n = len(names)
    if n < 2:
        return [ReportFigure(_key("pareto"), "Pareto front", None, "single-objective study: no Pareto front")]
    done = _complete(study)
    if not done:
        return [ReportFigure(_key("pareto"), "Pareto front", None, "no COMPLETE trials yet")]
    out: list[ReportFigure] = []
    for i, j in itertools.combinations(range(n), 2):
        title = f"Pareto front: {names[i]} vs {names[j]}"
        if n == 2:
            fig = _quiet(lambda: optuna.visualization.plot_pareto_front(study, target_names=[axis_title(m) for m in names]))
        else:
            fig = _quiet(
                lambda i=i, j=j: optuna.visualization.plot_pareto_front(
                    study,
                    target_names=[axis_title(names[i]), axis_title(names[j])],
                    targets=lambda t: (t.values[i], t.values[j]),
                )
            )
        note = None if n == 2 else f"Best = on the feasible front over all {n} objectives, projected on this pair."
        out.append(ReportFigure(_key("pareto", names[i], names[j]), title, _titled(_outline_best(fig), title), note))
    if n == 3:
        title = f"Pareto front (3-D): {names[0]}, {names[1]}, {names[2]}"
        fig = _quiet(lambda: optuna.visualization.plot_pareto_front(study, target_names=[axis_title(m) for m in names]))
        out.append(ReportFigure(_key("pareto3d"), title, _titled(_outline_best(fig), title)))
    return out


# ----------------------------------------------------------------------------------------------
# Hypervolume


def reference_point(study: optuna.Study) -> list[float] | None:
    """Hypervolume reference point derived from the data: per objective, the worst value over
    the COMPLETE trials pushed out by :data:`HV_MARGIN` of that objective's span (of ``|worst|``
    when every value is equal, of 1 when that is 0). ``None`` without complete trials."""
    done = _complete(study)
    if not done:
        return None
    ref: list[float] = []
    for k, d in enumerate(study.directions):
        vals = [t.values[k] for t in done]
        lo, hi = min(vals), max(vals)
        span = hi - lo
        worst = lo if d == StudyDirection.MAXIMIZE else hi
        margin = HV_MARGIN * (span if span > 0 else (abs(worst) if worst != 0 else 1.0))
        ref.append(worst - margin if d == StudyDirection.MAXIMIZE else worst + margin)
    return ref


@_in_template
def hypervolume_figure(study: optuna.Study) -> ReportFigure:
    """Optuna's hypervolume history (feasible trials only) with the stated reference point."""
    key, title = _key("hypervolume"), "Hypervolume history"
    study = plot_study(study)
    names = _names(study)
    if len(names) < 2:
        return ReportFigure(key, title, None, "single-objective study: no hypervolume")
    ref = reference_point(study)
    if ref is None:
        return ReportFigure(key, title, None, "no COMPLETE trials yet")
    if not any(feasible(t) for t in _complete(study)):
        return ReportFigure(key, title, None, "no feasible COMPLETE trial yet: the hypervolume is 0")
    fig = _quiet(lambda: optuna.visualization.plot_hypervolume_history(study, ref))
    ref_text = ", ".join(f"{m} = {v:.6g}" for m, v in zip(names, ref, strict=False))
    note = (
        f"Reference point: {ref_text} (the worst value of each objective over the COMPLETE trials, "
        f"pushed out by {100 * HV_MARGIN:.0f}% of its span). Only feasible trials add volume."
    )
    return ReportFigure(key, title, _titled(fig, f"{title} (reference point: {ref_text})"), note)


# ----------------------------------------------------------------------------------------------
# Parameters


def _searched_params(done: list[FrozenTrial]) -> list[str]:
    """Parameters with more than one distinct value among ``done`` (fixed ones tell nothing)."""
    seen: dict[str, set[str]] = {}
    for t in done:
        for k, v in t.params.items():
            seen.setdefault(k, set()).add(repr(v))
    return sorted(k for k, vals in seen.items() if len(vals) > 1)


@_in_template
def parallel_coordinate_figure(study: optuna.Study) -> ReportFigure:
    """Optuna's parallel coordinates over the searched parameters (multi-objective: every
    objective as an axis, lines coloured by Pareto rank; infeasible trials dotted)."""
    key, title = _key("parallel"), "Parallel coordinates"
    study = plot_study(study)
    done = _complete(study)
    if len(done) < 2:
        return ReportFigure(key, title, None, f"needs at least 2 COMPLETE trials (has {len(done)})")
    params = _searched_params(done)
    if not params:
        return ReportFigure(key, title, None, "every parameter has a single value: nothing to compare")
    note = "Dotted lines: infeasible trials."
    if len(done) > MAX_PARALLEL_LINES:  # Optuna draws one plotly trace per trial: seconds at 1,000
        kept = _spread_sample(study, done, MAX_PARALLEL_LINES)
        study = _TrialListStudy(study, [t for t in study.get_trials() if t.state != TrialState.COMPLETE
                                        or t.number in kept])
        note += (f" {MAX_PARALLEL_LINES} of the {len(done)} COMPLETE trials are drawn: the feasible front, then "
                 f"trials spread evenly over the ranking by {_names(study)[0]}.")
    fig = _quiet(lambda: optuna.visualization.plot_parallel_coordinate(study, params=params))
    return ReportFigure(key, title, _titled(fig, title), note)


def _spread_sample(study: optuna.Study, done: list[FrozenTrial], n: int) -> set[int]:
    """Trial numbers of at most ``n`` of ``done``: the feasible front first, then trials evenly
    spaced over the ranking by the first objective (best to worst), so every part shows."""
    front = [t.number for t in pareto_front(study, feasible_only=True, trials=done)][:n]
    sign = 1.0 if study.directions[0] == StudyDirection.MINIMIZE else -1.0
    rest = sorted((t for t in done if t.number not in set(front)), key=lambda t: (sign * t.values[0], t.number))
    room = n - len(front)
    if room <= 0 or not rest:
        return set(front)
    step = len(rest) / room
    return set(front) | {rest[int(i * step)].number for i in range(min(room, len(rest)))}


def _import_importance_without_sklearn() -> None:
    """Import ``optuna.importance`` with scikit-learn hidden, when neither is imported yet.

    ``optuna.importance`` imports its fANOVA and mean-decrease-impurity evaluators, which import
    scikit-learn at module load (inside Optuna's ``try_import``, so a missing scikit-learn is
    fine): about 2 s of a report on the 2-core VM, for evaluators the report never uses (it uses
    PED-ANOVA, Optuna's default, numpy and scipy only). ``None`` in ``sys.modules`` makes that
    import fail as if scikit-learn were not installed; the entry is removed right after.
    """
    if "optuna.importance" in sys.modules or "sklearn" in sys.modules:
        return
    sys.modules["sklearn"] = None  # type: ignore[assignment]
    try:
        import optuna.importance  # noqa: F401, PLC0415
    finally:
        del sys.modules["sklearn"]


@_in_template
def importance_figures(study: optuna.Study) -> list[ReportFigure]:
    """Optuna's parameter importances (PED-ANOVA), one figure per objective (``target=``)."""
    _import_importance_without_sklearn()
    study = plot_study(study)
    names = _names(study)
    done = _complete(study)
    params = _searched_params(done)
    out: list[ReportFigure] = []
    for k, name in enumerate(names):
        key, title = _key("importance", name), f"Parameter importance for {name}"
        if len(done) < 2:
            out.append(ReportFigure(key, title, None, f"needs at least 2 COMPLETE trials (has {len(done)})"))
            continue
        if not params:
            out.append(ReportFigure(key, title, None, "every parameter has a single value: nothing to rank"))
            continue
        if len({tr.values[k] for tr in done}) < 2:
            out.append(ReportFigure(key, title, None, f"{name} has a single distinct value: nothing to explain"))
            continue
        try:
            fig = _quiet(
                lambda k=k, name=name: optuna.visualization.plot_param_importances(
                    study, params=params, target=lambda trial: trial.values[k], target_name=name
                )
            )
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:  # too little data for the evaluator
            out.append(ReportFigure(key, title, None, f"cannot rank parameters yet: {exc}"))
            continue
        out.append(ReportFigure(key, title, _titled(fig, title)))
    return out


# ----------------------------------------------------------------------------------------------
# Accuracy vs latency (facets 2 and 3)

_LAT_RE = re.compile(r"latency_ms_b(\d+)(_cpu|_cuda|_ort)?")
_PALETTE = ("#636efa", "#ef553b", "#00cc96", "#ab63fa", "#ffa15a", "#19d3f3", "#ff6692", "#b6e880")
_TEACHER_COLOURS = ("#444444", "#8c564b", "#7f7f7f")


def latency_metric(study: optuna.Study) -> str | None:
    """``latency_ms_b1`` when stored, else the latency metric with the smallest batch size."""
    cols = [c for c in metric_columns(study) if _LAT_RE.fullmatch(c)]
    if "latency_ms_b1" in cols:
        return "latency_ms_b1"
    cols.sort(key=lambda c: (int(_LAT_RE.fullmatch(c).group(1)), c))  # type: ignore[union-attr]
    return cols[0] if cols else None


def cost_metrics(study: optuna.Study) -> list[str]:
    """The objectives that are not accuracies (unit other than ``fraction``), in objective order,
    then the latency metric (:func:`latency_metric`) when no objective is one: what the
    accuracy-vs-cost figures put on their x axes."""
    out = [n for n in (study.metric_names or []) if metric_unit(n) not in (None, "fraction")]
    lat = latency_metric(study)
    if lat is not None and lat not in out:
        out.append(lat)
    return out


def _spec_value(t: FrozenTrial, field: str, param: str) -> float | None:
    spec = t.user_attrs.get(tr.SPEC)
    v = spec.get(field) if isinstance(spec, dict) else None
    if v is None:
        v = t.params.get(param)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


# Trials stored before their family named its size field: VGG depth, the only family then.
_LEGACY_SIZE_BY = {"field": "depth", "unit": "layers"}


def student_size(t: FrozenTrial) -> tuple[float | None, str, str]:
    """``(value, field, unit)``: how big the trial's student is, by the field its family names
    (stored as ``size_by`` with the trial; older trials: VGG ``depth`` in layers)."""
    size_by = t.user_attrs.get(tr.SIZE_BY)
    if not (isinstance(size_by, dict) and isinstance(size_by.get("field"), str)):
        size_by = _LEGACY_SIZE_BY
    field, unit = size_by["field"], str(size_by.get("unit", ""))
    family = (t.user_attrs.get(tr.SPEC) or {}).get("family", "vgg")
    return _spec_value(t, field, f"{family}_{field}"), field, unit


@_in_template
def accuracy_cost_figure(
    study: optuna.Study,
    cost: str,
    accuracy: str = "val_accuracy",
    teachers: dict[str, float] | None = None,
    front: set[int] | None = None,
    key: str | None = None,
) -> ReportFigure:
    """``accuracy`` against ``cost`` for every COMPLETE trial: colour = input resolution (px),
    size = the student's size field (:func:`student_size`: VGG depth in layers), ``x`` =
    infeasible, black ring = on the feasible Pareto front, and each teacher's val accuracy
    (``teachers``: label -> fraction, default the stored ones) as a dashed horizontal line. The y axis spans the students and the teachers. ``key``: the div id
    (default ``fig-acc-<cost>``; the report's latency figure keeps ``fig-acc_latency``)."""
    key = key or _key("acc", cost)
    names = list(study.metric_names or [])
    teachers = teacher_accuracies(study) if teachers is None else teachers
    if front is None:
        front = {t.number for t in pareto_front(study, feasible_only=True)}
    pts: list[tuple[FrozenTrial, float, float, float | None, float | None]] = []
    size_names: set[tuple[str, str]] = set()
    skipped: list[str] = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        x, y = metric_value(t, cost, names), metric_value(t, accuracy, names)
        if x is None or y is None:
            miss = [m for m, v in ((cost, x), (accuracy, y)) if v is None]
            why = (t.user_attrs.get(tr.MISSING_METRICS) or {}).get(miss[0], "not recorded")
            skipped.append(f"trial {t.number} ({miss[0]}: {why})")
            continue
        value, field, unit = student_size(t)
        size_names.add((field, unit))
        res = _spec_value(t, "resolution", "resolution")
        pts.append((t, x, y, int(res) if res is not None else None, value))
    # one family per study: its size field names the markers ("student size" if several)
    size_field, size_unit = next(iter(size_names)) if len(size_names) == 1 else ("student size", "")
    title = f"{accuracy} vs {cost}: colour = resolution, size = {size_field}, dashed = teacher"
    if not pts:
        return ReportFigure(key, title, None, f"no COMPLETE trial has both {accuracy} and {cost}")
    depths = [d for *_, d in pts if d is not None]
    dmin, dmax = (min(depths), max(depths)) if depths else (0.0, 0.0)

    def size(d: float | None) -> float:
        if d is None or dmax == dmin:
            return 14.0
        return 9.0 + 21.0 * (d - dmin) / (dmax - dmin)  # px: the shallowest 9, the deepest 30

    unit = metric_unit(cost) or ""
    fig = go.Figure()
    resolutions = sorted({r for *_, r, _ in pts if r is not None}) + ([None] if any(r is None for *_, r, _ in pts) else [])
    for idx, res in enumerate(resolutions):
        group = [p for p in pts if p[3] == res]
        color = _PALETTE[idx % len(_PALETTE)]
        fig.add_trace(
            go.Scatter(
                x=[p[1] for p in group],
                y=[p[2] for p in group],
                mode="markers",
                name=f"{res} px" if res is not None else "resolution unknown",
                text=[
                    f"trial {p[0].number}<br>{p[0].user_attrs.get(tr.STUDENT, '')}<br>"
                    + (f"{size_field} {p[4]:g}, " if p[4] is not None else "") + f"{res} px"
                    f"<br>{'on the feasible front' if p[0].number in front else ('feasible' if feasible(p[0]) else 'INFEASIBLE')}"
                    for p in group
                ],
                customdata=[p[0].number for p in group],
                hovertemplate=f"%{{text}}<br>{cost} = %{{x:.4g}} {unit}<br>{accuracy} = %{{y:.4f}}<extra></extra>",
                marker={
                    "color": color,
                    "size": [size(p[4]) for p in group],
                    "symbol": ["circle" if feasible(p[0]) else "x" for p in group],
                    "line": {
                        "color": ["black" if p[0].number in front else color for p in group],
                        "width": [2.5 if p[0].number in front else 0.5 for p in group],
                    },
                    "opacity": 0.85,
                },
            )
        )
    ys = [p[2] for p in pts] + list(teachers.values())
    lo, hi = min(ys), max(ys)
    pad = max(0.02, 0.06 * (hi - lo))
    for idx, (label, acc) in enumerate(teachers.items()):
        fig.add_hline(
            y=acc,
            line={"dash": "dash", "color": _TEACHER_COLOURS[idx % len(_TEACHER_COLOURS)], "width": 2},
            annotation_text=f"teacher {label}: val {100 * acc:.2f}%",
            annotation_position="bottom right" if idx % 2 == 0 else "top right",
        )
    fig.update_layout(
        xaxis_title=axis_title(cost),
        yaxis_title=axis_title(accuracy),
        yaxis_range=[max(lo - pad, 0.0), min(hi + pad, 1.0) if hi <= 1.0 else hi + pad],
        legend_title_text="input resolution",
    )
    if cost in ("macs", "params") or (unit == "ms" and max(p[1] for p in pts) > 50 * max(min(p[1] for p in pts), 1e-12)):
        fig.update_xaxes(type="log")  # spans decades
    note = (
        f"Marker size = {size_field} ({dmin:g} to {dmax:g}{' ' + size_unit if size_unit else ''}); x = infeasible; black ring = on the feasible Pareto front."
        if depths
        else "x = infeasible; black ring = on the feasible Pareto front."
    )
    note += (
        " Dashed: the teacher's val accuracy ("
        + ", ".join(f"{label} {100 * acc:.2f}%" for label, acc in teachers.items()) + ")."
        if teachers
        else " The teacher's accuracy was not recorded with this study."
    )
    if skipped:
        note += " Not shown (metric missing): " + "; ".join(skipped[:20]) + (
            f" and {len(skipped) - 20} more" if len(skipped) > 20 else "") + "."
    return ReportFigure(key, title, _titled(fig, title), note)


def accuracy_latency_figure(study: optuna.Study, accuracy: str = "val_accuracy") -> ReportFigure:
    """Accuracy vs the latency metric (:func:`latency_metric`); see :func:`accuracy_cost_figure`."""
    lat = latency_metric(study)
    if lat is None:
        title = f"{accuracy} vs latency: colour = resolution, size = student size, dashed = teacher"
        return ReportFigure(_key("acc_latency"), title, None, "no latency metric stored")
    return accuracy_cost_figure(study, lat, accuracy, key=_key("acc_latency"))


def accuracy_cost_figures(study: optuna.Study, accuracy: str = "val_accuracy") -> list[ReportFigure]:
    """One :func:`accuracy_cost_figure` per :func:`cost_metrics` entry (a note when there is none)."""
    costs = cost_metrics(study)
    if not costs:
        return [accuracy_latency_figure(study, accuracy)]
    lat = latency_metric(study)
    teachers = teacher_accuracies(study)
    front = {t.number for t in pareto_front(study, feasible_only=True)}
    return [
        accuracy_cost_figure(study, c, accuracy, teachers, front, key=_key("acc_latency") if c == lat else None)
        for c in costs
    ]


# ----------------------------------------------------------------------------------------------


@_in_template
def learning_curves_figure(study: optuna.Study) -> ReportFigure:
    """Every trial's in-box validation accuracy against its KD training time (``kd_history``):
    COMPLETE trials solid, PRUNED ones dashed and ending in a cross at the rung that stopped them
    (dotted lines mark the rungs, ``study.pruning``), so the reader sees why each was stopped.
    Trials screened out before the box have no curve and are counted in the note."""
    key, title = _key("curves"), "Validation accuracy vs KD time (pruned trials marked)"
    trials = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)),
                    key=lambda t: t.number)
    fig = go.Figure()
    drawn = screened = pruned = 0
    rungs: set[float] = set()
    boxes_s: set[float] = set()  # several when study.trial_time is searched
    curves: list[tuple[str, str, bool, list[float], list[float]]] = []  # label, how, pruned, xs, ys
    for t in trials:
        ua = t.user_attrs
        if ua.get(tr.SCREENED):
            screened += 1
            continue
        curve = (ua.get(tr.KD_HISTORY) or {}).get("val") or []
        if not curve:
            continue
        xs, ys = [float(p[0]) for p in curve], [float(p[1]) for p in curve]
        is_pruned = t.state == TrialState.PRUNED
        pruned += is_pruned
        rec = ua.get(tr.PRUNING) or {}
        method = (ua.get(tr.METHODS) or {}).get("kd_time_s") or {}
        if isinstance(method.get("box_s"), (int, float)):
            boxes_s.add(float(method["box_s"]))
        rungs.update(float(r) for r in rec.get("rungs", []))
        label = f"#{t.number} {ua.get(tr.STUDENT, '')}"
        if method.get("box_searched") and isinstance(method.get("box_s"), (int, float)):
            label += f" box {format_duration(float(method['box_s']))}"
        how = f"PRUNED at rung {ua.get(tr.PRUNED_RUNG, 0):.3g} ({ua.get(tr.PRUNE_REASON, '')})" if is_pruned else "COMPLETE"
        curves.append((label, how, is_pruned, xs, ys))
        drawn += 1
    if not drawn:
        return ReportFigure(key, title, None, "no trial stored an in-box validation curve yet")
    if drawn <= MAX_CURVE_TRACES:  # one trace (and legend entry) per trial
        for label, how, is_pruned, xs, ys in curves:
            fig.add_trace(go.Scatter(
                x=xs, y=ys, mode="lines+markers", name=label, legendgroup="pruned" if is_pruned else "complete",
                line={"dash": "dash" if is_pruned else "solid", "width": 1 if is_pruned else 2},
                marker={"size": [4] * (len(xs) - 1) + [10 if is_pruned else 4],
                        "symbol": ["circle"] * (len(xs) - 1) + ["x" if is_pruned else "circle"]},
                hovertemplate=f"{label}<br>{how}<br>KD %{{x:.3g}} s<br>val %{{y:.4f}}<extra></extra>",
            ))
    else:  # many trials: one trace per kind (curves joined by gaps), which plots in a blink
        for kind in (False, True):
            group = [c for c in curves if c[2] == kind]
            if not group:
                continue
            xs_all: list[float | None] = []
            ys_all: list[float | None] = []
            text: list[str] = []
            for label, how, _, xs, ys in group:
                xs_all += [*xs, None]
                ys_all += [*ys, None]
                text += [f"{label}<br>{how}"] * len(xs) + [""]
            fig.add_trace(go.Scatter(
                x=xs_all, y=ys_all, text=text, mode="lines", connectgaps=False, opacity=0.5,
                name=f"{'PRUNED' if kind else 'COMPLETE'} ({len(group)} trials)",
                line={"dash": "dash" if kind else "solid", "width": 1},
                hovertemplate="%{text}<br>KD %{x:.3g} s<br>val %{y:.4f}<extra></extra>",
            ))
            if kind:
                fig.add_trace(go.Scatter(
                    x=[c[3][-1] for c in group], y=[c[4][-1] for c in group], mode="markers",
                    text=[f"{c[0]}<br>{c[1]}" for c in group], name="pruned here",
                    marker={"symbol": "x", "size": 8},
                    hovertemplate="%{text}<br>KD %{x:.3g} s<br>val %{y:.4f}<extra></extra>",
                ))
    # Rung lines: a rung is a fraction of the box, so each box has its own (a searched box has
    # several; past MAX_RUNG_BOXES boxes the lines would hide the curves and are left out).
    if len(boxes_s) <= MAX_RUNG_BOXES:
        for box_s in sorted(boxes_s):
            for r in sorted(rungs):
                text = f"rung {r:.3g}" if len(boxes_s) == 1 else f"rung {r:.3g} of {format_duration(box_s)}"
                fig.add_vline(x=r * box_s, line={"dash": "dot", "color": "grey"}, annotation_text=text)
    fig.update_layout(xaxis_title=axis_title("kd_time_s"), yaxis_title=axis_title("val_accuracy"))
    note = f"{drawn} trials drawn ({pruned} pruned at a rung, dashed)"
    if drawn > MAX_CURVE_TRACES:
        note += f"; over {MAX_CURVE_TRACES} trials the curves share one trace per kind (hover a line for its trial)"
    if screened:
        note += f"; {screened} screened out before the box (no curve)"
    return ReportFigure(key, title, _titled(fig, title), note + ".")


def all_figures(study: optuna.Study) -> list[ReportFigure]:
    """Every figure of the report, in page order."""
    light = plot_study(study)
    figs: list[ReportFigure] = []
    figs += accuracy_cost_figures(study)  # what a user looks at first: the students against the teacher
    figs += pareto_figures(light)
    figs.append(hypervolume_figure(light))
    figs.append(learning_curves_figure(study))
    figs.append(parallel_coordinate_figure(light))
    figs += importance_figures(light)
    return figs
