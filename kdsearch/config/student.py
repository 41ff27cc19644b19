"""The ``student`` section: the family choice, the resolution, and one section per student family.

YAML::

    student:
      family: [vgg, mobilenetv3]    # registered family names (kdsearch.models.families)
      resolution: [16, 32]          # px
      vgg: {depth: [2, 4], width: {low: 0.05, high: 0.5, log: true}}
      mobilenetv3: {...}

Each ``student.<name>`` section is the family's own dataclass, declared and validated in the
family file (``kdsearch/models/families/<name>.py``). This floor therefore reads the family
registry: the family modules are imported when a student section is first built, never when
this module is imported (they import ``kdsearch.config.space`` themselves).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kdsearch.config.space import Space, space_field
from kdsearch.errors import ConfigError

if TYPE_CHECKING:
    from kdsearch.models.registry import StudentFamily

__all__ = ["StudentConfig", "student_family", "student_family_names", "STUDENT_KEYS"]

STUDENT_KEYS: tuple[str, ...] = ("family", "resolution")
"""The ``student`` keys that are not a family section."""


def student_family_names() -> list[str]:
    """Every registered student family (importing the family modules on first use)."""
    from kdsearch.models.families import family_names  # noqa: PLC0415 - the families import this floor

    return family_names()


def student_family(name: str, field_name: str = "student.family") -> StudentFamily:
    """The registered family ``name``; an unknown name is a one-line ConfigError with a suggestion."""
    from kdsearch.models.families import get_family  # noqa: PLC0415 - the families import this floor
    from kdsearch.models.registry import UnknownFamilyError  # noqa: PLC0415

    try:
        return get_family(name)
    except UnknownFamilyError:
        known = student_family_names()
        close = difflib.get_close_matches(str(name), known, n=1)
        raise ConfigError(
            field_name, f"each must be one of {known}", name, f"did you mean {close[0]!r}?" if close else None
        ) from None


def _default_sections() -> dict[str, Any]:
    return {name: student_family(name).section() for name in student_family_names()}


@dataclass(frozen=True)
class StudentConfig:
    """``family`` (searchable), ``resolution`` (searchable, px) and ``sections``: every registered
    family's ``student.<name>`` section by name (defaults for the ones the study file leaves out).

    ``cfg.student.vgg`` is ``cfg.student.section("vgg")``.
    """

    family: Space = space_field(Space(choices=("vgg",)), kind=str)
    resolution: Space = space_field(
        Space(choices=(32, 64, 96, 128, 160, 224), integer=True), kind=int, minimum=16, maximum=224
    )
    sections: Mapping[str, Any] = field(default_factory=_default_sections)

    def __post_init__(self) -> None:
        if self.family.choices is None:
            raise ConfigError("student.family", "must be a name or a list of names", self.family.to_yaml())
        for name in self.family.choices:
            student_family(name)
        sections = dict(self.sections)
        for name in sections:
            student_family(name, f"student.{name}")
        for name in student_family_names():
            fam = student_family(name)
            sec = sections.setdefault(name, fam.section())
            if not isinstance(sec, fam.section):
                raise ConfigError(f"student.{name}", f"must be a {fam.section.__name__}", type(sec).__name__)
        object.__setattr__(self, "sections", {name: sections[name] for name in sorted(sections)})

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails: ``cfg.student.vgg`` is the ``vgg`` section.
        sections = self.__dict__.get("sections")
        if sections is not None and not name.startswith("_") and name in sections:
            return sections[name]
        raise AttributeError(f"{type(self).__name__!s} has no attribute or family section {name!r}")

    def section(self, name: str) -> Any:
        """The ``student.<name>`` section (a ConfigError for an unknown family)."""
        student_family(name, f"student.{name}")
        return self.sections[name]

    @property
    def families(self) -> list[str]:
        """The families a trial can be proposed, in the order the study file lists them."""
        return list(self.family.choices or ())

    def yaml_items(self) -> Iterator[tuple[str, Any]]:
        """``(YAML key, value)`` pairs: family, resolution, then each family section by name."""
        yield "family", self.family
        yield "resolution", self.resolution
        yield from self.sections.items()
