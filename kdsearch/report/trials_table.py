"""The trial table of ``kdsearch trials`` and of the end of ``kdsearch optimize``: as a rich table
or as JSON-ready records.

``pareto=True`` keeps the feasible Pareto front plus the COMPLETE trials that break a constraint
(marked INFEASIBLE, so a user sees why a good-looking trial is not on the front), front first,
each group sorted best first by the first objective. The table opens with one row per teacher
(its val accuracy in the ``val_accuracy`` column) and gives every student's **test** accuracy minus
its teacher's (``vs teacher (test)``, percentage points), so the students are read against the
teacher on images neither has trained on: a pretrained teacher has usually trained on the whole
training split, which val is carved from, so its val accuracy can be inflated. The test
figures only report; selection stays on val.
"""

from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.table import Table

from kdsearch import trial_record as tr
from kdsearch.config.durations import format_duration
from kdsearch.device_record import DEVICE_INFO_ATTR, short_device_label
from kdsearch.metrics import format_metric
from kdsearch.report.pareto import feasible, front_sorted, metric_value, pareto_front, teacher_accuracies

__all__ = ["PARETO_FOOTNOTE", "VS_TEACHER", "leak_warnings", "pruned_label", "table_trials", "trials_table",
           "trial_records"]

VS_TEACHER = "vs teacher (test)"
PARETO_FOOTNOTE = (
    "* = on the feasible Pareto front; INFEASIBLE rows break a constraint and are not on it. "
    "Sorted by the first objective, best first; vs teacher (test) = the student's test accuracy minus the "
    "teacher's, in points (test: a split the teacher did not train on; reporting only, selection is on val)."
)


def leak_warnings(study: optuna.Study) -> list[str]:
    """The stored "teacher trained on val" warnings of the study's teachers (the rule is
    :func:`kdsearch.models.teacher.val_leak_check`), one line each."""
    stored = study.user_attrs.get(tr.TEACHERS)
    out: list[str] = []
    if isinstance(stored, dict):
        for info in stored.values():
            leak = info.get("val_leak") if isinstance(info, dict) else None
            if isinstance(leak, dict) and leak.get("suspected") and leak.get("message"):
                out.append(str(leak["message"]))
    return out


def table_trials(study: optuna.Study, pareto: bool) -> tuple[list[FrozenTrial], set[int]]:
    """(the trials to show, the numbers of the trials on the feasible front).

    ``pareto``: the front, then the infeasible COMPLETE trials and the trials screened out before
    the box (PRUNED, a fixed cost or the memory probe over its limit), each sorted best first by
    the first objective; otherwise every trial in number order.
    """
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    front_trials = pareto_front(study, feasible_only=True, trials=trials)
    front = {t.number for t in front_trials}
    if pareto:
        infeasible = [t for t in trials if (t.state == TrialState.COMPLETE and t.number not in front and not feasible(t))
                      or (t.state == TrialState.PRUNED and t.user_attrs.get(tr.SCREENED))]
        trials = front_sorted(study, front_trials) + front_sorted(study, infeasible)
    return trials, front


def pruned_label(user_attrs: dict[str, object]) -> str:
    """``PRUNED (rung 0.111)`` for a trial stopped at a rung (the rung as a fraction of the box),
    ``INFEASIBLE (screened)`` for one ended before the box (stored PRUNED) because a fixed cost
    or the memory probe broke a constraint."""
    if user_attrs.get(tr.SCREENED):
        return "INFEASIBLE (screened)"
    rung = user_attrs.get(tr.PRUNED_RUNG)
    return f"PRUNED (rung {rung:.3g})" if isinstance(rung, (int, float)) else "PRUNED"


def _vs_teacher(trial: FrozenTrial, names: list[str], teachers: dict[str, float]) -> str:
    """The student's test accuracy minus its teacher's (``teachers``: test accuracies)."""
    acc = metric_value(trial, "test_accuracy", names)
    ref = teachers.get(str(trial.user_attrs.get(tr.TEACHER, "")))
    if ref is None and len(teachers) == 1:
        ref = next(iter(teachers.values()))
    return "—" if acc is None or ref is None else f"{100.0 * (acc - ref):+.2f} pts"


def trials_table(study: optuna.Study, pareto: bool) -> Table:
    """Teacher rows, then one row per trial: number, state, student, teacher, each objective,
    val accuracy (when not an objective), KD time, vs teacher (test), device (when the trials ran
    on more than one; one device is named in the title), front mark. The teacher rows give the
    teacher's test accuracy in the vs-teacher column."""
    trials, front = table_trials(study, pareto)
    names = list(study.metric_names or [f"value{i}" for i in range(len(study.directions))])
    teachers = teacher_accuracies(study)
    teachers_test = teacher_accuracies(study, "test")
    # The device each trial trained on: in the title when they all share one, else a column.
    devices = {t.number: short_device_label(t.user_attrs.get(DEVICE_INFO_ATTR)) for t in trials}
    distinct = sorted({d for d in devices.values() if d})
    on = f", trained on {distinct[0]}" if len(distinct) == 1 else ""
    table = Table(title=f"{study.study_name}: {'Pareto front (feasible)' if pareto else 'all trials'}{on}")
    extra = [m for m in ("val_accuracy", "kd_time_s") if m not in names]
    # A searched box (study.trial_time a list): each trial's own box beside its KD time.
    box_col = ["box"] if any("trial_time_s" in t.params for t in trials) else []
    dev_col = ["device"] if len(distinct) > 1 else []
    for col in ["#", "state", "student", "teacher", *box_col, *names, *extra, VS_TEACHER, *dev_col, "front"]:
        table.add_column(col, justify="right" if col not in ("state", "student", "teacher", "device") else "left")
    for label, acc in teachers.items():
        cells = [format_metric(m, acc) if m == "val_accuracy" else "—" for m in [*names, *extra]]
        test = teachers_test.get(label)
        test_cell = f"test {format_metric('test_accuracy', test)}" if test is not None else "—"
        table.add_row("T", "teacher", "—", label, *["—"] * len(box_col), *cells, test_cell, *["—"] * len(dev_col), "",
                      style="bold")
    for t in trials:
        ua = t.user_attrs
        vals = [format_metric(m, v) for m, v in zip(names, t.values, strict=True)] if t.values else ["—"] * len(names)
        state = t.state.name
        if state == "COMPLETE" and not feasible(t):
            state = "INFEASIBLE"
        elif state == "FAIL":
            state = f"FAIL ({ua.get(tr.FAIL_REASON, '?')})"
        elif state == "PRUNED":
            state = pruned_label(ua)
        mark = "*" if t.number in front else ""
        more = [format_metric(m, ua.get(m)) for m in extra]
        box = [] if not box_col else \
            [format_duration(float(t.params["trial_time_s"])) if "trial_time_s" in t.params else "—"]
        dev = [devices[t.number] or "—"] if dev_col else []
        table.add_row(str(t.number), state, str(ua.get(tr.STUDENT, "")), str(ua.get(tr.TEACHER, "")), *box, *vals,
                      *more, _vs_teacher(t, names, teachers_test), *dev, mark)
    return table


def trial_records(study: optuna.Study, pareto: bool) -> list[dict[str, object]]:
    """The same trials as records, in trial-number order: number, state, params, values, user
    attrs, constraints, ``feasible`` (None unless COMPLETE) and ``pareto``."""
    trials, front = table_trials(study, pareto)
    trials = sorted(trials, key=lambda t: t.number)
    return [
        {
            "number": t.number,
            "state": t.state.name,
            "params": t.params,
            "values": t.values,
            "user_attrs": t.user_attrs,
            "constraints": t.constraints,
            "feasible": feasible(t) if t.state == TrialState.COMPLETE else (False if t.user_attrs.get(tr.SCREENED) else None),
            "pareto": t.number in front,
        }
        for t in trials
    ]
