"""Student families: one :class:`StudentFamily` record per family name, as timm's ``_registry``.

Each family file (``kdsearch/models/families/<name>.py``) imports this module and calls
:func:`register_family` once, and ``kdsearch.models.families`` imports every family file, so
importing that package fills the registry. Look families up through ``kdsearch.models.families``
(which guarantees they are all imported), not through this module. This module imports only the
``Space`` record and :func:`~kdsearch.models.suggest.suggest_space` (and timm's weight-decay rule
on first use), so the study file's floor can read it.

The student contract. Every student model a family builds exposes:

* ``forward_features(x)`` and ``forward_head(features, pre_logits=False)``, with
  ``forward(x) == forward_head(forward_features(x))``;
* ``features`` (the feature extractor) and ``head`` (the classifier): two disjoint modules that
  together hold every parameter, so fine-tuning can train ``head`` alone;
* ``last_block`` (the last feature block, which fine-tuning may unfreeze; a property, so it is
  not registered twice in the ``state_dict``);
* ``student_family``: the family name, so :func:`kdsearch.models.param_groups` can find the
  family's own weight-decay rule from the model alone.

A family's architecture record (``arch``) is a frozen dataclass whose field names never clash with
the keys every :class:`~kdsearch.models.StudentSpec` has (:data:`SPEC_KEYS`): a spec serialises
flat, ``{family, resolution, num_classes, in_chans, <arch fields>}``. The arch record is where a
family validates an architecture, once.

What a family need not write. The Optuna parameters default to every searchable key of its
section, named ``<family>_<key>`` (:meth:`StudentFamily.params`); ``suggest`` draws them in that
order and builds the arch record from ``{key: value}`` (:meth:`StudentFamily.suggest`); the
optimizer groups are timm's weight-decay rule (:meth:`StudentFamily.param_groups`); the preflight
check does nothing.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kdsearch.config.space import Space
from kdsearch.models.suggest import suggest_space

__all__ = [
    "SPEC_KEYS",
    "StudentFamily",
    "UnknownFamilyError",
    "register_family",
    "get_family",
    "family_names",
    "section_params",
]

SPEC_KEYS: tuple[str, ...] = ("family", "resolution", "num_classes", "in_chans")
"""Keys every serialised StudentSpec has; no family's architecture field may use one."""


def section_params(family: str, section: Any) -> dict[str, Space]:
    """``{"<family>_<key>": Space}`` for every searchable key of a family's section, in field order:
    the Optuna parameters a family has unless it says otherwise."""
    return {
        f"{family}_{f.name}": value
        for f in dataclasses.fields(section)
        if isinstance(value := getattr(section, f.name), Space)
    }


def _no_preflight(section: Any, resolutions: Sequence[int]) -> None:
    """The default preflight: nothing to check beyond the section's own rules."""


@dataclass(frozen=True)
class StudentFamily:
    """Everything kdsearch needs to search, build and train one family of students.

    Callables take plain objects: ``spec`` is a ``kdsearch.models.StudentSpec``, ``section`` an
    instance of :attr:`section`, ``trial`` an Optuna trial, ``model`` an ``nn.Module``.
    """

    name: str  # the value of ``student.family`` and the key of the ``student.<name>`` section
    section: type  # frozen dataclass of the study file's ``student.<name>`` section; defaults = default space
    arch: type  # frozen dataclass: the architecture record inside a StudentSpec (validated on creation)
    build: Callable[[Any], Any]  # spec -> nn.Module with random init (seed torch first)
    label: Callable[[Any], str]  # spec -> short human label, e.g. ``vgg8-w0.25@32``
    # section -> {Optuna param name: Space}; None: :func:`section_params` (every searchable key)
    search_params: Callable[[Any], dict[str, Space]] | None = None
    # (section, {param name without "<name>_": value}, resolution px) -> arch record; None: ``arch(**values)``
    arch_from_params: Callable[[Any, dict[str, Any], int], Any] | None = None
    # parameter names kept out of weight decay besides timm's rule (1-D weights and biases)
    no_weight_decay: tuple[str, ...] = ()
    preflight: Callable[[Any, Sequence[int]], None] = _no_preflight  # (section, resolutions px) -> raise ConfigError
    # the numeric arch field that says how big a student is, and its unit: the report sizes its
    # markers by it (stored with each trial, so the torch-free report need not import the family)
    size_field: str = "depth"
    size_unit: str = "layers"

    def __post_init__(self) -> None:
        if not self.name.isidentifier() or self.name != self.name.lower():
            raise ValueError(f"student family name {self.name!r}: must be a lower-case identifier")
        for attr in ("section", "arch"):
            if not dataclasses.is_dataclass(getattr(self, attr)):
                raise TypeError(f"student family {self.name!r}: {attr} must be a dataclass")
        clash = [f.name for f in dataclasses.fields(self.arch) if f.name in SPEC_KEYS]
        if clash:
            raise ValueError(f"student family {self.name!r}: arch fields {clash} clash with the spec keys {SPEC_KEYS}")
        if self.size_field not in {f.name for f in dataclasses.fields(self.arch)}:
            raise ValueError(f"student family {self.name!r}: size_field {self.size_field!r} is not an arch field")

    def params(self, section: Any) -> dict[str, Space]:
        """The Optuna parameters ``suggest`` may ask, ``{name: Space}``, in the order it asks them."""
        if self.search_params is not None:
            return self.search_params(section)
        return section_params(self.name, section)

    def suggest(self, trial: Any, section: Any, resolution: int) -> Any:
        """The arch record of one trial: each of :meth:`params` drawn in order (a fixed one is not
        suggested), then :attr:`arch_from_params` (or the arch record) builds it."""
        prefix = f"{self.name}_"
        values = {name.removeprefix(prefix): suggest_space(trial, name, space)
                  for name, space in self.params(section).items()}
        if self.arch_from_params is not None:
            return self.arch_from_params(section, values, resolution)
        return self.arch(**values)

    def param_groups(self, model: Any, weight_decay: float) -> list[dict[str, Any]]:
        """Optimizer groups: timm's rule (no decay on norms, biases and other 1-D weights), and
        none on :attr:`no_weight_decay`."""
        from timm.optim import param_groups_weight_decay  # noqa: PLC0415 - torch only once a model exists

        return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=self.no_weight_decay)

    def arch_from_dict(self, data: Mapping[str, Any]) -> Any:
        """The architecture record from its fields; unknown or missing fields are a ValueError."""
        names = [f.name for f in dataclasses.fields(self.arch)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"{self.name} architecture: unknown fields {unknown}; known: {names}")
        required = [
            f.name for f in dataclasses.fields(self.arch)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
        ]
        missing = [n for n in required if n not in data]
        if missing:
            raise ValueError(f"{self.name} architecture: missing fields {missing}")
        return self.arch(**data)


class UnknownFamilyError(ValueError):
    """A student family name nobody registered."""


_REGISTRY: dict[str, StudentFamily] = {}


def register_family(family: StudentFamily) -> StudentFamily:
    """Register ``family`` under its name. A second registration of a name is an error."""
    if family.name in _REGISTRY:
        raise ValueError(f"student family {family.name!r} is already registered")
    _REGISTRY[family.name] = family
    return family


def family_names() -> list[str]:
    """The registered family names, sorted."""
    return sorted(_REGISTRY)


def get_family(name: str) -> StudentFamily:
    """The family called ``name``; an unknown name raises :class:`UnknownFamilyError` (one line)."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UnknownFamilyError(f"unknown student family {name!r}; known: {family_names()}{hint}") from None
