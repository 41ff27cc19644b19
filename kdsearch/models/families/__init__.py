"""Every student family, one module each; importing this package registers them all.

To add a family, add one module here that builds its :class:`~kdsearch.models.registry.StudentFamily`
and calls ``register_family`` (see ``vgg.py``), a test file under ``tests/models/`` and, to use it, a
``student.<name>`` section in a study file. Nothing else changes: modules are found with
:mod:`pkgutil`, and the study file's ``student`` section is validated by the family's section
dataclass.
"""

from __future__ import annotations

import importlib
import pkgutil

from kdsearch.models.registry import StudentFamily, UnknownFamilyError, family_names, get_family

__all__ = ["StudentFamily", "UnknownFamilyError", "family_names", "get_family"]

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")
