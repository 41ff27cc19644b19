"""Teachers: any timm model name, an ``hf-hub:`` name, or a local checkpoint.

:func:`create_teacher` turns a :class:`~kdsearch.config.TeacherConfig` into a
:class:`LoadedTeacher` (eval mode, on the device) or raises one line a user can act on:
:class:`~kdsearch.errors.TeacherError` (unknown name, weights that cannot be downloaded, bad
``model_kwargs``) or :class:`~kdsearch.errors.CheckpointError` (unreadable file, keys or shapes
that do not fit). Where the weights come from:

* ``checkpoint`` set: ``timm.create_model(name, pretrained=False, num_classes=..., **model_kwargs)``
  then the file's state_dict (``.pth``/``.pt``/``.bin`` via ``torch.load(weights_only=True)``,
  ``.safetensors`` via safetensors). ``{'state_dict_ema' | 'model_ema' | 'state_dict' | 'model' |
  'model_state_dict': ...}`` wrappers are unwrapped (EMA first, as timm does) and ``module.`` /
  ``_orig_mod.`` prefixes removed. If the raw keys do not fit, the timm family's own
  ``checkpoint_filter_fn`` is tried (it converts original-repo layouts and resizes position
  embeddings). A classifier for another number of classes is dropped and the head is left
  freshly initialised for ``num_classes`` (``head_reset=True``: the teacher needs fitting).
  ``pretrained`` is ignored when a checkpoint is given.
* ``pretrained: true``: timm downloads the weights (Hugging Face Hub). When ``num_classes``
  differs from the pretrained classifier, timm resets the head (``head_reset=True``). Offline
  (``HF_HUB_OFFLINE``, or the hub not answering one short probe: :mod:`kdsearch.models.hub`),
  only the local cache is read, so missing weights fail in seconds, not after the retries.
* neither: random init (``pretrained=False`` on the result; the teacher needs fitting).

Preprocessing: the teacher sees images resized to ``input_size`` px with ``interpolation`` and
normalised with ``mean``/``std`` (0..1 pixel scale). ``teacher.mean``/``teacher.std`` override
timm's ``pretrained_cfg`` for the architecture -- a teacher trained on the user's data with its
own normalisation needs them -- and ``LoadedTeacher.norm_source`` says which was used.
:func:`weak_teacher_warning` names normalisation and input size when the accuracy says the
teacher is not seeing what it was trained on.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import resolve_model_data_config
from torch import nn

from kdsearch.config import TeacherConfig
from kdsearch.errors import CheckpointError, TeacherError
from kdsearch.models.hub import hub_offline, hub_unreachable_reason

__all__ = [
    "LoadedTeacher",
    "create_teacher",
    "teacher_needs_fit",
    "state_dict_sha256",
    "load_checkpoint_state_dict",
    "weak_teacher_warning",
    "val_leak_check",
    "LEAK_MIN_GAP",
    "LEAK_Z",
    "CHANCE_FACTOR",
    "EXPECTED_SHORTFALL",
]

log = logging.getLogger(__name__)

CHANCE_FACTOR = 1.5  # val accuracy <= this / num_classes counts as near chance
EXPECTED_SHORTFALL = 0.10  # val accuracy this far (absolute) below teacher.expected_accuracy warns
LEAK_MIN_GAP = 0.03  # val minus test accuracy above this (3 points) ...
LEAK_Z = 3.0  # ... and above this many standard errors of the difference: the teacher saw val

_WRAPPER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model", "model_state_dict")
_PREFIXES = ("module.", "_orig_mod.")
_SOURCES = ("hf-hub:", "hf_hub:", "local-dir:")


@dataclass
class LoadedTeacher:
    model: nn.Module  # eval mode, on the requested device
    name: str  # timm name as given
    label: str  # TeacherConfig.display_name
    input_size: int  # px, from pretrained_cfg, model_kwargs.img_size or cfg.input_size
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_classes: int
    weights_sha256: str  # hash of the state_dict (names, dtypes, shapes, bytes); cache-key part
    pretrained: bool  # had real weights (pretrained download or checkpoint)
    head_reset: bool = False  # classifier re-initialised for num_classes; it needs fitting
    checkpoint: str | None = None  # the local file the weights came from, if any
    interpolation: str = "bilinear"  # resize mode to input_size (teacher.interpolation)
    norm_source: str = "timm pretrained_cfg"  # where mean/std came from: or "teacher.mean/std"


# ----------------------------------------------------------------------------------------------
# Hashing


def state_dict_sha256(model_or_state: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """Hex sha256 over a state_dict: for each key in sorted order, the name, dtype, shape and bytes.

    Deterministic across runs and devices (tensors are hashed from a contiguous CPU copy).
    """
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(name.encode("utf-8"))
        h.update(f"|{t.dtype}|{tuple(state[name].shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Names


def _check_name(name: str) -> None:
    if name.startswith(_SOURCES):
        return
    if timm.is_model(name):
        return
    arch = name.split(".", 1)[0]
    matches = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
    if matches:
        hint = "did you mean " + " or ".join(repr(m) for m in matches) + "?"
    else:
        hint = "see timm.list_models('*pattern*') for the names timm knows, or use hf-hub:org/name"
    raise TeacherError(f"teacher.name: timm has no model {name!r}; {hint}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


# ----------------------------------------------------------------------------------------------
# Checkpoints


def load_checkpoint_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a clean state_dict (CPU tensors), or raise CheckpointError."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(
            f"teacher.checkpoint: file not found (got {str(p)!r}); give the path to a local weights file"
        )
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(p), device="cpu")
        else:
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad file for the user
        raise CheckpointError(
            f"teacher.checkpoint {str(p)!r}: cannot be read ({_first_line(exc)}); it must be a "
            "state_dict saved with torch.save or safetensors (pickled modules are refused: weights_only=True)"
        ) from None
    for _ in range(2):  # e.g. {'model': {'state_dict': ...}}
        if isinstance(obj, Mapping) and not _all_tensors(obj):
            for key in _WRAPPER_KEYS:
                if isinstance(obj.get(key), Mapping):
                    obj = obj[key]
                    break
    if not isinstance(obj, Mapping) or not obj or not _all_tensors(obj):
        kind = type(obj).__name__
        raise CheckpointError(
            f"teacher.checkpoint {str(p)!r}: does not hold a state_dict of tensors (found {kind}"
            + (f" with keys {sorted(map(str, obj))[:5]}" if isinstance(obj, Mapping) else "")
            + "); save model.state_dict()"
        )
    out: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        k = str(key)
        while k.startswith(_PREFIXES):
            for prefix in _PREFIXES:
                if k.startswith(prefix):
                    k = k[len(prefix) :]
        out[k] = value
    return out


def _all_tensors(obj: Mapping[Any, Any]) -> bool:
    return all(isinstance(v, torch.Tensor) for v in obj.values())


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Module-name prefixes of the classifier (``head``, ``fc``, ``head.fc``, ...)."""
    names: set[str] = set()
    cfg_cls = getattr(model, "pretrained_cfg", {}).get("classifier")
    if isinstance(cfg_cls, str):
        names.add(cfg_cls)
    elif isinstance(cfg_cls, (tuple, list)):
        names.update(str(c) for c in cfg_cls)
    get_cls = getattr(model, "get_classifier", None)
    if callable(get_cls):
        try:
            cls_mod = get_cls()
        except Exception:  # noqa: BLE001 - some models have no single classifier
            cls_mod = None
        if isinstance(cls_mod, nn.Module):
            for n, m in model.named_modules():
                if m is cls_mod and n:
                    names.add(n)
    return tuple(n + "." for n in names)


@dataclass
class _Fit:
    missing: list[str]
    unexpected: list[str]
    mismatched: list[str]

    def bad(self, classifier: tuple[str, ...]) -> list[str]:
        """Problems outside the classifier."""
        outside = [
            k for k in self.missing + self.unexpected + self.mismatched if not k.startswith(classifier)
        ]
        return [k for k in outside if not k.endswith("num_batches_tracked")]


def _compare(state: Mapping[str, torch.Tensor], model_state: Mapping[str, torch.Tensor]) -> _Fit:
    return _Fit(
        missing=[k for k in model_state if k not in state],
        unexpected=[k for k in state if k not in model_state],
        mismatched=[
            k for k in state if k in model_state and tuple(state[k].shape) != tuple(model_state[k].shape)
        ],
    )


def _family_filter(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The timm family's ``checkpoint_filter_fn`` applied to ``state``, or None if none or it fails."""
    fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if not callable(fn):
        return None
    try:
        out = fn(dict(state), model)
    except Exception:  # noqa: BLE001 - a filter that cannot convert means: keep the raw report
        return None
    return dict(out) if isinstance(out, Mapping) and _all_tensors(out) else None


def _load_checkpoint_into(model: nn.Module, path: str, name: str) -> bool:
    """Load ``path`` into ``model``; return True when the classifier was left fresh (class mismatch)."""
    state = load_checkpoint_state_dict(path)
    model_state = model.state_dict()
    classifier = _classifier_prefixes(model)
    fit = _compare(state, model_state)
    if fit.bad(classifier):
        filtered = _family_filter(model, state)
        if filtered is not None:
            fit2 = _compare(filtered, model_state)
            if not fit2.bad(classifier):
                state, fit = filtered, fit2
    bad = fit.bad(classifier)
    if bad:
        parts = []
        if fit.missing:
            parts.append(f"missing {fit.missing[:3]}")
        if fit.unexpected:
            parts.append(f"unexpected {fit.unexpected[:3]}")
        if fit.mismatched:
            shapes = [
                f"{k} {tuple(state[k].shape)} vs {tuple(model_state[k].shape)}" for k in fit.mismatched[:3]
            ]
            parts.append(f"shape mismatch [{'; '.join(shapes)}]")
        raise CheckpointError(
            f"teacher.checkpoint {path!r}: does not fit timm model {name!r} "
            f"({len(bad)} bad keys: {', '.join(parts)}); check teacher.name and teacher.model_kwargs"
        )
    head_reset = any(k.startswith(classifier) for k in fit.missing + fit.mismatched + fit.unexpected)
    if head_reset:
        state = {k: v for k, v in state.items() if not k.startswith(classifier)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    leftover = [k for k in list(missing) + list(unexpected) if not k.startswith(classifier)]
    leftover = [k for k in leftover if not k.endswith("num_batches_tracked")]
    if leftover:  # pragma: no cover - guarded by the comparison above
        raise CheckpointError(f"teacher.checkpoint {path!r}: keys {leftover[:3]} did not load into {name!r}")
    return head_reset


# ----------------------------------------------------------------------------------------------
# Teacher


def _create_model(cfg: TeacherConfig, num_classes: int, pretrained: bool) -> nn.Module:
    kwargs = dict(cfg.model_kwargs)
    if "num_classes" in kwargs and kwargs.pop("num_classes") != num_classes:
        raise TeacherError(
            f"teacher.model_kwargs.num_classes: is set from the data set ({num_classes} classes); remove it"
        )
    if "pretrained_cfg_overlay" in kwargs:
        raise TeacherError(
            "teacher.model_kwargs.pretrained_cfg_overlay: is not allowed; set teacher.mean, teacher.std, "
            "teacher.interpolation and teacher.input_size instead"
        )
    for key in ("pretrained", "checkpoint_path"):
        if key in kwargs:
            raise TeacherError(
                f"teacher.model_kwargs.{key}: is not allowed; use teacher.pretrained or teacher.checkpoint"
            )
    name = cfg.name
    from_hub = name.startswith(("hf-hub:", "hf_hub:"))
    offline = hub_unreachable_reason() if pretrained or from_hub else None
    try:
        with hub_offline(offline is not None):
            return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except OSError as exc:  # HF hub / urllib / requests / httpx network errors are all OSErrors
        if offline is not None:
            what = f"{name!r}" if from_hub else f"the weights of {name!r}"
            raise TeacherError(
                f"{'teacher.name' if from_hub else 'teacher.pretrained'}: {what} are not in the local "
                f"Hugging Face cache and the hub is unreachable ({offline}); download them once with "
                "network access, or set teacher.checkpoint to a local .pth/.safetensors file"
                + ("" if from_hub else " (or teacher.pretrained: false)")
            ) from None
        if from_hub:
            repo = name.split(":", 1)[1]
            raise TeacherError(
                f"teacher.name: cannot fetch {name!r} from the Hugging Face Hub ({_first_line(exc)}); "
                f"download it once with network access (huggingface-cli download {repo}), or use the "
                "timm architecture name with teacher.checkpoint set to a local weights file"
            ) from None
        raise TeacherError(
            f"teacher.pretrained: cannot download the weights of {name!r} ({_first_line(exc)}); "
            "download them once with network access, or set teacher.checkpoint to a local "
            ".pth/.safetensors file (or teacher.pretrained: false)"
        ) from None
    except RuntimeError as exc:
        if pretrained and "pretrained" in str(exc).lower():
            raise TeacherError(
                f"teacher.pretrained: timm has no pretrained weights for {name!r} ({_first_line(exc)}); "
                "set teacher.pretrained: false or give teacher.checkpoint"
            ) from None
        raise TeacherError(
            f"teacher.model_kwargs: timm cannot build {name!r} with {kwargs} ({_first_line(exc)})"
        ) from None
    except (TypeError, ValueError, AssertionError, KeyError) as exc:
        raise TeacherError(
            f"teacher.model_kwargs: timm cannot build {name!r} with {kwargs} ({_first_line(exc)})"
        ) from None


def _as_triple(value: Any, default: tuple[float, float, float]) -> tuple[float, float, float]:
    if value is None:
        return default
    vals = tuple(float(v) for v in (value if isinstance(value, (tuple, list)) else (value,)))
    if len(vals) == 1:
        vals = vals * 3
    return (vals[0], vals[1], vals[2]) if len(vals) >= 3 else default


def _resolve_input(
    cfg: TeacherConfig, model: nn.Module
) -> tuple[int, tuple[float, float, float], tuple[float, float, float], str]:
    """Input size (px), mean, std and where mean/std came from: ``teacher.mean``/``teacher.std``
    when given (each overrides on its own), else timm's pretrained_cfg, else ImageNet's."""
    data_cfg = resolve_model_data_config(model)
    size = int(data_cfg["input_size"][-1])
    img_size = cfg.model_kwargs.get("img_size")
    if img_size is not None:  # timm keeps the pretrained_cfg input size when img_size is overridden
        size = int(img_size[-1] if isinstance(img_size, (tuple, list)) else img_size)
    if cfg.input_size is not None:
        size = int(cfg.input_size)
    mean = _as_triple(data_cfg.get("mean"), (0.485, 0.456, 0.406))
    std = _as_triple(data_cfg.get("std"), (0.229, 0.224, 0.225))
    sources = []
    if cfg.mean is not None:
        mean = _as_triple(cfg.mean, mean)
        sources.append("teacher.mean")
    if cfg.std is not None:
        std = _as_triple(cfg.std, std)
        sources.append("teacher.std")
    source = " + ".join(sources) + (" (rest: timm pretrained_cfg)" if len(sources) == 1 else "")
    return size, mean, std, source or "timm pretrained_cfg"


def create_teacher(
    cfg: TeacherConfig, num_classes: int, device: torch.device | str = "cpu", check_forward: bool = True
) -> LoadedTeacher:
    """Build the teacher ``cfg`` describes for a data set with ``num_classes`` classes.

    The result is in eval mode on ``device``. ``check_forward`` runs one image at the resolved
    input size (on the CPU, before moving) so a model that cannot run at that size fails here,
    as one TeacherError, rather than in the middle of the logit cache.
    """
    if num_classes < 1:
        raise TeacherError(f"num_classes: must be >= 1 (got {num_classes!r})")
    _check_name(cfg.name)
    use_checkpoint = cfg.checkpoint is not None
    pretrained = bool(cfg.pretrained) and not use_checkpoint
    model = _create_model(cfg, num_classes, pretrained)

    head_reset = False
    if use_checkpoint:
        assert cfg.checkpoint is not None
        head_reset = _load_checkpoint_into(model, cfg.checkpoint, cfg.name)
    elif pretrained:
        src_classes = getattr(model, "pretrained_cfg", {}).get("num_classes")
        head_reset = src_classes is not None and int(src_classes) != num_classes

    model.eval()
    input_size, mean, std, norm_source = _resolve_input(cfg, model)
    if check_forward:
        _dry_run(model, cfg, input_size, num_classes)
    sha = state_dict_sha256(model)
    model.to(device)
    return LoadedTeacher(
        model=model,
        name=cfg.name,
        label=cfg.display_name,
        input_size=input_size,
        mean=mean,
        std=std,
        num_classes=num_classes,
        weights_sha256=sha,
        pretrained=use_checkpoint or pretrained,
        head_reset=head_reset,
        checkpoint=cfg.checkpoint,
        interpolation=cfg.interpolation,
        norm_source=norm_source,
    )


def _dry_run(model: nn.Module, cfg: TeacherConfig, input_size: int, num_classes: int) -> None:
    in_chans = int(cfg.model_kwargs.get("in_chans", 3))
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, in_chans, input_size, input_size))
    except Exception as exc:  # noqa: BLE001 - any failure here is a size/kwargs mismatch for the user
        fix = (
            f"set teacher.model_kwargs.img_size: {input_size} as well"
            if cfg.input_size is not None
            else "check teacher.model_kwargs"
        )
        raise TeacherError(
            f"teacher.input_size: {cfg.name!r} cannot run at {input_size} px ({_first_line(exc)}); {fix}"
        ) from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise TeacherError(
            f"teacher.name: {cfg.name!r} returns {shape} instead of logits (1, {num_classes}); "
            "use a classification model"
        )


def teacher_needs_fit(cfg: TeacherConfig, loaded: LoadedTeacher, num_classes: int) -> bool:
    """Whether the teacher must be fitted to the data set before it can teach.

    ``teacher.fit.enabled`` ``"true"``/``"false"`` decides outright; ``"auto"`` fits when the
    teacher has no real weights, its head was reset for a class mismatch, or its class count
    differs from the data set's.
    """
    enabled = cfg.fit.enabled
    if enabled == "true":
        return True
    if enabled == "false":
        return False
    return (not loaded.pretrained) or loaded.head_reset or loaded.num_classes != num_classes


def weak_teacher_warning(
    loaded: LoadedTeacher, val_accuracy: float, expected_accuracy: float | None = None
) -> str | None:
    """Log (``logging.warning``, one line) and return a warning when the teacher's validation
    accuracy (0..1) is near chance (<= 1.5 / num_classes) or more than 10 points below
    ``expected_accuracy``; None when it looks sound.

    A teacher that scores far below what it is known to reach is most often fed differently
    from how it was trained: another normalisation or another input size.
    """
    chance = 1.0 / max(loaded.num_classes, 1)
    if val_accuracy <= CHANCE_FACTOR * chance:
        what = f"is near chance ({100 * chance:.3g}% for {loaded.num_classes} classes)"
    elif expected_accuracy is not None and val_accuracy < expected_accuracy - EXPECTED_SHORTFALL:
        what = f"is far below teacher.expected_accuracy {100 * expected_accuracy:.4g}%"
    else:
        return None
    mean = ", ".join(f"{v:.4g}" for v in loaded.mean)
    std = ", ".join(f"{v:.4g}" for v in loaded.std)
    msg = (
        f"teacher {loaded.label}: val accuracy {100 * val_accuracy:.4g}% {what}; the usual causes are the "
        f"normalisation (mean [{mean}], std [{std}] from {loaded.norm_source}: set teacher.mean/teacher.std "
        f"to the ones it was trained with) and the input size ({loaded.input_size} px, "
        f"{loaded.interpolation}: set teacher.input_size/teacher.interpolation)"
    )
    log.warning(msg)
    return msg


def val_leak_check(
    label: str, val_accuracy: float, test_accuracy: float, val_images: int, test_images: int
) -> dict[str, Any]:
    """Whether the teacher has probably trained on the validation images (the study's ``val``).

    kdsearch carves val out of the data set's training split, and almost every pretrained
    teacher was trained on the whole of it, so its val accuracy is inflated while its test
    accuracy is not. The rule: val minus test accuracy is more than :data:`LEAK_MIN_GAP`
    (3 points) **and** more than :data:`LEAK_Z` (3) standard errors of that difference under
    binomial noise, ``sqrt(pv (1 - pv) / n_val + pt (1 - pt) / n_test)`` (two independent splits
    of ``n_val`` and ``n_test`` images), so a small val split's noise never raises it.

    Returns a JSON-ready record (stored with the study's ``teachers``): ``gap_points``,
    ``noise_points`` (3 standard errors, points), ``suspected`` and ``message`` (one plain
    sentence, None when not suspected); the message is also logged as a warning.
    """
    pv, pt = float(val_accuracy), float(test_accuracy)
    se = math.sqrt(pv * (1.0 - pv) / max(int(val_images), 1) + pt * (1.0 - pt) / max(int(test_images), 1))
    gap = pv - pt
    suspected = gap > LEAK_MIN_GAP and gap > LEAK_Z * se
    message = None
    if suspected:
        message = (
            f"teacher {label}: val accuracy {100 * pv:.2f}% is {100 * gap:.2f} points above its test accuracy "
            f"{100 * pt:.2f}% (more than {100 * LEAK_MIN_GAP:.0f} points and more than {LEAK_Z:.0f} standard "
            f"errors of the two splits, {100 * LEAK_Z * se:.2f} points): it has probably trained on the validation "
            "images (kdsearch carves val out of the training split, which pretrained teachers were usually trained "
            "on). Its val accuracy is inflated, so every 'vs teacher' figure compares test accuracies (the student's "
            "against the teacher's, reporting only); students are still selected on val"
        )
        log.warning(message)
    return {
        "rule": f"val - test > {LEAK_MIN_GAP:g} and > {LEAK_Z:g} binomial standard errors",
        "gap_points": round(100 * gap, 4),
        "noise_points": round(100 * LEAK_Z * se, 4),
        "val_images": int(val_images),
        "test_images": int(test_images),
        "suspected": bool(suspected),
        "message": message,
    }
