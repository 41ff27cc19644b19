"""The accuracy-vs-cost scatter sizes its markers by the field the student's family names."""

from __future__ import annotations

import dataclasses

import optuna
import pytest
from optuna.trial import create_trial

from kdsearch import trial_record as tr
from kdsearch.models.families import get_family
from kdsearch.models.spec import StudentSpec
from kdsearch.report.figures import accuracy_cost_figure, student_size


def _study(trials: list[optuna.trial.FrozenTrial]) -> optuna.Study:
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.set_metric_names(["val_accuracy", "params"])
    for t in trials:
        study.add_trial(t)
    return study


def _trial(spec: StudentSpec | None, acc: float, params: float, legacy: bool = False) -> optuna.trial.FrozenTrial:
    attrs = {} if spec is None else {tr.SPEC: spec.to_dict(), tr.STUDENT: spec.label}
    if spec is not None and not legacy:
        attrs[tr.SIZE_BY] = spec.size_by()
    return create_trial(values=[acc, params], user_attrs=attrs)


def _mnv3(depth_multiplier: float) -> StudentSpec:
    return StudentSpec("mobilenetv3", 32, 10, {"size": "small", "channel_multiplier": 0.5,
                                                "depth_multiplier": depth_multiplier})


def test_each_family_names_a_size_field_and_the_trial_stores_it() -> None:
    vgg = StudentSpec("vgg", 32, 10, {"depth": 8, "width": 0.25})
    assert vgg.size_by() == {"field": "depth", "unit": "layers"}
    assert _mnv3(0.75).size_by()["field"] == "depth_multiplier"


def test_a_family_whose_size_field_is_not_an_arch_field_is_refused() -> None:
    vgg = get_family("vgg")
    with pytest.raises(ValueError, match="size_field 'widthh' is not an arch field"):
        dataclasses.replace(vgg, size_field="widthh")


def test_mobilenetv3_markers_grow_with_the_depth_multiplier() -> None:
    study = _study([_trial(_mnv3(0.5), 0.6, 1e5), _trial(_mnv3(1.0), 0.7, 2e5), _trial(_mnv3(0.75), 0.65, 1.5e5)])
    fig = accuracy_cost_figure(study, "params", teachers={}, front=set())
    assert fig.figure is not None
    (trace,) = fig.figure.data
    by_size = sorted(zip(trace.marker.size, trace.x, strict=True))
    assert [x for _, x in by_size] == [1e5, 1.5e5, 2e5]  # the smallest multiplier, the smallest marker
    assert by_size[0][0] < by_size[1][0] < by_size[2][0]
    assert "size = depth_multiplier" in fig.title
    assert "Marker size = depth_multiplier (0.5 to 1 x the repeats of every stage)" in fig.note
    assert "depth_multiplier 0.75" in " ".join(trace.text)


def test_trials_stored_before_size_by_are_sized_by_vgg_depth() -> None:
    old = [_trial(StudentSpec("vgg", 32, 10, {"depth": d, "width": 0.25}), 0.5 + d / 100, d * 1e4, legacy=True)
           for d in (3, 5, 11)]
    assert student_size(old[0]) == (3.0, "depth", "layers")
    fig = accuracy_cost_figure(_study(old), "params", teachers={}, front=set())
    assert "Marker size = depth (3 to 11 layers)" in fig.note
    (trace,) = fig.figure.data
    assert list(trace.marker.size) == [9.0, 9.0 + 21.0 * 2 / 8, 30.0]


def test_a_trial_without_a_spec_gets_the_default_marker() -> None:
    fig = accuracy_cost_figure(_study([_trial(None, 0.5, 1e4), _trial(None, 0.6, 2e4)]), "params", teachers={}, front=set())
    (trace,) = fig.figure.data
    assert list(trace.marker.size) == [14.0, 14.0]
    assert "Marker size" not in fig.note
