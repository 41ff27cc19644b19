"""Loading a study file: YAML -> raw mapping -> CLI overrides -> validated :class:`StudyConfig`.

A study is named by a path or by the name of a study shipped with the package (``smoke``,
``cifar10-deit``, ``paper/table1-arch``: :func:`bundled_studies`); an existing file wins.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.resources
import re
import types
import typing
from collections.abc import Mapping, Sequence
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import yaml

from kdsearch.config.durations import parse_duration
from kdsearch.config.sections import (
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
from kdsearch.config.student import STUDENT_KEYS, StudentConfig, student_family, student_family_names
from kdsearch.config.study import DURATION_KEYS, TOP_KEYS, StudyConfig, config_to_dict
from kdsearch.errors import ConfigError, unknown_key_error

__all__ = [
    "load_config",
    "config_from_dict",
    "apply_overrides",
    "read_study_file",
    "find_study_file",
    "bundled_study",
    "bundled_studies",
    "study_description",
]


def _fields(cls: type) -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(cls)}


class _FieldIndex(dict):  # type: ignore[type-arg]
    """``cls -> {field name -> Field}``, filled on first use."""

    def __missing__(self, cls: type) -> dict[str, dataclasses.Field[Any]]:
        self[cls] = _fields(cls)
        return self[cls]


_FIELDS: dict[type, dict[str, dataclasses.Field[Any]]] = _FieldIndex()


_SECTION_TYPES: dict[str, type] = {
    "study": StudyRunConfig,
    "data": DataConfig,
    "student": StudentConfig,
    "distill": DistillConfig,
    "measure": MeasureConfig,
    "finetune": FinetuneConfig,
    "debug": DebugConfig,
    "rehearsal": RehearsalConfig,
}



def _norm_section(section: str) -> str:
    """``teacher[1].fit`` -> ``teacher.fit``: list positions do not change the schema."""
    return re.sub(r"\[\d+\]", "", section)


def _yaml_keys(cls: type, section: str) -> dict[str, str]:
    """YAML key -> dataclass field name for one section."""
    out: dict[str, str] = {}
    inv = {v: k for (sec, k), v in DURATION_KEYS.items() if sec == _norm_section(section)}
    for f in dataclasses.fields(cls):
        if f.name == "source":
            continue
        out[inv.get(f.name, f.name)] = f.name
    return out


def _convert(value: Any, tp: Any, name: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(name, "is required", value)
        return _convert(value, non_none[0], name)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(name, "must be true or false", value)
        return value
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(name, "must be an integer", value)
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(name, "must be a number", value)
        return float(value)
    if tp is str:
        if isinstance(value, bool) and name.endswith(("enabled", "device_resident")):
            return "true" if value else "false"
        if not isinstance(value, str):
            raise ConfigError(name, "must be a string", value)
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            value = [value]
        if dataclasses.is_dataclass(args[0]):  # a list of sub-sections, e.g. student.vgg.presets
            return tuple(_build_section(args[0], v, f"{name}[{i}]") for i, v in enumerate(value))
        return tuple(_convert(v, args[0], name) for v in value)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(name, "must be a mapping", value)
        return {str(k): (_convert(v, args[1], f"{name}.{k}") if args[1] is not Any else v) for k, v in value.items()}
    if tp is Any:
        return value
    raise TypeError(f"unsupported config type {tp!r} for {name}")


def _build_section(cls: type, raw: Any, section: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(section, "must be a mapping of keys to values", raw)
    keys = _yaml_keys(cls, section)
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in keys:
            raise unknown_key_error(section, key, list(keys))
        fname = keys[key]
        fname_full = f"{section}.{key}"
        tp = hints[fname]
        if (_norm_section(section), key) in DURATION_KEYS:
            optional = value is None and type(None) in typing.get_args(tp)  # e.g. measure.max_time unset
            if typing.get_origin(tp) is tuple and isinstance(value, (list, tuple)):  # study.trial_time: [2m, 5m]
                kwargs[fname] = tuple(parse_duration(v, f"{fname_full}[{i}]") for i, v in enumerate(value))
            elif typing.get_origin(tp) is tuple:  # one duration where a list may stand
                kwargs[fname] = (parse_duration(value, fname_full),)
            else:
                kwargs[fname] = None if optional else parse_duration(value, fname_full)
        elif tp is Space or (typing.get_origin(tp) is None and tp == "Space"):
            rule = _FIELDS[cls][fname].metadata.get("space", {"kind": float})
            kwargs[fname] = Space.parse(value, fname_full, **rule)
        elif dataclasses.is_dataclass(tp):
            kwargs[fname] = _build_section(tp, value, fname_full)
        else:
            kwargs[fname] = _convert(value, tp, fname_full)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - guarded by the key check above
        raise ConfigError(section, str(exc)) from None


def _build_student(raw: Any) -> StudentConfig:
    """The ``student`` section: ``family`` and ``resolution`` by their field rules, and every other
    key a registered family whose section dataclass (declared in the family file) builds it."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError("student", "must be a mapping of keys to values", raw)
    families = student_family_names()
    kwargs: dict[str, Any] = {}
    sections: dict[str, Any] = {}
    for key, value in raw.items():
        if key in STUDENT_KEYS:
            rule = dict(_FIELDS[StudentConfig][key].metadata["space"])
            if key == "family":
                rule["allowed"] = tuple(families)
            kwargs[key] = Space.parse(value, f"student.{key}", **rule)
        elif key in families:
            sections[key] = _build_section(student_family(key).section, value, f"student.{key}")
        else:
            raise unknown_key_error("student", key, [*STUDENT_KEYS, *families])
    return StudentConfig(**kwargs, sections=sections)


def _as_number(value: Any) -> Any:
    """YAML 1.1 reads ``1e6`` as text; accept numeric text for limits, leave the rest to validation."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def config_from_dict(raw: Mapping[str, Any], source: str | None = None) -> StudyConfig:
    """Build and validate a :class:`StudyConfig` from a parsed YAML mapping."""
    if not isinstance(raw, Mapping):
        raise ConfigError("<study file>", "must be a YAML mapping of sections", type(raw).__name__)
    for key in raw:
        if key not in TOP_KEYS:
            raise unknown_key_error("", key, TOP_KEYS)
    kwargs: dict[str, Any] = {}
    # The student section last: it imports the family files (and torch with them), so a mistake
    # in any other section is reported without that wait.
    for key, cls in _SECTION_TYPES.items():
        if key in raw and cls is not StudentConfig:
            kwargs[key] = _build_section(cls, raw[key], key)
    if "teacher" in raw:
        t = raw["teacher"]
        if isinstance(t, list):
            if not t:
                raise ConfigError("teacher", "a list of teachers must not be empty", t)
            kwargs["teachers"] = tuple(_build_section(TeacherConfig, x, f"teacher[{i}]") for i, x in enumerate(t))
        else:
            kwargs["teachers"] = (_build_section(TeacherConfig, t, "teacher"),)
    if "objectives" in raw:
        obj = raw["objectives"]
        if not isinstance(obj, Mapping):
            raise ConfigError("objectives", "must map metric names to maximize/minimize", obj)
        kwargs["objectives"] = {str(k): v for k, v in obj.items()}
    if "constraints" in raw:
        con = raw["constraints"] or {}
        if not isinstance(con, Mapping):
            raise ConfigError("constraints", "must map metric names to upper limits", con)
        kwargs["constraints"] = {str(k): _as_number(v) for k, v in con.items()}
    if "student" in raw:
        kwargs["student"] = _build_student(raw["student"])
    return StudyConfig(**kwargs, source=source)


BUNDLED_DIR = "studies"
"""The folder of study files inside the ``kdsearch`` package (``studies/`` of the repository)."""

STUDY_SUFFIXES = (".yaml", ".yml")


def bundled_studies() -> dict[str, Traversable]:
    """The study files shipped with kdsearch, by name: the path below ``studies/`` without
    ``.yaml`` (``smoke``, ``cifar10-deit``, ``paper/table1-arch``), sorted, top level first."""
    found: dict[str, Traversable] = {}

    def walk(folder: Traversable, prefix: str) -> None:
        for entry in sorted(folder.iterdir(), key=lambda e: e.name):
            if entry.is_file() and entry.name.endswith(STUDY_SUFFIXES):
                found[prefix + entry.name.rsplit(".", 1)[0]] = entry
        for entry in sorted(folder.iterdir(), key=lambda e: e.name):
            if entry.is_dir() and not entry.name.startswith((".", "_")):
                walk(entry, f"{prefix}{entry.name}/")

    root = importlib.resources.files("kdsearch") / BUNDLED_DIR
    if root.is_dir():
        walk(root, "")
    return found


def _bundled_name(text: str) -> str:
    """``studies/smoke.yaml``, ``smoke.yaml`` and ``smoke`` all name the bundled ``smoke``."""
    name = text.replace("\\", "/").strip()
    if name.startswith(f"{BUNDLED_DIR}/"):
        name = name[len(BUNDLED_DIR) + 1 :]
    for suffix in STUDY_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name


def bundled_study(name: str, field: str = "studies show", rule: str = "must name a bundled study") -> Traversable:
    """The bundled study ``name`` (``smoke``, ``smoke.yaml`` or ``studies/smoke.yaml``); any other
    name is a one-line ConfigError that lists the bundled names."""
    bundled = bundled_studies()
    key = _bundled_name(str(name))
    if key in bundled:
        return bundled[key]
    names = ", ".join(bundled) or "none (this kdsearch was installed without its study files)"
    raise ConfigError(field, rule, str(name), f"bundled studies: {names} (kdsearch studies lists them)")


def find_study_file(config: str | Path) -> Path | Traversable:
    """The study file ``--config`` names: an existing file, else a bundled study by name (so
    ``--config studies/smoke.yaml`` works from any folder). Anything else is a ConfigError that
    lists the bundled names."""
    p = Path(config).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        raise ConfigError("--config", "must be a study file, not a folder", str(config))
    return bundled_study(str(config), "--config", "must be an existing study file or the name of a bundled study")


def study_description(text: str) -> str:
    """The first sentence of a study file's leading comment block (one line), or ``""``."""
    lines: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped.startswith("#"):
            break
        body = stripped.lstrip("#").strip()
        if not body:
            if lines:
                break
            continue
        lines.append(body)
    joined = " ".join(lines)
    first = re.split(r"(?<=[.!?])\s", joined, maxsplit=1)[0]
    return first.strip()


def read_study_file(path: str | Path | Traversable) -> dict[str, Any]:
    """The study file's raw mapping. ``path`` is a file, a bundled study's name or resource.
    A missing file, bad YAML and a file without any section raise ConfigError."""
    source = find_study_file(path) if isinstance(path, (str, Path)) else path
    shown = str(path)
    try:
        text = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("--config", f"cannot be read ({type(exc).__name__}: {exc})", shown) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(shown, f"is not valid YAML{where}") from None
    if raw is None or raw == {}:
        # An empty file must not silently start a default study (synthetic data, a teacher fitted
        # for minutes): say so, and where to start from.
        raise ConfigError(
            shown, "is empty: a study file needs its sections (data, teacher, student, objectives, ...)",
            None, "start from a bundled study: kdsearch studies show smoke > my-study.yaml",
        )
    if not isinstance(raw, Mapping):
        raise ConfigError(shown, "must be a YAML mapping of sections", type(raw).__name__)
    return dict(raw)


def load_config(path: str | Path, sets: Sequence[str] = (), **flags: Any) -> StudyConfig:
    """Load a study file (a path or a bundled study's name), apply ``--set`` strings and CLI flags
    to its raw mapping, then build and validate the config once. Missing file, bad YAML and every
    invalid value raise ConfigError."""
    source = find_study_file(path)
    raw = read_study_file(source)
    return config_from_dict(override_raw(raw, sets, **flags), source=str(source))


def apply_overrides(cfg: StudyConfig, sets: Sequence[str] = (), **flags: Any) -> StudyConfig:
    """Overrides on an already built config (a stored study's): its YAML form, overridden, rebuilt."""
    return config_from_dict(override_raw(config_to_dict(cfg), sets, **flags), source=cfg.source)


_FLAG_KEYS: dict[str, tuple[str, str]] = {
    "budget": ("study", "budget"),
    "trial_time": ("study", "trial_time"),
    "storage": ("study", "storage"),
    "study_name": ("study", "name"),
    "n_trials": ("study", "n_trials"),
    "run_dir": ("study", "run_dir"),
    "sampler": ("study", "sampler"),
    "workers": ("study", "workers"),
    "seed": ("study", "seed"),
}


def override_raw(raw: Mapping[str, Any], sets: Sequence[str] = (), **flags: Any) -> dict[str, Any]:
    """Apply ``--set section.key=value`` strings and the named CLI flags to a raw study mapping.

    Flags: budget, trial_time, storage, study_name, n_trials, run_dir, sampler, workers, seed.
    Values in ``--set`` are parsed as YAML (``--set distill.temperature=[2,4]``). The input is not
    changed; sections that are missing are created, and the result is validated by
    :func:`config_from_dict` like any study file.
    """
    out: dict[str, Any] = copy.deepcopy(dict(raw))
    for name, value in flags.items():
        if value is None:
            continue
        if name not in _FLAG_KEYS:
            raise ConfigError(f"--{name.replace('_', '-')}", "is not a known flag", name)
        sec, key = _FLAG_KEYS[name]
        if name == "trial_time" and isinstance(value, str) and "," in value:
            value = [v.strip() for v in value.split(",")]  # --trial-time 2m,5m,10m: a searched box
        section = out.setdefault(sec, {})
        if section is None:
            section = out[sec] = {}
        if not isinstance(section, dict):
            raise ConfigError(sec, "must be a mapping of keys to values", section)
        section[key] = value
    for item in sets:
        if "=" not in item:
            raise ConfigError("--set", "must look like section.key=value", item)
        path, _, text = item.partition("=")
        parts = path.strip().split(".")
        if len(parts) < 2 or not all(parts):
            raise ConfigError("--set", "must look like section.key=value", item)
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ConfigError(f"--set {path}", "value is not valid YAML", text) from None
        if parts[0] not in TOP_KEYS:
            raise unknown_key_error("", parts[0], TOP_KEYS)
        if parts[0] == "teacher" and isinstance(out.get("teacher"), list):
            raise ConfigError("--set teacher", "cannot override one of several teachers; edit the study file", item)
        node: Any = out
        for i, part in enumerate(parts[:-1]):
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                where = ".".join(parts[: i + 1])
                raise ConfigError(f"--set {path}", f"{where!r} is not a section", item)
            node = node[part]
        node[parts[-1]] = value
    return out
