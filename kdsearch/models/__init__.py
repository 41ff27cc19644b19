"""kdsearch.models: students built from a StudentSpec through their family, and timm teachers.

One file per student family under :mod:`kdsearch.models.families` (its layer table, model, arch
record, study-file section, label, and only the search, preflight or weight-decay rules it needs
beyond the registry's defaults); the registry (:mod:`kdsearch.models.registry`) holds the defaults. Imports stay one-way: this package depends on
``kdsearch.config`` and ``kdsearch.errors`` only.
"""

from __future__ import annotations

from kdsearch.models.families import StudentFamily, UnknownFamilyError, family_names, get_family
from kdsearch.models.spec import StudentSpec
from kdsearch.models.students import build_student, param_groups, student_param_count
from kdsearch.models.suggest import suggest_space
from kdsearch.models.teacher import LoadedTeacher, create_teacher, state_dict_sha256, teacher_needs_fit

__all__ = [
    "StudentSpec",
    "StudentFamily",
    "UnknownFamilyError",
    "build_student",
    "family_names",
    "get_family",
    "param_groups",
    "student_param_count",
    "suggest_space",
    "LoadedTeacher",
    "create_teacher",
    "teacher_needs_fit",
    "state_dict_sha256",
]
