"""Study files: YAML -> frozen, validated dataclasses.

A study file has the sections ``study``, ``data``, ``teacher``, ``student``, ``distill``,
``objectives``, ``constraints``, ``measure``, ``finetune`` and ``debug``. Every key is checked: an
unknown key is an error that suggests the closest known key, and every value is validated on load
(type, range, allowed set). CLI flags override keys through :func:`apply_overrides`.

Searchable values (:class:`Space`) are written in one of three forms::

    temperature: 4.0                          # fixed
    temperature: [2.0, 4.0, 8.0]              # categorical choices
    temperature: {low: 1.0, high: 8.0, log: true}   # numeric range (optional step)
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kdsearch.errors import ConfigError

__all__ = [
    "Space",
    "StudySection",
    "DataConfig",
    "TeacherCacheConfig",
    "TeacherFitConfig",
    "TeacherConfig",
    "VGGPreset",
    "VGGSpaceConfig",
    "ViTSpaceConfig",
    "StudentConfig",
    "EarlyStopConfig",
    "DistillConfig",
    "LatencyConfig",
    "EnergyConfig",
    "MeasureConfig",
    "FinetuneConfig",
    "DebugConfig",
    "StudyConfig",
    "parse_duration",
    "format_duration",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "apply_overrides",
    "KNOWN_METRICS",
    "is_known_metric",
    "VGG_DEPTHS",
    "DATASETS",
    "SAMPLERS",
]

VGG_DEPTHS: tuple[int, ...] = (2, 3, 4, 5, 8, 11, 13, 16, 19)
DATASETS: tuple[str, ...] = ("cifar10", "cifar100", "imagefolder", "imagenet", "digits", "synthetic")
SAMPLERS: tuple[str, ...] = ("tpe", "nsga2", "nsga3", "random", "grid", "gp")
STUDENT_FAMILIES: tuple[str, ...] = ("vgg", "vit")

# ----------------------------------------------------------------------------------------------
# Durations


_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|d|h|m|s)")
_UNIT_S = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3}


def parse_duration(value: Any, field_name: str = "duration") -> float:
    """Parse ``90s``, ``30m``, ``24h``, ``1h30m``, ``1.5h`` or a plain number of seconds.

    Returns seconds (float, > 0). Raises :class:`ConfigError` naming ``field_name``.
    """
    if isinstance(value, bool):
        raise ConfigError(field_name, "must be a duration such as 90s, 30m or 24h", value)
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        try:
            seconds = float(text)
        except ValueError:
            pos = 0
            seconds = 0.0
            for match in _DURATION_RE.finditer(text):
                if match.start() != pos:
                    break
                seconds += float(match.group(1)) * _UNIT_S[match.group(2)]
                pos = match.end()
            if pos != len(text) or not text:
                raise ConfigError(
                    field_name, "must be a duration such as 90s, 30m, 24h or 1h30m", value
                ) from None
    else:
        raise ConfigError(field_name, "must be a duration such as 90s, 30m or 24h", value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(field_name, "must be a positive duration", value)
    return seconds


def format_duration(seconds: float) -> str:
    """Render seconds as ``1h02m03s`` / ``4m05s`` / ``12.3s`` for humans."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    if seconds < 60:
        return f"{seconds:.1f}s"
    total = int(round(seconds))
    h, rem = divmod(total, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


# ----------------------------------------------------------------------------------------------
# Searchable values


@dataclass(frozen=True)
class Space:
    """A value that is fixed, a categorical choice, or a numeric range.

    Exactly one of ``choices`` (tuple, length >= 1) or ``low``/``high`` is set. A ``choices`` of
    length 1 is a fixed value and is not suggested to Optuna.
    """

    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    integer: bool = False

    @property
    def is_fixed(self) -> bool:
        return self.choices is not None and len(self.choices) == 1

    @property
    def fixed_value(self) -> Any:
        assert self.choices is not None and len(self.choices) == 1
        return self.choices[0]

    def values(self) -> list[Any]:
        """Every value (for grid samplers): the choices, or the stepped range. Raises if continuous."""
        if self.choices is not None:
            return list(self.choices)
        if self.step is None:
            raise ValueError("a continuous range has no finite list of values")
        n = int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1  # type: ignore[operator]
        vals = [self.low + i * self.step for i in range(n)]  # type: ignore[operator]
        return [int(round(v)) for v in vals] if self.integer else vals

    def contains(self, value: Any) -> bool:
        if self.choices is not None:
            return value in self.choices
        return self.low <= value <= self.high  # type: ignore[operator]

    def to_yaml(self) -> Any:
        if self.choices is not None:
            return self.choices[0] if self.is_fixed else list(self.choices)
        out: dict[str, Any] = {"low": self.low, "high": self.high}
        if self.log:
            out["log"] = True
        if self.step is not None:
            out["step"] = self.step
        return out

    @classmethod
    def parse(
        cls,
        raw: Any,
        field_name: str,
        kind: type = float,
        allowed: Sequence[Any] | None = None,
        minimum: float | None = None,
        maximum: float | None = None,
    ) -> Space:
        """Build a Space from YAML, checking type, the allowed set and numeric bounds."""

        def check_scalar(v: Any) -> Any:
            if kind is str:
                if not isinstance(v, str):
                    raise ConfigError(field_name, "must be a string or a list of strings", v)
            elif kind is int:
                if isinstance(v, bool) or not (
                    isinstance(v, int) or (isinstance(v, float) and v.is_integer())
                ):
                    raise ConfigError(field_name, "must be an integer or a list of integers", v)
                v = int(v)
            else:
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise ConfigError(field_name, "must be a number or a list of numbers", v)
                v = float(v)
            if allowed is not None and v not in allowed:
                close = ""
                if kind is str:
                    m = difflib.get_close_matches(str(v), [str(a) for a in allowed], n=1)
                    close = f"did you mean {m[0]!r}?" if m else ""
                raise ConfigError(
                    field_name,
                    f"must be one of {list(allowed)}",
                    v,
                    close or None,
                )
            if kind is not str:
                if minimum is not None and v < minimum:
                    raise ConfigError(field_name, f"must be >= {minimum}", v)
                if maximum is not None and v > maximum:
                    raise ConfigError(field_name, f"must be <= {maximum}", v)
            return v

        if isinstance(raw, Mapping):
            unknown = set(raw) - {"low", "high", "log", "step"}
            if unknown:
                key = sorted(unknown)[0]
                _raise_unknown(field_name, key, ["low", "high", "log", "step"])
            if "low" not in raw or "high" not in raw:
                raise ConfigError(field_name, "a range needs both 'low' and 'high'", dict(raw))
            if kind is str:
                raise ConfigError(field_name, "a text value cannot be a range", dict(raw))
            low = check_scalar(raw["low"])
            high = check_scalar(raw["high"])
            if low > high:
                raise ConfigError(field_name, "'low' must be <= 'high'", dict(raw))
            log = raw.get("log", False)
            if not isinstance(log, bool):
                raise ConfigError(f"{field_name}.log", "must be true or false", log)
            if log and low <= 0:
                raise ConfigError(field_name, "a log range needs 'low' > 0", low)
            step = raw.get("step")
            if step is not None:
                if isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0:
                    raise ConfigError(f"{field_name}.step", "must be a positive number", step)
                if log:
                    raise ConfigError(field_name, "'step' and 'log' cannot be combined", dict(raw))
            return cls(low=low, high=high, log=log, step=step, integer=kind is int)
        if isinstance(raw, (list, tuple)):
            if not raw:
                raise ConfigError(field_name, "must not be an empty list", list(raw))
            vals = tuple(check_scalar(v) for v in raw)
            if len(set(vals)) != len(vals):
                raise ConfigError(field_name, "must not repeat a value", list(raw))
            return cls(choices=vals, integer=kind is int)
        if raw is None:
            raise ConfigError(field_name, "is required", raw)
        return cls(choices=(check_scalar(raw),), integer=kind is int)


# ----------------------------------------------------------------------------------------------
# Sections. Every field's metadata may carry "doc"; units are in names (``_s``, ``_mb``).


def _space(default: Any) -> Any:
    return field(default=default, metadata={"space": True})


@dataclass(frozen=True)
class StudySection:
    """Where the study lives and how it is driven."""

    name: str = "kdsearch"
    run_dir: str = "runs"
    storage: str | None = None  # default: journal file <run_dir>/<name>/journal.log
    sampler: str = "tpe"
    seed: int = 0
    budget_s: float = 3600.0  # wall-clock budget of one `optimize` invocation
    n_trials: int | None = None  # cap on trials started by this invocation
    trial_time_s: float = 60.0  # the KD time box of one trial
    grace_s: float = 120.0  # extra time (measurement, setup) before a trial is killed
    max_retries: int = 1  # how often a stale trial's params are re-queued
    workers: int | None = None  # None: one per visible GPU, else 1
    n_startup_trials: int = 10  # random trials before TPE/GP model the space
    population_size: int = 20  # NSGA-II/III population

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", self.name):
            raise ConfigError(
                "study.name",
                "must be 1-128 letters, digits, '_', '.' or '-', starting with a letter or digit",
                self.name,
            )
        if self.sampler not in SAMPLERS:
            m = difflib.get_close_matches(self.sampler, SAMPLERS, n=1)
            raise ConfigError(
                "study.sampler",
                f"must be one of {list(SAMPLERS)}",
                self.sampler,
                f"did you mean {m[0]!r}?" if m else None,
            )
        if self.n_trials is not None and self.n_trials < 1:
            raise ConfigError("study.n_trials", "must be >= 1", self.n_trials)
        if self.max_retries < 0:
            raise ConfigError("study.max_retries", "must be >= 0", self.max_retries)
        if self.workers is not None and self.workers < 1:
            raise ConfigError("study.workers", "must be >= 1", self.workers)
        if self.grace_s < 0:
            raise ConfigError("study.grace", "must be >= 0", self.grace_s)
        if self.n_startup_trials < 0:
            raise ConfigError("study.n_startup_trials", "must be >= 0", self.n_startup_trials)
        if self.population_size < 2:
            raise ConfigError("study.population_size", "must be >= 2", self.population_size)
        if self.storage is not None:
            _validate_storage_url(self.storage)


def _validate_storage_url(url: str) -> None:
    ok_prefixes = ("sqlite:///", "postgresql://", "postgresql+", "mysql://", "mysql+", "journal:")
    if url.startswith(ok_prefixes):
        return
    if "://" in url:
        raise ConfigError(
            "study.storage",
            "must be sqlite:///PATH, postgresql://..., mysql://... or journal:PATH",
            url,
        )
    # A bare path is a journal file.
    if url.strip() == "":
        raise ConfigError("study.storage", "must not be empty", url)


@dataclass(frozen=True)
class DataConfig:
    """Which data set, where it lives, and how it is split and held.

    ``image_size`` is the *stored* resolution (pixels) that the data is held at as uint8; each
    trial resizes to its own resolution on the device. ``None`` keeps the native size (32 for
    CIFAR, 32 for digits after upsampling, and 64 for imagefolder/imagenet).
    """

    dataset: str = "synthetic"
    root: str | None = None
    download: bool = True
    val_fraction: float = 0.1
    seed: int = 0
    image_size: int | None = None
    max_train_samples: int | None = None  # stratified subset of train (after the val split)
    max_test_samples: int | None = None
    device_resident: str = "auto"  # auto | true | false
    num_workers: int = 2  # streaming loader only
    # synthetic data only
    num_classes: int = 10
    synthetic_train_size: int = 512
    synthetic_test_size: int = 256
    # table3: a share of train held out for fine-tuning (never seen by KD)
    finetune_fraction: float = 0.0

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            m = difflib.get_close_matches(self.dataset, DATASETS, n=1)
            raise ConfigError(
                "data.dataset",
                f"must be one of {list(DATASETS)}",
                self.dataset,
                f"did you mean {m[0]!r}?" if m else None,
            )
        if not 0.0 < self.val_fraction < 0.9:
            raise ConfigError("data.val_fraction", "must be in (0, 0.9)", self.val_fraction)
        if not 0.0 <= self.finetune_fraction < 0.9:
            raise ConfigError("data.finetune_fraction", "must be in [0, 0.9)", self.finetune_fraction)
        if self.val_fraction + self.finetune_fraction >= 0.95:
            raise ConfigError(
                "data.finetune_fraction",
                "val_fraction + finetune_fraction must leave data for training",
                self.finetune_fraction,
            )
        if self.device_resident not in ("auto", "true", "false"):
            raise ConfigError(
                "data.device_resident", "must be auto, true or false", self.device_resident
            )
        if self.image_size is not None and not 8 <= self.image_size <= 512:
            raise ConfigError("data.image_size", "must be in [8, 512] pixels", self.image_size)
        for name in ("max_train_samples", "max_test_samples"):
            v = getattr(self, name)
            if v is not None and v < 10:
                raise ConfigError(f"data.{name}", "must be >= 10", v)
        if self.num_classes < 2:
            raise ConfigError("data.num_classes", "must be >= 2", self.num_classes)
        if self.synthetic_train_size < 20:
            raise ConfigError("data.synthetic_train_size", "must be >= 20", self.synthetic_train_size)
        if self.synthetic_test_size < 10:
            raise ConfigError("data.synthetic_test_size", "must be >= 10", self.synthetic_test_size)
        if self.num_workers < 0:
            raise ConfigError("data.num_workers", "must be >= 0", self.num_workers)
        if self.dataset in ("imagefolder", "imagenet") and not self.root:
            raise ConfigError(
                "data.root",
                f"is required for dataset {self.dataset!r}",
                self.root,
                "point it at a folder with train/ and val/ or test/ class folders",
            )


@dataclass(frozen=True)
class TeacherCacheConfig:
    """Teacher-logit cache: K augmented views of the train split, logits in fp16."""

    views: int = 32
    topk: int | None = None  # store only the top-k logits (large label spaces)
    dir: str | None = None  # shared cache folder; default <run_dir>/<study>/cache
    batch_size: int = 256  # teacher batch size while building
    crop_padding: int = 4  # pixels of padding around the stored image for random crops
    flip: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.views <= 1024:
            raise ConfigError("teacher.cache.views", "must be in [1, 1024]", self.views)
        if self.topk is not None and self.topk < 1:
            raise ConfigError("teacher.cache.topk", "must be >= 1", self.topk)
        if self.batch_size < 1:
            raise ConfigError("teacher.cache.batch_size", "must be >= 1", self.batch_size)
        if not 0 <= self.crop_padding <= 64:
            raise ConfigError("teacher.cache.crop_padding", "must be in [0, 64] pixels", self.crop_padding)


@dataclass(frozen=True)
class TeacherFitConfig:
    """Fitting the teacher to the data set (fine-tune, or from scratch without weights)."""

    enabled: str = "auto"  # auto: fit when classes differ or no pretrained weights; true; false
    time_s: float = 300.0
    lr: float = 1e-3  # AdamW
    weight_decay: float = 0.05
    batch_size: int = 128

    def __post_init__(self) -> None:
        if self.enabled not in ("auto", "true", "false"):
            raise ConfigError("teacher.fit.enabled", "must be auto, true or false", self.enabled)
        if not 0 < self.lr < 10:
            raise ConfigError("teacher.fit.lr", "must be in (0, 10)", self.lr)
        if self.batch_size < 1:
            raise ConfigError("teacher.fit.batch_size", "must be >= 1", self.batch_size)


@dataclass(frozen=True)
class TeacherConfig:
    """A timm teacher: a model name, ``hf-hub:`` name, or a local checkpoint plus kwargs."""

    name: str = "vit_tiny_patch16_224"
    pretrained: bool = False
    checkpoint: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    input_size: int | None = None  # override the teacher's input resolution (pixels)
    mode: str = "cached"  # cached | online
    label: str | None = None  # short name used in tables ("ViT", "CNN"); default: name
    cache: TeacherCacheConfig = field(default_factory=TeacherCacheConfig)
    fit: TeacherFitConfig = field(default_factory=TeacherFitConfig)

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ConfigError("teacher.name", "must be a timm model name", self.name)
        if self.mode not in ("cached", "online"):
            raise ConfigError("teacher.mode", "must be cached or online", self.mode)
        if self.input_size is not None and not 16 <= self.input_size <= 1024:
            raise ConfigError("teacher.input_size", "must be in [16, 1024] pixels", self.input_size)
        if self.checkpoint is not None:
            suffix = Path(self.checkpoint).suffix
            if suffix not in (".pth", ".pt", ".bin", ".safetensors"):
                raise ConfigError(
                    "teacher.checkpoint", "must be a .pth, .pt, .bin or .safetensors file", self.checkpoint
                )

    @property
    def display_name(self) -> str:
        return self.label or self.name


@dataclass(frozen=True)
class VGGPreset:
    """One named VGG student, ``(depth, width)``, for ``student.vgg.presets``.

    ``name`` is the value of the categorical ``vgg_preset`` param (default ``d{depth}-w{width}``).
    """

    depth: int | None = None  # required; None only so a missing key gets a one-line error
    width: float | None = None  # required
    name: str | None = None

    def __post_init__(self) -> None:
        for key in ("depth", "width"):
            if getattr(self, key) is None:
                raise ConfigError(f"student.vgg.presets.{key}", "is required in every preset", None,
                                  "write each preset as {depth: 5, width: 0.2, name: S}")
        if self.depth not in VGG_DEPTHS:
            raise ConfigError("student.vgg.presets.depth", f"must be one of {list(VGG_DEPTHS)}", self.depth)
        if not 1 / 128 <= self.width <= 2.0:
            raise ConfigError("student.vgg.presets.width", "must lie in [1/128, 2.0]", self.width)
        if self.name is not None and not self.name.strip():
            raise ConfigError("student.vgg.presets.name", "must not be empty", self.name)

    @property
    def display_name(self) -> str:
        return self.name or f"d{self.depth}-w{self.width:g}"


@dataclass(frozen=True)
class VGGSpaceConfig:
    """VGG students: ``depth`` x ``width``, or a fixed list of ``presets`` (one categorical
    ``vgg_preset`` param) when only some (depth, width) pairs make sense together, e.g. students
    sized to given parameter counts. ``presets`` replaces ``depth`` and ``width``."""

    depth: Space = _space(Space(choices=VGG_DEPTHS, integer=True))
    width: Space = _space(Space(low=1 / 64, high=1.0, log=True))
    presets: tuple[VGGPreset, ...] = ()


@dataclass(frozen=True)
class ViTSpaceConfig:
    depth: Space = _space(Space(choices=(2, 4, 6), integer=True))
    embed_dim: Space = _space(Space(choices=(64, 96, 128, 192), integer=True))
    num_heads: Space = _space(Space(choices=(2, 3, 4), integer=True))
    patches_per_side: Space = _space(Space(choices=(4, 8), integer=True))  # patch = res // this


@dataclass(frozen=True)
class StudentConfig:
    family: Space = _space(Space(choices=("vgg",)))
    resolution: Space = _space(Space(choices=(32, 64, 96, 128, 160, 224), integer=True))
    vgg: VGGSpaceConfig = field(default_factory=VGGSpaceConfig)
    vit: ViTSpaceConfig = field(default_factory=ViTSpaceConfig)


@dataclass(frozen=True)
class EarlyStopConfig:
    enabled: bool = False
    patience: int = 3  # evaluations without improvement
    min_delta: float = 0.002  # accuracy

    def __post_init__(self) -> None:
        if self.patience < 1:
            raise ConfigError("distill.early_stop.patience", "must be >= 1", self.patience)


@dataclass(frozen=True)
class DistillConfig:
    """Hinton KD: alpha*T^2*KL(teacher_T || student_T) + (1-alpha)*CE, time-boxed."""

    temperature: Space = _space(Space(choices=(4.0,)))
    alpha: Space = _space(Space(choices=(0.9,)))
    lr: Space = _space(Space(choices=(0.05,)))  # peak SGD learning rate
    optimizer: str = "sgd"  # sgd (nesterov, momentum 0.9) | adamw
    weight_decay: float = 5e-4
    batch_size: int = 128
    warmup_fraction: float = 0.05  # of the time box
    final_lr_fraction: float = 0.0  # cosine decays to peak * this
    eval_every_fraction: float = 0.25  # validate at these fractions of the box
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)
    label_smoothing: float = 0.0
    compile: bool = False
    amp: bool = True  # bf16 autocast on CUDA; CPU is always fp32
    channels_last: bool = True  # CUDA only

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adamw"):
            raise ConfigError("distill.optimizer", "must be sgd or adamw", self.optimizer)
        if not 0 <= self.weight_decay < 1:
            raise ConfigError("distill.weight_decay", "must be in [0, 1)", self.weight_decay)
        if not 1 <= self.batch_size <= 65536:
            raise ConfigError("distill.batch_size", "must be in [1, 65536]", self.batch_size)
        if not 0 <= self.warmup_fraction < 1:
            raise ConfigError("distill.warmup_fraction", "must be in [0, 1)", self.warmup_fraction)
        if not 0 <= self.final_lr_fraction <= 1:
            raise ConfigError("distill.final_lr_fraction", "must be in [0, 1]", self.final_lr_fraction)
        if not 0 < self.eval_every_fraction <= 1:
            raise ConfigError(
                "distill.eval_every_fraction", "must be in (0, 1]", self.eval_every_fraction
            )
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError("distill.label_smoothing", "must be in [0, 1)", self.label_smoothing)


@dataclass(frozen=True)
class LatencyConfig:
    batch_sizes: tuple[int, ...] = (1, 64)
    devices: tuple[str, ...] = ("auto",)  # auto = the trial's device; may add "cpu"
    cpu_threads: int = 1
    warmup: int = 5  # iterations before timing
    min_repeats: int = 10
    max_repeats: int = 200
    max_time_s: float = 2.0  # cap on timed repeats per (device, batch)
    target_iqr_ratio: float = 0.1  # stop once IQR / median falls below this

    def __post_init__(self) -> None:
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise ConfigError("measure.latency.batch_sizes", "must be a list of integers >= 1", list(self.batch_sizes))
        for d in self.devices:
            if d not in ("auto", "cpu", "cuda"):
                raise ConfigError("measure.latency.devices", "each must be auto, cpu or cuda", d)
        if self.cpu_threads < 1:
            raise ConfigError("measure.latency.cpu_threads", "must be >= 1", self.cpu_threads)
        if self.min_repeats < 3 or self.max_repeats < self.min_repeats:
            raise ConfigError(
                "measure.latency.min_repeats", "must be >= 3 and <= max_repeats", self.min_repeats
            )
        if self.max_time_s <= 0:
            raise ConfigError("measure.latency.max_time", "must be > 0", self.max_time_s)


@dataclass(frozen=True)
class EnergyConfig:
    enabled: bool = True
    infer_min_time_s: float = 2.0  # inference loop at least this long (>= 20 counter updates)
    poll_interval_s: float = 0.02  # power-poll fallback period

    def __post_init__(self) -> None:
        if self.infer_min_time_s <= 0:
            raise ConfigError("measure.energy.infer_min_time", "must be > 0", self.infer_min_time_s)
        if self.poll_interval_s <= 0:
            raise ConfigError("measure.energy.poll_interval", "must be > 0", self.poll_interval_s)


@dataclass(frozen=True)
class MeasureConfig:
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    energy: EnergyConfig = field(default_factory=EnergyConfig)
    eval_batch_size: int = 512

    def __post_init__(self) -> None:
        if self.eval_batch_size < 1:
            raise ConfigError("measure.eval_batch_size", "must be >= 1", self.eval_batch_size)


@dataclass(frozen=True)
class FinetuneConfig:
    """Facet 4 per trial: freeze features, train the head at a low LR."""

    enabled: bool = False
    epochs: int = 15
    lr: float = 1e-3
    batch_size: int = 128
    unfreeze_last_block: bool = False

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError("finetune.epochs", "must be >= 1", self.epochs)
        if not 0 < self.lr < 10:
            raise ConfigError("finetune.lr", "must be in (0, 10)", self.lr)


@dataclass(frozen=True)
class DebugConfig:
    """Test-only fault injection: ``inject`` one of oom, nan, hang, error at ``inject_trial``."""

    inject: str | None = None
    inject_trial: int | None = None  # trial number; None = every trial

    def __post_init__(self) -> None:
        if self.inject is not None and self.inject not in ("oom", "nan", "hang", "error"):
            raise ConfigError("debug.inject", "must be oom, nan, hang or error", self.inject)


@dataclass(frozen=True)
class StudyConfig:
    study: StudySection = field(default_factory=StudySection)
    data: DataConfig = field(default_factory=DataConfig)
    teachers: tuple[TeacherConfig, ...] = field(default_factory=lambda: (TeacherConfig(),))
    student: StudentConfig = field(default_factory=StudentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    objectives: dict[str, str] = field(default_factory=lambda: {"val_accuracy": "maximize", "macs": "minimize"})
    constraints: dict[str, float] = field(default_factory=dict)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    source: str | None = field(default=None, compare=False)  # the file it came from (not identity)

    def __post_init__(self) -> None:
        if not self.objectives:
            raise ConfigError("objectives", "must name at least one metric", self.objectives)
        for metric, direction in self.objectives.items():
            if not is_known_metric(metric, self):
                m = difflib.get_close_matches(metric, _metric_examples(self), n=1)
                raise ConfigError(
                    f"objectives.{metric}",
                    "is not a metric kdsearch measures",
                    metric,
                    f"did you mean {m[0]!r}?" if m else f"known: {', '.join(_metric_examples(self))}",
                )
            if direction not in ("maximize", "minimize"):
                raise ConfigError(f"objectives.{metric}", "must be maximize or minimize", direction)
        for metric, limit in self.constraints.items():
            if not is_known_metric(metric, self):
                m = difflib.get_close_matches(metric, _metric_examples(self), n=1)
                raise ConfigError(
                    f"constraints.{metric}",
                    "is not a metric kdsearch measures",
                    metric,
                    f"did you mean {m[0]!r}?" if m else None,
                )
            if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not math.isfinite(limit):
                raise ConfigError(f"constraints.{metric}", "must be a finite number (upper limit)", limit)
        names = [t.name if t.label is None else t.label for t in self.teachers]
        if len(set(names)) != len(names):
            raise ConfigError("teacher", "teachers in a list need distinct names or labels", names)
        fams = self.student.family.values() if self.student.family.choices else []
        for fam in fams:
            if fam not in STUDENT_FAMILIES:
                raise ConfigError("student.family", f"each must be one of {list(STUDENT_FAMILIES)}", fam)
        presets = self.student.vgg.presets
        if presets:
            default = VGGSpaceConfig()
            if self.student.vgg.depth != default.depth or self.student.vgg.width != default.width:
                raise ConfigError(
                    "student.vgg.presets",
                    "replaces student.vgg.depth and student.vgg.width; remove those two keys",
                    [p.display_name for p in presets],
                )
            names = [p.display_name for p in presets]
            if len(set(names)) != len(names):
                raise ConfigError("student.vgg.presets", "need distinct names", names)
            pairs = [(p.depth, p.width) for p in presets]
            if len(set(pairs)) != len(pairs):
                raise ConfigError("student.vgg.presets", "must not repeat a (depth, width) pair", names)
        for d in self.student.vgg.depth.values() if self.student.vgg.depth.choices else []:
            if d not in VGG_DEPTHS:
                raise ConfigError("student.vgg.depth", f"each must be one of {list(VGG_DEPTHS)}", d)
        if self.student.vgg.depth.choices is None:
            raise ConfigError("student.vgg.depth", f"must be a list from {list(VGG_DEPTHS)}", self.student.vgg.depth.to_yaml())
        res = self.student.resolution
        lo = min(res.values()) if res.choices else res.low
        hi = max(res.values()) if res.choices else res.high
        if lo < 16 or hi > 224:
            raise ConfigError("student.resolution", "must lie in [16, 224] pixels", res.to_yaml())
        w = self.student.vgg.width
        wlo = min(w.values()) if w.choices else w.low
        whi = max(w.values()) if w.choices else w.high
        if wlo < 1 / 128 or whi > 2.0:
            raise ConfigError("student.vgg.width", "must lie in [1/128, 2.0]", w.to_yaml())
        if self.finetune.enabled and self.data.finetune_fraction <= 0:
            raise ConfigError(
                "data.finetune_fraction",
                "must be > 0 when finetune.enabled is true (fine-tuning needs its own images)",
                self.data.finetune_fraction,
            )
        for metric in ("pre_ft_accuracy", "post_ft_accuracy"):
            if (metric in self.objectives or metric in self.constraints) and not self.finetune.enabled:
                raise ConfigError(f"objectives.{metric}", "needs finetune.enabled: true", metric)
        if self.study.sampler == "grid":
            for name, sp in _iter_spaces(self):
                if presets and name in ("student.vgg.depth", "student.vgg.width"):
                    continue  # replaced by the presets, never suggested
                if sp.choices is None and sp.step is None:
                    raise ConfigError(
                        name, "the grid sampler needs a list or a stepped range, not a continuous range", sp.to_yaml()
                    )

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
        """What must match when a stored study is resumed: the space, objectives, constraints,
        data, teachers and time box. Budget, trial count, workers and storage may change."""
        full = config_to_dict(self)
        return {
            "objectives": full["objectives"],
            "constraints": full["constraints"],
            "student": full["student"],
            "distill": {k: full["distill"][k] for k in ("temperature", "alpha", "lr")},
            "teacher": full["teacher"],
            "data": {k: full["data"][k] for k in ("dataset", "val_fraction", "seed", "finetune_fraction")},
            "trial_time_s": self.study.trial_time_s,
            "sampler": self.study.sampler,
        }


def _iter_spaces(obj: Any, prefix: str = "") -> typing.Iterator[tuple[str, Space]]:
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        name = f"{prefix}{f.name}"
        if isinstance(v, Space):
            yield name, v
        elif dataclasses.is_dataclass(v) and f.name in ("student", "distill", "vgg", "vit"):
            yield from _iter_spaces(v, name + ".")


# ----------------------------------------------------------------------------------------------
# Metrics

_FIXED_METRICS: dict[str, str] = {
    "val_accuracy": "fraction",
    "test_accuracy": "fraction",
    "kd_time_s": "s",
    "params": "count",
    "macs": "MACs",
    "model_size_mb": "MB",
    "activation_peak_mb_b1": "MB",
    "peak_kd_memory_mb": "MB",
    "kd_energy_j": "J",
    "infer_energy_mj_per_image": "mJ/image",
    "pre_ft_accuracy": "fraction",
    "post_ft_accuracy": "fraction",
    "ft_gain": "fraction",
}
_PATTERN_METRICS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"latency_ms_b(\d+)(_cpu|_cuda)?"), "ms"),
    (re.compile(r"latency_p90_ms_b(\d+)(_cpu|_cuda)?"), "ms"),
    (re.compile(r"peak_infer_memory_mb_b(\d+)"), "MB"),
)
KNOWN_METRICS: dict[str, str] = dict(_FIXED_METRICS)


def metric_unit(name: str) -> str | None:
    """The unit of a metric name, or None if kdsearch does not measure it."""
    if name in _FIXED_METRICS:
        return _FIXED_METRICS[name]
    for pat, unit in _PATTERN_METRICS:
        if pat.fullmatch(name):
            return unit
    return None


def is_known_metric(name: str, cfg: StudyConfig | None = None) -> bool:
    """True if ``name`` is a metric kdsearch stores. Latency/inference-memory names must use a
    batch size from ``measure.latency.batch_sizes`` when a config is given."""
    if name in _FIXED_METRICS:
        return True
    for pat, _ in _PATTERN_METRICS:
        m = pat.fullmatch(name)
        if m:
            if cfg is None:
                return True
            return int(m.group(1)) in cfg.measure.latency.batch_sizes
    return False


def _metric_examples(cfg: StudyConfig | None) -> list[str]:
    names = list(_FIXED_METRICS)
    bs = cfg.measure.latency.batch_sizes if cfg is not None else (1, 64)
    for b in bs:
        names += [f"latency_ms_b{b}", f"latency_ms_b{b}_cpu", f"peak_infer_memory_mb_b{b}"]
    return names


# ----------------------------------------------------------------------------------------------
# Loading


# YAML key -> (dataclass field, converter). Durations are written as strings in YAML and stored
# as seconds; these fields get a ``_s`` suffix internally.
_DURATION_KEYS = {
    ("study", "budget"): "budget_s",
    ("study", "trial_time"): "trial_time_s",
    ("study", "grace"): "grace_s",
    ("teacher.fit", "time"): "time_s",
    ("measure.latency", "max_time"): "max_time_s",
    ("measure.energy", "infer_min_time"): "infer_min_time_s",
    ("measure.energy", "poll_interval"): "poll_interval_s",
}

_SECTION_TYPES: dict[str, type] = {
    "study": StudySection,
    "data": DataConfig,
    "student": StudentConfig,
    "distill": DistillConfig,
    "measure": MeasureConfig,
    "finetune": FinetuneConfig,
    "debug": DebugConfig,
}
_TOP_KEYS = ["study", "data", "teacher", "student", "distill", "objectives", "constraints", "measure", "finetune", "debug"]

_SPACE_SPECS: dict[tuple[str, str], dict[str, Any]] = {
    ("student", "family"): {"kind": str, "allowed": STUDENT_FAMILIES},
    ("student", "resolution"): {"kind": int, "minimum": 16, "maximum": 224},
    ("student.vgg", "depth"): {"kind": int, "allowed": VGG_DEPTHS},
    ("student.vgg", "width"): {"kind": float, "minimum": 1 / 128, "maximum": 2.0},
    ("student.vit", "depth"): {"kind": int, "minimum": 1, "maximum": 24},
    ("student.vit", "embed_dim"): {"kind": int, "minimum": 8, "maximum": 1024},
    ("student.vit", "num_heads"): {"kind": int, "minimum": 1, "maximum": 16},
    ("student.vit", "patches_per_side"): {"kind": int, "minimum": 1, "maximum": 32},
    ("distill", "temperature"): {"kind": float, "minimum": 0.1, "maximum": 100.0},
    ("distill", "alpha"): {"kind": float, "minimum": 0.0, "maximum": 1.0},
    ("distill", "lr"): {"kind": float, "minimum": 1e-6, "maximum": 10.0},
}


def _raise_unknown(section: str, key: str, known: Sequence[str]) -> typing.NoReturn:
    m = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.6)
    where = f" in {section}" if section else ""
    hint = f"did you mean {m[0]!r}?" if m else f"known keys: {', '.join(known)}"
    raise ConfigError(f"{section}.{key}" if section else str(key), f"unknown key {key!r}{where}; {hint}")


def _norm_section(section: str) -> str:
    """``teacher[1].fit`` -> ``teacher.fit``: list positions do not change the schema."""
    return re.sub(r"\[\d+\]", "", section)


def _yaml_keys(cls: type, section: str) -> dict[str, str]:
    """YAML key -> dataclass field name for one section."""
    out: dict[str, str] = {}
    inv = {v: k for (sec, k), v in _DURATION_KEYS.items() if sec == _norm_section(section)}
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
            _raise_unknown(section, key, list(keys))
        fname = keys[key]
        fname_full = f"{section}.{key}"
        tp = hints[fname]
        if (_norm_section(section), key) in _DURATION_KEYS:
            kwargs[fname] = parse_duration(value, fname_full)
        elif tp is Space or (typing.get_origin(tp) is None and tp == "Space"):
            spec = _SPACE_SPECS.get((_norm_section(section), key), {"kind": float})
            kwargs[fname] = Space.parse(value, fname_full, **spec)
        elif dataclasses.is_dataclass(tp):
            kwargs[fname] = _build_section(tp, value, fname_full)
        else:
            kwargs[fname] = _convert(value, tp, fname_full)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - guarded by the key check above
        raise ConfigError(section, str(exc)) from None


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
        if key not in _TOP_KEYS:
            _raise_unknown("", key, _TOP_KEYS)
    kwargs: dict[str, Any] = {}
    for key, cls in _SECTION_TYPES.items():
        if key in raw:
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
    return StudyConfig(**kwargs, source=source)


def load_config(path: str | Path) -> StudyConfig:
    """Load a study file. Missing file, bad YAML and every invalid value raise ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError("--config", "must be an existing study file", str(path), "see the files in studies/")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(str(path), f"is not valid YAML{where}") from None
    return config_from_dict(raw or {}, source=str(p))


def config_to_dict(cfg: StudyConfig) -> dict[str, Any]:
    """The resolved config as YAML-shaped plain data (durations in seconds, spaces in YAML form).

    ``config_from_dict(config_to_dict(cfg))`` rebuilds an equal config.
    """

    def dump(obj: Any, section: str) -> Any:
        if isinstance(obj, Space):
            return obj.to_yaml()
        if dataclasses.is_dataclass(obj):
            inv = {v: k for (sec, k), v in _DURATION_KEYS.items() if sec == section}
            out: dict[str, Any] = {}
            for f in dataclasses.fields(obj):
                if f.name == "source":
                    continue
                key = inv.get(f.name, f.name)
                out[key] = dump(getattr(obj, f.name), f"{section}.{f.name}" if section else f.name)
            return out
        if isinstance(obj, tuple):
            return [dump(v, section) for v in obj]
        if isinstance(obj, dict):
            return {k: dump(v, section) for k, v in obj.items()}
        return obj

    out: dict[str, Any] = {}
    for key in _TOP_KEYS:
        if key == "teacher":
            teachers = [dump(t, "teacher") for t in cfg.teachers]
            out["teacher"] = teachers[0] if len(teachers) == 1 else teachers
        else:
            out[key] = dump(getattr(cfg, key), key)
    return out


def apply_overrides(cfg: StudyConfig, sets: Sequence[str] = (), **flags: Any) -> StudyConfig:
    """Apply ``--set section.key=value`` strings and the named CLI flags, then re-validate.

    Flags: budget, trial_time, storage, study_name, n_trials, run_dir, sampler, workers, seed.
    Values in ``--set`` are parsed as YAML (``--set distill.temperature=[2,4]``).
    """
    raw = config_to_dict(cfg)
    flag_keys = {
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
    for name, value in flags.items():
        if value is None:
            continue
        if name not in flag_keys:
            raise ConfigError(f"--{name.replace('_', '-')}", "is not a known flag", name)
        sec, key = flag_keys[name]
        raw[sec][key] = value
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
        node: Any = raw
        if parts[0] not in _TOP_KEYS:
            _raise_unknown("", parts[0], _TOP_KEYS)
        if parts[0] == "teacher" and isinstance(node["teacher"], list):
            raise ConfigError("--set teacher", "cannot override one of several teachers; edit the study file", item)
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node.get(part), dict):
                if parts[0] in ("objectives", "constraints") and i == 0:
                    node[part] = node.get(part) or {}
                else:
                    where = ".".join(parts[: i + 1])
                    raise ConfigError(f"--set {path}", f"{where!r} is not a section", item)
            node = node[part]
        node[parts[-1]] = value
    return config_from_dict(raw, source=cfg.source)
