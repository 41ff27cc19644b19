"""The study file's sections, each a frozen dataclass validated on construction.

Units are in names (``_s``, ``_mb``); searchable keys are :func:`~kdsearch.config.space.space_field`.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdsearch.config.durations import format_duration
from kdsearch.config.space import Space, space_field
from kdsearch.constants import DEFAULT_RUN_DIR
from kdsearch.errors import ConfigError

DATASETS: tuple[str, ...] = ("cifar10", "cifar100", "imagefolder", "imagenet", "digits", "synthetic")
SAMPLERS: tuple[str, ...] = ("tpe", "tpe-impute", "tpe-bohb", "nsga2", "nsga3", "random", "grid", "gp")
"""``tpe-impute``/``tpe-bohb``: TPE that reads the rung pruner's PRUNED trials
(:mod:`kdsearch.search.samplers`); opt-in: on the replay table neither beat ``tpe``
(benchmarks/RESULTS.md, issue 21)."""
STUDY_DEVICES: tuple[str, ...] = ("auto", "cuda", "cpu")
"""The values of ``study.device``."""




RUNG_END_MARGIN = 0.05
"""No rung sits in the last 5 % of the box: stopping there saves under 5 % of a box and throws away
a student trained (nearly) to the end. It also absorbs a rounded ``min_fraction`` (0.111 x 9 =
0.999 is the end of the box, not a rung)."""


@dataclass(frozen=True)
class PruningConfig:
    """``study.pruning``: multi-objective early stopping at rungs of the KD box (asynchronous
    successive halving across every worker of the study; :mod:`kdsearch.search.pruning` decides
    with it).

    Rungs sit at ``min_fraction * eta**k`` of the box while below 0.95 (:data:`RUNG_END_MARGIN`):
    ``eta`` (>= 2) and ``min_fraction`` in (0, 0.95), the first rung. At each, a trial outside the
    top ``1/eta`` of the trials that reached it (ranked on validation accuracy and the fixed-cost
    objectives) stops and is stored as PRUNED. ``min_competitors`` (>= 1, default ``eta``): the
    fewest trials at a rung, this one included, before anything there is pruned.
    """

    enabled: bool = False
    eta: int = 3
    min_fraction: float = 1.0 / 27.0  # of the box: the first rung (replay, RESULTS "Issue 21": 1/27 beats 1/9)
    min_competitors: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.eta, bool) or not isinstance(self.eta, int) or self.eta < 2:
            raise ConfigError("study.pruning.eta", "must be an integer >= 2", self.eta, "e.g. 3")
        if not (isinstance(self.min_fraction, (int, float)) and 0 < self.min_fraction < 1 - RUNG_END_MARGIN):
            raise ConfigError("study.pruning.min_fraction",
                              f"must be a fraction of the box in (0, {1 - RUNG_END_MARGIN:g}): a rung in the last "
                              f"{100 * RUNG_END_MARGIN:g}% of the box saves almost nothing",
                              self.min_fraction, "e.g. 0.037 (1/27)")
        if self.min_competitors is not None and (
            isinstance(self.min_competitors, bool) or not isinstance(self.min_competitors, int)
            or self.min_competitors < 1
        ):
            raise ConfigError("study.pruning.min_competitors", "must be an integer >= 1", self.min_competitors)

    @property
    def competitors_needed(self) -> int:
        """``min_competitors``, or ``eta`` when it is not set."""
        return self.eta if self.min_competitors is None else self.min_competitors

    @property
    def rungs(self) -> tuple[float, ...]:
        """Rung fractions of the box, increasing, all below ``1 - RUNG_END_MARGIN`` (0.95): a rung at
        the end of the box would discard a fully trained student to save nothing."""
        out: list[float] = []
        r = float(self.min_fraction)
        while r < 1.0 - RUNG_END_MARGIN:
            out.append(r)
            r *= self.eta
        return tuple(out)


@dataclass(frozen=True)
class StudyRunConfig:
    """The ``study:`` section: where the study lives and how it is run (the whole file is
    :class:`~kdsearch.config.StudyConfig`)."""

    name: str = "kdsearch"
    run_dir: str = DEFAULT_RUN_DIR
    storage: str | None = None  # default: journal file <run_dir>/<name>/journal.log
    sampler: str = "tpe"
    seed: int = 0
    budget_s: float = 3600.0  # wall-clock budget of one `optimize` invocation
    n_trials: int | None = None  # cap on trials started by this invocation
    # The KD time box of one trial (YAML ``trial_time``: a duration, or a list of durations that
    # the sampler chooses from per trial, the Optuna parameter ``trial_time_s``).
    trial_times_s: tuple[float, ...] = (60.0,)
    grace_s: float = 120.0  # extra time (measurement, setup) before a trial is killed
    max_retries: int = 1  # how often a stale trial's params are re-queued
    workers: int | None = None  # None: one per visible GPU, else 1
    share_gpu: bool = False  # allow more workers than visible GPUs (their GPU figures then interfere)
    # What the workers train on: "cuda" is refused before anything is written when torch has no
    # usable GPU (kdsearch.measure.device says why); "auto" takes the GPU when usable, else the
    # CPU, announced; "cpu" hides the GPUs from the workers.
    device: str = "auto"
    n_startup_trials: int = 10  # random trials before TPE/GP model the space
    population_size: int = 20  # NSGA-II/III population
    pruning: PruningConfig = field(default_factory=PruningConfig)  # early stopping at rungs

    @property
    def trial_time_s(self) -> float:
        """The longest box the study may give a trial (the one box when it is not searched): what
        the supervisor's hard limit and the worker's "one more trial?" estimate allow for."""
        return max(self.trial_times_s)

    @property
    def box_searched(self) -> bool:
        """Whether each trial draws its box from ``study.trial_time`` (a list of two or more)."""
        return len(self.trial_times_s) > 1

    @property
    def box_space(self) -> Space:
        """``study.trial_time`` as a search space (Optuna parameter ``trial_time_s``)."""
        return Space(choices=self.trial_times_s)

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
        if self.device not in STUDY_DEVICES:
            raise ConfigError("study.device", f"must be one of {list(STUDY_DEVICES)}", self.device,
                              "auto takes a usable GPU, else the CPU (announced)")
        if not self.trial_times_s:
            raise ConfigError("study.trial_time", "must be a duration or a non-empty list of durations", [])
        if len(set(self.trial_times_s)) != len(self.trial_times_s):
            raise ConfigError("study.trial_time", "must list distinct durations",
                              [format_duration(b) for b in self.trial_times_s])
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
            validate_storage_url(self.storage)


def validate_storage_url(url: str) -> None:
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


TOPK_AUTO_CLASSES = 100  # topk "auto": label spaces larger than this store only the top-k logits
TOPK_AUTO_K = 20  # ... and this is the k


@dataclass(frozen=True)
class TeacherCacheConfig:
    """Teacher-logit cache: K augmented views of the train split, logits in fp16.

    ``topk``: ``"auto"`` (default) stores all logits up to :data:`TOPK_AUTO_CLASSES` classes and
    the top :data:`TOPK_AUTO_K` above (ImageNet-1k: 20 of 1000, 50x smaller); an integer stores
    that many; ``null`` always stores all logits.
    """

    views: int = 32
    topk: Any = "auto"  # "auto" | int >= 1 | None (all logits)
    dir: str | None = None  # teacher-logit cache folder; default <run_dir>/_cache/logits (shared by the run folder)
    batch_size: int = 256  # teacher batch size while building
    crop_padding: int = 4  # pixels of padding around the stored image for random crops
    flip: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.views <= 1024:
            raise ConfigError("teacher.cache.views", "must be in [1, 1024]", self.views)
        topk = self.topk
        if isinstance(topk, float) and topk.is_integer():
            object.__setattr__(self, "topk", int(topk))
            topk = self.topk
        if not (topk is None or topk == "auto" or (isinstance(topk, int) and not isinstance(topk, bool))):
            raise ConfigError(
                "teacher.cache.topk", "must be auto, an integer >= 1, or null (all logits)", topk
            )
        if isinstance(topk, int) and topk < 1:
            raise ConfigError("teacher.cache.topk", "must be >= 1", topk)
        if self.batch_size < 1:
            raise ConfigError("teacher.cache.batch_size", "must be >= 1", self.batch_size)
        if not 0 <= self.crop_padding <= 64:
            raise ConfigError("teacher.cache.crop_padding", "must be in [0, 64] pixels", self.crop_padding)

    def resolved_topk(self, num_classes: int) -> int | None:
        """The k stored for ``num_classes`` classes (``None``: all logits). See the class docstring."""
        if self.topk is None:
            return None
        if self.topk == "auto":
            return TOPK_AUTO_K if num_classes > TOPK_AUTO_CLASSES else None
        return min(int(self.topk), num_classes)


@dataclass(frozen=True)
class TeacherFitConfig:
    """Fitting the teacher to the data set (fine-tune, or from scratch without weights).

    Without ``target_accuracy`` and ``max_epochs`` the fit trains for ``time_s`` (a time box: its
    quality depends on the machine's speed). With either, the fit aims at a quality instead and
    ``time_s`` is only a cap: it stops once the val accuracy, checked every
    ``eval_every_epochs`` epochs, reaches ``target_accuracy``, or after ``max_epochs`` epochs (the
    LR schedule then runs over those epochs), or at the cap, whichever comes first.
    """

    enabled: str = "auto"  # auto: fit when classes differ or no pretrained weights; true; false
    time_s: float = 300.0  # the box, or the cap once target_accuracy / max_epochs is set (wall clock)
    lr: float = 1e-3  # AdamW
    weight_decay: float = 0.05
    batch_size: int = 128
    target_accuracy: float | None = None  # stop once the val accuracy (fraction 0..1) reaches it
    max_epochs: float | None = None  # passes over the train split: schedule length and stop
    eval_every_epochs: float = 1.0  # how often the val accuracy is checked for target_accuracy
    flip: bool = True  # horizontal flips in the fit's augmentation (false for digits, text, ...)

    def __post_init__(self) -> None:
        if self.enabled not in ("auto", "true", "false"):
            raise ConfigError("teacher.fit.enabled", "must be auto, true or false", self.enabled)
        if not self.time_s > 0:
            raise ConfigError("teacher.fit.time", "must be > 0 (a duration such as 60s or 5m)", self.time_s)
        if not 0 < self.lr < 10:
            raise ConfigError("teacher.fit.lr", "must be in (0, 10)", self.lr)
        if self.batch_size < 1:
            raise ConfigError("teacher.fit.batch_size", "must be >= 1", self.batch_size)
        if self.target_accuracy is not None and not 0 < self.target_accuracy <= 1:
            raise ConfigError(
                "teacher.fit.target_accuracy", "must be in (0, 1] (a fraction of the val split)",
                self.target_accuracy, "e.g. 0.9 for 90%",
            )
        if self.max_epochs is not None and not 0 < self.max_epochs <= 100_000:
            raise ConfigError("teacher.fit.max_epochs", "must be in (0, 100000]", self.max_epochs)
        if not 0 < self.eval_every_epochs <= 1000:
            raise ConfigError("teacher.fit.eval_every_epochs", "must be in (0, 1000]", self.eval_every_epochs)

    @property
    def time_is_cap(self) -> bool:
        """True when the fit aims at a target (accuracy or epochs) and ``time_s`` only caps it."""
        return self.target_accuracy is not None or self.max_epochs is not None

    def describe(self) -> str:
        """What the fit aims at, for progress lines: ``"to 90% val, at most 30 epochs, cap 120s"``."""
        aims: list[str] = []
        if self.target_accuracy is not None:
            aims.append(f"to {100 * self.target_accuracy:g}% val")
        if self.max_epochs is not None:
            aims.append(f"at most {self.max_epochs:g} epochs")
        if not aims:
            return f"for {self.time_s:g}s"
        return ", ".join(aims) + f", cap {self.time_s:g}s"


INTERPOLATIONS: tuple[str, ...] = ("bilinear", "bicubic", "nearest")
"""Resize modes the preprocessing supports (``torch.nn.functional.interpolate`` names)."""


def _check_channel_triple(name: str, value: Any, *, low: float, high: float, low_open: bool) -> None:
    """3 numbers on the 0..1 pixel scale, each in [low, high] (``(low, high]`` when ``low_open``)."""
    if not isinstance(value, tuple) or len(value) != 3:
        shown = list(value) if isinstance(value, tuple) else value
        raise ConfigError(name, "must be 3 numbers, one per RGB channel", shown, "e.g. [0.5, 0.5, 0.5]")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
            raise ConfigError(name, "must be 3 numbers, one per RGB channel", list(value))
        if v > high:
            raise ConfigError(
                name, f"must be on the 0..1 pixel scale (each <= {high})", list(value),
                "values for 0..255 pixels: divide them by 255",
            )
        if v < low or (low_open and v == low):
            rule = f"each must be > {low}" if low_open else f"each must be >= {low}"
            raise ConfigError(name, rule, list(value))


@dataclass(frozen=True)
class TeacherConfig:
    """A timm teacher: a model name, ``hf-hub:`` name, or a local checkpoint plus kwargs.

    ``mean``/``std`` (3 numbers each, 0..1 pixel scale) and ``interpolation`` describe the
    preprocessing the teacher was trained with; they override timm's ``pretrained_cfg`` for the
    architecture (mean/std) and kdsearch's default resize (bilinear). ``expected_accuracy``
    (0..1), when given, is compared with the teacher's validation accuracy at start.
    """

    name: str = "vit_tiny_patch16_224"
    pretrained: bool = False
    checkpoint: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    input_size: int | None = None  # override the teacher's input resolution (pixels)
    mean: tuple[float, ...] | None = None  # per RGB channel, 0..1 scale; default: timm pretrained_cfg
    std: tuple[float, ...] | None = None  # per RGB channel, 0..1 scale; default: timm pretrained_cfg
    interpolation: str = "bilinear"  # resize to input_size: bilinear | bicubic | nearest
    expected_accuracy: float | None = None  # known val accuracy (0..1); warn when far below
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
        if self.mean is not None:
            _check_channel_triple("teacher.mean", self.mean, low=0.0, high=1.0, low_open=False)
        if self.std is not None:
            _check_channel_triple("teacher.std", self.std, low=0.0, high=1.0, low_open=True)
        if self.interpolation not in INTERPOLATIONS:
            m = difflib.get_close_matches(str(self.interpolation), INTERPOLATIONS, n=1)
            raise ConfigError(
                "teacher.interpolation",
                f"must be one of {list(INTERPOLATIONS)}",
                self.interpolation,
                f"did you mean {m[0]!r}?" if m else None,
            )
        if self.expected_accuracy is not None and not 0.0 < self.expected_accuracy <= 1.0:
            raise ConfigError(
                "teacher.expected_accuracy", "must be in (0, 1] (a fraction, not a percentage)",
                self.expected_accuracy,
            )
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
class EarlyStopConfig:
    """Plateau stop: after ``patience`` in-box evaluations in a row without a gain above
    ``min_delta``, the loop cools the LR down linearly to its final value over
    ``cooldown_fraction`` of the box (less if less is left), evaluates, and ends.

    The patience counts evaluations that can actually occur: with ``eval_every_fraction`` f the
    box holds ``ceil(1/f) - 1`` evaluations before the final one, the first sets the reference,
    so a patience above ``ceil(1/f) - 2`` could only "fire" at the end and is refused when the
    config loads (see :func:`in_box_evaluations`).
    """

    enabled: bool = False
    patience: int = 2  # in-box evaluations without improvement
    min_delta: float = 0.002  # accuracy
    cooldown_fraction: float = 0.05  # of the box: linear LR decay after a stop, before the final evaluation

    def __post_init__(self) -> None:
        if self.patience < 1:
            raise ConfigError("distill.early_stop.patience", "must be >= 1", self.patience)
        if not 0 <= self.min_delta <= 1:
            raise ConfigError("distill.early_stop.min_delta", "must be in [0, 1] (an accuracy)", self.min_delta)
        if not 0 <= self.cooldown_fraction <= 0.5:
            raise ConfigError(
                "distill.early_stop.cooldown_fraction", "must be in [0, 0.5] (a fraction of the box)",
                self.cooldown_fraction,
            )


def in_box_evaluations(eval_every_fraction: float) -> int:
    """How many validations the loop can run before the final one: at k * f of the box for every
    k with k * f < 1, i.e. ``ceil(1/f) - 1`` (3 for f = 0.25, 9 for f = 0.1, 0 for f = 1)."""
    return max(math.ceil(1.0 / eval_every_fraction - 1e-9) - 1, 0)


@dataclass(frozen=True)
class DistillConfig:
    """Hinton KD: alpha*T^2*KL(teacher_T || student_T) + (1-alpha)*CE, time-boxed."""

    temperature: Space = space_field(Space(choices=(4.0,)), minimum=0.1, maximum=100.0)
    alpha: Space = space_field(Space(choices=(0.9,)), minimum=0.0, maximum=1.0)
    lr: Space = space_field(Space(choices=(0.05,)), minimum=1e-6, maximum=10.0)  # peak SGD learning rate
    optimizer: str = "sgd"  # sgd (nesterov, momentum 0.9) | adamw
    weight_decay: float = 5e-4
    batch_size: int = 128
    warmup_fraction: float = 0.05  # of the time box
    final_lr_fraction: float = 0.0  # cosine decays to peak * this
    eval_every_fraction: float = 0.25  # validate at these fractions of the box
    # In-box evaluations (rungs, plateau) use a fixed, seeded, stratified subset of val of this many
    # images; the final evaluation always uses all of val. None: every in-box evaluation uses all.
    eval_subset: int | None = 2000
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)
    label_smoothing: float = 0.0
    compile: bool = False
    amp: bool = True  # CUDA autocast: bf16 where supported, else fp16 + GradScaler; CPU is always fp32
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
        if self.eval_subset is not None and self.eval_subset < 10:
            raise ConfigError("distill.eval_subset", "must be >= 10 images, or null for all of val", self.eval_subset)
        if not 0 < self.eval_every_fraction <= 1:
            raise ConfigError(
                "distill.eval_every_fraction", "must be in (0, 1]", self.eval_every_fraction
            )
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError("distill.label_smoothing", "must be in [0, 1)", self.label_smoothing)
        stop = self.early_stop
        if stop.enabled:
            # The first in-box evaluation sets the reference; a stop needs `patience` more, all
            # before the final evaluation (a "stop" there would change nothing).
            can_occur = in_box_evaluations(self.eval_every_fraction)
            if stop.patience > can_occur - 1:
                most = can_occur - 1
                rule = (
                    f"must be <= {most}: with eval_every_fraction {self.eval_every_fraction:g} the box holds "
                    f"{can_occur} evaluation(s) before the final one, and the first sets the reference"
                    if most >= 1 else
                    f"can never fire: eval_every_fraction {self.eval_every_fraction:g} leaves "
                    f"{can_occur} evaluation(s) before the final one"
                )
                fix = f"set distill.eval_every_fraction <= {1.0 / (stop.patience + 2):.3g}"
                if most >= 1:
                    fix = f"lower distill.early_stop.patience to {most}, or {fix}"
                raise ConfigError("distill.early_stop.patience", rule, stop.patience, fix)


@dataclass(frozen=True)
class LatencyConfig:
    """Latency timing per (device, batch size). ``warmup`` untimed forwards run first, at most
    ``max_time_s`` seconds of them; then ``min_repeats`` to ``max_repeats`` timed repeats, at most
    ``max_time_s`` seconds once ``min_repeats`` are done. ``measure.max_time`` bounds it all.

    ``devices``: ``auto`` (the trial's device), ``cpu``, ``cuda``, and ``ort-cpu``: the student
    exported to ONNX and run by ONNX Runtime on the CPU with ``ort_threads`` intra-op threads and
    graph optimisation ``ort_optimization`` (disable, basic, extended, all), giving
    ``latency_ms_b{N}_ort`` (needs ``pip install 'kdsearch[export]'``)."""

    batch_sizes: tuple[int, ...] = (1, 64)
    devices: tuple[str, ...] = ("auto",)  # auto = the trial's device; may add cpu, cuda, ort-cpu
    cpu_threads: int = 1
    ort_threads: int = 1  # ONNX Runtime intra-op threads for ort-cpu
    ort_optimization: str = "all"  # ONNX Runtime graph optimisation level for ort-cpu
    warmup: int = 5  # untimed forwards before timing (at most max_time_s of them)
    min_repeats: int = 10
    max_repeats: int = 200
    max_time_s: float = 2.0  # cap on timed repeats per (device, batch)
    target_iqr_ratio: float = 0.1  # stop once IQR / median falls below this

    def __post_init__(self) -> None:
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise ConfigError("measure.latency.batch_sizes", "must be a list of integers >= 1", list(self.batch_sizes))
        for d in self.devices:
            if d not in ("auto", "cpu", "cuda", "ort-cpu"):
                raise ConfigError("measure.latency.devices", "each must be auto, cpu, cuda or ort-cpu", d)
        if self.cpu_threads < 1:
            raise ConfigError("measure.latency.cpu_threads", "must be >= 1", self.cpu_threads)
        if self.ort_threads < 1:
            raise ConfigError("measure.latency.ort_threads", "must be >= 1", self.ort_threads)
        if self.ort_optimization not in ("disable", "basic", "extended", "all"):
            raise ConfigError(
                "measure.latency.ort_optimization", "must be disable, basic, extended or all", self.ort_optimization
            )
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
    poll_interval_s: float = 0.02  # how often the inference loop reads the energy counter (Zeus polls power itself)

    def __post_init__(self) -> None:
        if self.infer_min_time_s <= 0:
            raise ConfigError("measure.energy.infer_min_time", "must be > 0", self.infer_min_time_s)
        if self.poll_interval_s <= 0:
            raise ConfigError("measure.energy.poll_interval", "must be > 0", self.poll_interval_s)


MEASURE_MAX_TIME_DEFAULT_S = 60.0  # measure.max_time when unset: at most this ...
MEASURE_GRACE_SHARE = 0.5  # ... and at most this share of study.grace (the rest: eval, storing)


@dataclass(frozen=True)
class MeasureConfig:
    """How a trained student is measured.

    ``max_time_s`` (YAML ``measure.max_time``) is the hard time budget of the whole inference
    measurement phase (latency on every device and batch size, warm-ups included, memory,
    energy, ops). A figure that cannot finish inside it is stored as missing with its estimate.
    Unset: half of ``study.grace``, at most 60 s (see :meth:`budget_s`).
    """

    latency: LatencyConfig = field(default_factory=LatencyConfig)
    energy: EnergyConfig = field(default_factory=EnergyConfig)
    eval_batch_size: int = 512
    max_time_s: float | None = None

    def __post_init__(self) -> None:
        if self.eval_batch_size < 1:
            raise ConfigError("measure.eval_batch_size", "must be >= 1", self.eval_batch_size)
        if self.max_time_s is not None and not self.max_time_s > 0:
            raise ConfigError("measure.max_time", "must be > 0", self.max_time_s)

    def budget_s(self, grace_s: float | None = None) -> float:
        """The measurement phase's budget in seconds: ``max_time_s``, or when unset
        ``min(60, grace_s / 2)`` (60 s without a grace)."""
        if self.max_time_s is not None:
            return float(self.max_time_s)
        if grace_s is None:
            return MEASURE_MAX_TIME_DEFAULT_S
        return min(MEASURE_MAX_TIME_DEFAULT_S, MEASURE_GRACE_SHARE * float(grace_s))


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning after distillation, per trial: freeze the features, train the head at a low LR."""

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


REHEARSAL_METRICS: tuple[str, ...] = (
    "val_accuracy", "test_accuracy", "kd_time_s", "params", "macs", "model_size_mb", "latency_ms_b1",
    "latency_ms_b1_cpu",
)
"""The figures a rehearsal can give a trial: what each row of a recorded table holds
(``benchmarks/search_table/README.md``; the latency is batch 1 on the CPU), and the box."""


@dataclass(frozen=True)
class RehearsalConfig:
    """``rehearsal``: rehearse the study's budget, workers, pruning and constraints on a recorded
    table of real KD trials instead of training (:mod:`kdsearch.search.rehearsal`).

    ``table`` is a JSON-lines file of recorded trials (``benchmarks/search_table/table.jsonl``);
    ``speed`` is how many seconds of the KD box one wall second replays (100: a 10-minute box
    in 6 s). Unset (the default), trials train for real.
    """

    table: str | None = None
    speed: float = 100.0

    @property
    def enabled(self) -> bool:
        return self.table is not None

    def __post_init__(self) -> None:
        if self.table is not None and not self.table.strip():
            raise ConfigError("rehearsal.table", "must be the path of a recorded table (JSON lines)", self.table,
                              "e.g. benchmarks/search_table/table.jsonl")
        if not (math.isfinite(self.speed) and self.speed > 0):
            raise ConfigError("rehearsal.speed", "must be a number > 0 (box seconds replayed per wall second)",
                              self.speed, "e.g. 100")
