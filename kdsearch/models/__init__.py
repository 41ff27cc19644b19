"""kdsearch.models: students (VGG, ViT) built from a StudentSpec, and timm teachers.

Imports stay one-way: this package depends on ``kdsearch.config`` and ``kdsearch.errors`` only.
"""

from __future__ import annotations

from kdsearch.models.registry import build_student, register_student, student_families, student_param_count
from kdsearch.models.spec import StudentSpec
from kdsearch.models.teacher import LoadedTeacher, create_teacher, state_dict_sha256, teacher_needs_fit
from kdsearch.models.vgg import vgg_width_for_params
from kdsearch.models.vit import validate_vit_spec, vit_patch_size

__all__ = [
    "StudentSpec",
    "build_student",
    "register_student",
    "student_families",
    "student_param_count",
    "LoadedTeacher",
    "create_teacher",
    "teacher_needs_fit",
    "state_dict_sha256",
    "vgg_width_for_params",
    "vit_patch_size",
    "validate_vit_spec",
]
