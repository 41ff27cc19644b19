"""The whole study file as one validated :class:`StudyConfig`, and its YAML-shaped form."""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from typing import Any

from kdsearch.config.sections import (
    REHEARSAL_METRICS,
    DataConfig,
    DebugConfig,
    DistillConfig,
    FinetuneConfig,
    MeasureConfig,
    RehearsalConfig,
    StudyRunConfig,
    TeacherConfig,
)
from kdsearch.config.space import Space
from kdsearch.config.student import StudentConfig, student_family
from kdsearch.errors import ConfigError
from kdsearch.metrics import (
    TEST_SPLIT_RULE,
    MetricSettings,
    is_known_metric,
    is_selectable_metric,
    metric_examples,
    val_counterpart,
    why_not_produced,
)

__all__ = ["StudyConfig", "config_to_dict", "DURATION_KEYS", "TOP_KEYS", "SIGNATURE_DATA_KEYS"]

# YAML key -> (dataclass field, converter). Durations are written as strings in YAML and stored
# as seconds; these fields get a ``_s`` suffix internally.
DURATION_KEYS = {
    ("study", "budget"): "budget_s",
    ("study", "trial_time"): "trial_times_s",  # a duration, or a list of them (searched)
    ("study", "grace"): "grace_s",
    ("teacher.fit", "time"): "time_s",
    ("measure.latency", "max_time"): "max_time_s",
    ("measure", "max_time"): "max_time_s",
    ("measure.energy", "infer_min_time"): "infer_min_time_s",
    ("measure.energy", "poll_interval"): "poll_interval_s",
}

TOP_KEYS = ["study", "data", "teacher", "student", "distill", "objectives", "constraints", "measure", "finetune", "debug", "rehearsal"]


@dataclass(frozen=True)
class StudyConfig:
    study: StudyRunConfig = field(default_factory=StudyRunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    teachers: tuple[TeacherConfig, ...] = field(default_factory=lambda: (TeacherConfig(),))
    student: StudentConfig = field(default_factory=StudentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    objectives: dict[str, str] = field(default_factory=lambda: {"val_accuracy": "maximize", "macs": "minimize"})
    constraints: dict[str, float] = field(default_factory=dict)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    rehearsal: RehearsalConfig = field(default_factory=RehearsalConfig)  # replay a recorded table, no training
    source: str | None = field(default=None, compare=False)  # the file it came from (not identity)

    def __post_init__(self) -> None:
        if not self.objectives:
            raise ConfigError("objectives", "must name at least one metric", self.objectives)
        # Each objective and constraint: a metric kdsearch stores, off the test split, and one
        # that this study's own settings produce (metrics.why_not_produced, the one rule).
        for metric, direction in self.objectives.items():
            _check_known(f"objectives.{metric}", metric, self.measure.latency.batch_sizes, list_known=True)
            if direction not in ("maximize", "minimize"):
                raise ConfigError(f"objectives.{metric}", "must be maximize or minimize", direction)
            _check_selectable(f"objectives.{metric}", metric, self)
        for metric, limit in self.constraints.items():
            _check_known(f"constraints.{metric}", metric, self.measure.latency.batch_sizes, list_known=False)
            if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not math.isfinite(limit):
                raise ConfigError(f"constraints.{metric}", "must be a finite number (upper limit)", limit)
            _check_selectable(f"constraints.{metric}", metric, self)
        if self.measure.max_time_s is not None and self.measure.max_time_s >= self.study.grace_s:
            raise ConfigError("measure.max_time", f"must be shorter than study.grace ({self.study.grace_s:g} s): "
                              "the trial is killed at box + grace", self.measure.max_time_s,
                              "lower measure.max_time or raise study.grace")
        names = [t.name if t.label is None else t.label for t in self.teachers]
        if len(set(names)) != len(names):
            raise ConfigError("teacher", "teachers in a list need distinct names or labels", names)
        # The family names and each family's section rules are checked by StudentConfig and the
        # family's section dataclass (kdsearch/models/families/<name>.py).
        res = self.student.resolution
        lo = min(res.values()) if res.choices else res.low
        hi = max(res.values()) if res.choices else res.high
        if lo < 16 or hi > 224:
            raise ConfigError("student.resolution", "must lie in [16, 224] pixels", res.to_yaml())
        if self.finetune.enabled and self.data.finetune_fraction <= 0:
            raise ConfigError(
                "data.finetune_fraction",
                "must be > 0 when finetune.enabled is true (fine-tuning needs its own images)",
                self.data.finetune_fraction,
            )
        if self.study.pruning.enabled and self.objectives.get("val_accuracy") != "maximize":
            raise ConfigError(
                "study.pruning.enabled", "needs val_accuracy as a maximised objective (rungs rank the "
                "validation accuracy at a fraction of the box)", list(self.objectives),
                "add objectives: {val_accuracy: maximize} or set study.pruning.enabled: false",
            )
        if self.rehearsal.enabled:
            _check_rehearsal(self)
        if self.study.sampler == "grid":
            for name, sp in _iter_spaces(self):
                if sp.choices is None and sp.step is None:
                    raise ConfigError(
                        name, "the grid sampler needs a list or a stepped range, not a continuous range", sp.to_yaml()
                    )

    @property
    def metric_settings(self) -> MetricSettings:
        """The settings that decide which metric names this study's trials store."""
        lat = self.measure.latency
        return MetricSettings(batch_sizes=tuple(lat.batch_sizes), latency_devices=tuple(lat.devices),
                              energy_enabled=self.measure.energy.enabled, finetune_enabled=self.finetune.enabled)

    @property
    def teacher(self) -> TeacherConfig:
        """The first (usually the only) teacher."""
        return self.teachers[0]

    @property
    def directions(self) -> list[str]:
        return list(self.objectives.values())

    @property
    def metric_names(self) -> list[str]:
        return list(self.objectives.keys())

    def search_signature(self) -> dict[str, Any]:
        """What must match when a stored study is resumed: every setting that changes a stored
        figure, so trials made under other settings are never mixed into one front.

        In it: objectives, constraints, the listed student families' sections, the whole
        ``distill`` section (the space, optimiser, weight decay, batch size, warm-up, final LR,
        evaluation cadence, early stop, label smoothing, amp, compile, channels_last), every
        teacher (with its mean/std, fit and cache settings), the data that selects the images
        (data set, split fractions and seed, stored size, sample caps), the whole ``measure``
        section plus the measurement budget it resolves to, the ``finetune`` section, the time
        box, the sampler and ``study.pruning`` (a pruned trial has no final figures). Left out (they may change between runs): budget, trial count,
        workers, GPU sharing and ``study.device`` (each trial stores the device it trained on), storage, grace (except through the measurement budget), the data
        folder, loader workers and residency, and the test-only ``debug`` section.
        """
        full = config_to_dict(self)
        # Only the sections of the families the study can propose: adding a family to kdsearch, or
        # editing the section of a family the study does not list, changes no study's search.
        listed = {"family", "resolution", *self.student.families}
        return {
            "objectives": full["objectives"],
            "constraints": full["constraints"],
            "student": {k: v for k, v in full["student"].items() if k in listed},
            "distill": full["distill"],
            "teacher": full["teacher"],
            "data": {k: full["data"][k] for k in SIGNATURE_DATA_KEYS},
            "measure": {**full["measure"], "budget_s": self.measure.budget_s(self.study.grace_s)},
            "finetune": full["finetune"],
            # One box: a number, as before boxes could be searched (stored studies still resume).
            "trial_time_s": full["study"]["trial_time"],
            "sampler": self.study.sampler,
            "pruning": full["study"]["pruning"],
            # Rehearsed trials replay a table: never mixed with trained ones (absent when off, so
            # studies stored before rehearsals existed still resume).
            **({"rehearsal_table": self.rehearsal.table} if self.rehearsal.enabled else {}),
        }


SIGNATURE_DATA_KEYS: tuple[str, ...] = (
    "dataset", "val_fraction", "seed", "finetune_fraction", "image_size", "max_train_samples",
    "max_test_samples", "num_classes", "synthetic_train_size", "synthetic_test_size",
)
"""The ``data`` keys that choose which images a trial trains, selects and reports on."""


def _check_known(field_name: str, metric: str, batch_sizes: tuple[int, ...], *, list_known: bool) -> None:
    """A metric kdsearch does not measure is a one-line error suggesting the closest name (or, with
    ``list_known``, listing the known ones when nothing is close). A known name at a batch size
    the study does not measure is :func:`_check_selectable`'s refusal, which names the setting."""
    if is_known_metric(metric):
        return
    known = metric_examples(batch_sizes)
    m = difflib.get_close_matches(metric, known, n=1)
    fix = f"did you mean {m[0]!r}?" if m else (f"known: {', '.join(known)}" if list_known else None)
    raise ConfigError(field_name, "is not a metric kdsearch measures", metric, fix)


def _check_selectable(field_name: str, metric: str, cfg: StudyConfig) -> None:
    """Refuse a test-split metric, and one that this study's settings never produce (a device,
    batch size, energy or fine-tune setting missing: :func:`kdsearch.metrics.why_not_produced`),
    naming the setting to add. Without this every trial would train its whole box and then fail
    ``missing_objective``."""
    if not is_selectable_metric(metric):
        alt = val_counterpart(metric)
        raise ConfigError(field_name, TEST_SPLIT_RULE, metric, f"use {alt!r} instead" if alt else None)
    why = why_not_produced(metric, cfg.metric_settings)
    if why is not None:
        raise ConfigError(field_name, why.rule, metric, why.fix)


def _check_rehearsal(cfg: StudyConfig) -> None:
    """What a rehearsal can replay: VGG students (the table's rows), full-box curves (no plateau
    stop, no fine-tune) and the figures a row records (:data:`REHEARSAL_METRICS`)."""
    if cfg.student.families != ["vgg"]:
        raise ConfigError("student.family", "must be vgg in a rehearsal (the recorded table holds VGG students)",
                          cfg.student.family.to_yaml(), "set student.family: vgg, or drop the rehearsal section")
    if cfg.distill.early_stop.enabled:
        raise ConfigError("distill.early_stop.enabled", "must be false in a rehearsal (the table records "
                          "full-box curves, with no plateau stop)", True, "set distill.early_stop.enabled: false")
    if cfg.finetune.enabled:
        raise ConfigError("finetune.enabled", "must be false in a rehearsal (the table records no fine-tune)", True)
    for section, names in (("objectives", cfg.objectives), ("constraints", cfg.constraints)):
        for metric in names:
            if metric not in REHEARSAL_METRICS:
                raise ConfigError(f"{section}.{metric}", "is not recorded in a rehearsal table", metric,
                                  f"a rehearsal replays {', '.join(REHEARSAL_METRICS)}")


def _iter_spaces(cfg: StudyConfig) -> typing.Iterator[tuple[str, Space]]:
    """``(YAML name, Space)`` of every value a trial may suggest: the student's family and
    resolution, the searched keys of each listed family's section (a family names its Optuna
    params ``<family>_<section key>``), and the distill section's."""
    yield "student.family", cfg.student.family
    yield "student.resolution", cfg.student.resolution
    for fam_name in cfg.student.families:
        section = cfg.student.section(fam_name)
        searched = student_family(fam_name).params(section)
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if isinstance(value, Space) and f"{fam_name}_{f.name}" in searched:
                yield f"student.{fam_name}.{f.name}", value
    for f in dataclasses.fields(cfg.distill):
        value = getattr(cfg.distill, f.name)
        if isinstance(value, Space):
            yield f"distill.{f.name}", value




def config_to_dict(cfg: StudyConfig) -> dict[str, Any]:
    """The resolved config as YAML-shaped plain data (durations in seconds, spaces in YAML form).

    ``config_from_dict(config_to_dict(cfg))`` rebuilds an equal config.
    """

    def dump(obj: Any, section: str) -> Any:
        if isinstance(obj, Space):
            return obj.to_yaml()
        if isinstance(obj, StudentConfig):  # family sections are keys of their own
            return {key: dump(value, f"student.{key}") for key, value in obj.yaml_items()}
        if dataclasses.is_dataclass(obj):
            inv = {v: k for (sec, k), v in DURATION_KEYS.items() if sec == section}
            out: dict[str, Any] = {}
            for f in dataclasses.fields(obj):
                if f.name == "source":
                    continue
                key = inv.get(f.name, f.name)
                out[key] = dump(getattr(obj, f.name), f"{section}.{f.name}" if section else f.name)
            return out
        if isinstance(obj, tuple):
            if section == "study.trial_times_s" and len(obj) == 1:
                return obj[0]  # one box: written as a duration, as in the file
            return [dump(v, section) for v in obj]
        if isinstance(obj, dict):
            return {k: dump(v, section) for k, v in obj.items()}
        return obj

    out: dict[str, Any] = {}
    for key in TOP_KEYS:
        if key == "teacher":
            teachers = [dump(t, "teacher") for t in cfg.teachers]
            out["teacher"] = teachers[0] if len(teachers) == 1 else teachers
        else:
            out[key] = dump(getattr(cfg, key), key)
    return out
