"""Study files: YAML -> raw mapping (+ CLI overrides) -> frozen, validated dataclasses.

A study file has the sections ``study``, ``data``, ``teacher``, ``student``, ``distill``,
``objectives``, ``constraints``, ``measure``, ``finetune`` and ``debug``. Every key is checked: an
unknown key is an error that suggests the closest known key, and every value is validated on load
(type, range, allowed set).

Searchable values (:class:`Space`) are written in one of three forms::

    temperature: 4.0                          # fixed
    temperature: [2.0, 4.0, 8.0]              # categorical choices
    temperature: {low: 1.0, high: 8.0, log: true}   # numeric range (optional step)

Modules, by concept: ``durations`` (``90s`` -> seconds), ``space`` (:class:`Space` and the rule
of a searchable key), ``sections`` (one dataclass per section), ``student`` (the student
section; each ``student.<family>`` section is declared and validated in its family file under
``kdsearch/models/families/``), ``study`` (:class:`StudyConfig`, cross-section rules, the YAML
form) and ``loader`` (YAML, overrides on the raw mapping, building).
"""

from __future__ import annotations

from kdsearch.config.durations import format_duration, parse_duration
from kdsearch.config.loader import (
    apply_overrides,
    config_from_dict,
    load_config,
    override_raw,
    read_study_file,
)
from kdsearch.config.sections import (
    DATASETS,
    SAMPLERS,
    STUDY_DEVICES,
    DataConfig,
    DebugConfig,
    DistillConfig,
    EarlyStopConfig,
    EnergyConfig,
    FinetuneConfig,
    LatencyConfig,
    MeasureConfig,
    PruningConfig,
    RehearsalConfig,
    StudyRunConfig,
    TeacherCacheConfig,
    TeacherConfig,
    TeacherFitConfig,
    validate_storage_url,
)
from kdsearch.config.space import Space, space_field
from kdsearch.config.student import StudentConfig
from kdsearch.config.study import StudyConfig, config_to_dict

__all__ = [
    "Space",
    "space_field",
    "StudyRunConfig",
    "PruningConfig",
    "DataConfig",
    "TeacherCacheConfig",
    "TeacherFitConfig",
    "TeacherConfig",
    "StudentConfig",
    "EarlyStopConfig",
    "DistillConfig",
    "LatencyConfig",
    "EnergyConfig",
    "MeasureConfig",
    "FinetuneConfig",
    "DebugConfig",
    "RehearsalConfig",
    "StudyConfig",
    "parse_duration",
    "format_duration",
    "load_config",
    "read_study_file",
    "override_raw",
    "config_from_dict",
    "config_to_dict",
    "apply_overrides",
    "validate_storage_url",
    "DATASETS",
    "SAMPLERS",
    "STUDY_DEVICES",
]
