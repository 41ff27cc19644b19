"""Fitting the teacher to the data set (from scratch, or a new head), to a target or a time box; cached.

A teacher without weights for the data set's classes cannot teach, so it is trained once on the
train split at its own input size with cross-entropy: AdamW (``cfg.lr``, ``cfg.weight_decay``,
no decay on norms/biases), the same schedule as the KD loop
(:func:`~kdsearch.distill.schedule.lr_factor`, 5 % warm-up then cosine to 0), pad-and-crop (``image_size // 8``
px, 4 px at 32 px) plus horizontal-flip (``cfg.flip``) augmentation via
:func:`~kdsearch.data.augment.apply_views`, bf16 autocast on CUDA (fp16 with a ``GradScaler`` on a
GPU without bf16: :mod:`kdsearch.distill.precision`; the info records ``train_dtype``).

When it stops (``info["stop_reason"]``):

* ``"time"``: neither ``cfg.target_accuracy`` nor ``cfg.max_epochs`` is set; the fit trains for
  ``cfg.time_s`` (the schedule's length) -- a time box, so the teacher's quality depends on the
  machine's speed;
* ``"target_accuracy"``: the val accuracy, measured every ``cfg.eval_every_epochs`` epochs (eval
  mode, fp32, :func:`kdsearch.measure.accuracy.evaluate_accuracy`, the same figure the search
  reports for the teacher), reached ``cfg.target_accuracy``;
* ``"max_epochs"``: ``cfg.max_epochs`` passes over the train split are done;
* ``"time_cap"``: ``cfg.time_s`` of wall clock (validations included) ran out first, with a
  warning when a target accuracy was not reached.

The schedule's progress is the further of ``elapsed / cfg.time_s`` and ``epochs /
cfg.max_epochs``, so the LR reaches 0 at whichever limit comes first.

The fitted weights are stored in ``<cache_dir>/<key[:16]>.safetensors`` (key: sha256 over teacher
name, architecture, original weights hash, input size/normalisation, data set fingerprint and the
fit config; a target key at its default is left out, so fits made before it existed keep their key), written atomically under a file lock, so a second run or a second worker loads them
instead of fitting again. A random initialisation is not part of the key (any random start is as
good as another), nor is a re-initialised classifier head: see :func:`_starting_point`. A file whose weights hash does not match its metadata is refitted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from filelock import FileLock
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors_bytes

from kdsearch.checkpoint import atomic_write_bytes
from kdsearch.config import TeacherFitConfig
from kdsearch.data import ViewSpec, apply_views, sample_views
from kdsearch.distill.precision import autocast, train_dtype_for
from kdsearch.distill.schedule import lr_factor
from kdsearch.errors import TeacherError
from kdsearch.models import param_groups

if TYPE_CHECKING:
    from kdsearch.data import DataBundle
    from kdsearch.models import LoadedTeacher

__all__ = ["STOP_REASONS", "fit_teacher", "fit_key", "fit_key_config"]

log = logging.getLogger(__name__)

FIT_FORMAT_VERSION = 1
_WARMUP_FRACTION = 0.05
# Keys added after the first fits were stored: left out of the key while they change nothing.
_TARGET_KEY_DEFAULTS: dict[str, Any] = {"target_accuracy": None, "max_epochs": None, "eval_every_epochs": 1.0,
                                         "flip": True}

STOP_REASONS: tuple[str, ...] = ("time", "target_accuracy", "max_epochs", "time_cap")
"""Why a fit ended (``info["stop_reason"]``); see the module docstring."""


def _starting_point(loaded: LoadedTeacher) -> str:
    """What the fit starts from, minus randomness: a random init is just "random-init" and a
    freshly re-initialised classifier is left out, so every process that creates the same teacher
    (whatever its torch seed) finds the same stored fit and, through it, the same logit cache."""
    from kdsearch.models import state_dict_sha256  # noqa: PLC0415

    if not loaded.pretrained:
        return "random-init"
    if not getattr(loaded, "head_reset", False):
        return loaded.weights_sha256
    get_classifier = getattr(loaded.model, "get_classifier", None)
    head = get_classifier() if callable(get_classifier) else None
    head_ids = {id(p) for p in head.parameters()} if isinstance(head, torch.nn.Module) else set()
    params = dict(loaded.model.named_parameters())
    state = {k: v for k, v in loaded.model.state_dict().items() if id(params.get(k)) not in head_ids}
    return "backbone:" + state_dict_sha256(state)


def fit_key_config(cfg: TeacherFitConfig) -> dict[str, Any]:
    """The fit settings that enter the key: every field, less the target keys at their defaults
    (``eval_every_epochs`` counts only with a ``target_accuracy``)."""
    out = dataclasses.asdict(cfg)
    for name, default in _TARGET_KEY_DEFAULTS.items():
        if out[name] == default or (name == "eval_every_epochs" and cfg.target_accuracy is None):
            del out[name]
    return out


def fit_key(loaded: LoadedTeacher, bundle: DataBundle, cfg: TeacherFitConfig) -> str:
    """sha256 hex over what determines the fitted weights. ``repr(model)`` stands in for the
    model kwargs (LoadedTeacher does not carry them; the module tree shows every layer setting)."""
    ident = {
        "format_version": FIT_FORMAT_VERSION,
        "teacher": loaded.name,
        "architecture_sha256": hashlib.sha256(repr(loaded.model).encode("utf-8")).hexdigest(),
        "starting_point": _starting_point(loaded),
        "input_size": int(loaded.input_size),
        "mean": [float(m) for m in loaded.mean],
        "std": [float(s) for s in loaded.std],
        "num_classes": int(loaded.num_classes),
        "dataset_fingerprint": bundle.fingerprint,
        "fit": fit_key_config(cfg),
    }
    if loaded.interpolation != "bilinear":  # bilinear was the only mode before: its keys stay
        ident["interpolation"] = loaded.interpolation
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def fit_teacher(
    loaded: LoadedTeacher,
    bundle: DataBundle,
    cfg: TeacherFitConfig,
    cache_dir: Path,
    device: torch.device | str,
    progress: Callable[[float, float], None] | None = None,
) -> tuple[LoadedTeacher, dict[str, Any]]:
    """Fit ``loaded`` to ``bundle`` (or load the stored fit); return the updated teacher and info.

    ``loaded.model`` is trained (or loaded) in place; use the returned :class:`LoadedTeacher`,
    whose ``weights_sha256`` is the fitted weights' hash (so teacher caches key on the fit).
    ``progress(done, total)`` reports the fit's progress as ``done / total`` (in seconds of
    ``cfg.time_s``: the time, or the epochs done when they are further). ``info``: ``fit_time_s``
    (wall time of the fit, also when loaded), ``from_cache``, ``train_loss`` (mean of the last
    steps), ``steps``, ``epochs``, ``stop_reason`` (one of :data:`STOP_REASONS`),
    ``val_history`` (``[[epochs, val_accuracy], ...]``, when a target accuracy is set),
    ``target_reached`` (bool or None), ``path``.
    """
    from kdsearch.models.teacher import state_dict_sha256  # noqa: PLC0415

    device = torch.device(device)
    key = fit_key(loaded, bundle, cfg)
    path = Path(cache_dir) / f"{key[:16]}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    model = loaded.model.to(device)
    with FileLock(str(path) + ".lock"):
        meta = _try_load(path, key, model, state_dict_sha256)
        if meta is not None:
            info = {**json.loads(meta["info"]), "from_cache": True, "path": str(path)}
        else:
            info = _fit(loaded, bundle, cfg, device, progress)
            state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
            sha = state_dict_sha256(state)
            header = {
                "format": "kdsearch-fitted-teacher",
                "key": key,
                "weights_sha256": sha,
                "info": json.dumps(info),
            }
            atomic_write_bytes(path, save_safetensors_bytes(state, metadata=header))
            info = {**info, "from_cache": False, "path": str(path)}
    model.eval()
    fitted = dataclasses.replace(
        loaded, model=model, weights_sha256=state_dict_sha256(model), head_reset=False
    )
    return fitted, info


def _try_load(
    path: Path, key: str, model: torch.nn.Module, state_sha: Callable[[Any], str]
) -> dict[str, str] | None:
    """Load a stored fit into ``model`` and return its metadata, or None (absent, stale, corrupt)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        log.warning("fitted teacher %s: unreadable (%s); fitting again", path, exc)
        return None
    if meta.get("key") != key:
        log.warning("fitted teacher %s: key mismatch; fitting again", path)
        return None
    if state_sha(state) != meta.get("weights_sha256"):
        log.warning(
            "fitted teacher %s: weights hash does not match its metadata (corrupt); fitting again", path
        )
        return None
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        log.warning(
            "fitted teacher %s: does not fit the model (%s); fitting again", path, str(exc).splitlines()[0]
        )
        return None
    return meta


def _fit(
    loaded: LoadedTeacher,
    bundle: DataBundle,
    cfg: TeacherFitConfig,
    device: torch.device,
    progress: Callable[[float, float], None] | None,
) -> dict[str, Any]:
    from kdsearch.data import make_batch_source  # noqa: PLC0415
    from kdsearch.measure.accuracy import evaluate_accuracy  # noqa: PLC0415 - measure/ never imports distill/

    on_cuda = device.type == "cuda"
    model = loaded.model
    model.train()
    spec = ViewSpec(image_size=bundle.image_size, padding=max(1, bundle.image_size // 8), flip=cfg.flip)
    split = bundle.train
    n = len(split)
    resident = not bundle.streaming and split.images.device.type == device.type
    source = make_batch_source(split, device, resident)
    batch_size = min(cfg.batch_size, n)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    gen = torch.Generator(device="cpu").manual_seed(int(loaded.weights_sha256[:12], 16))
    steps = images_seen = 0
    losses: list[torch.Tensor] = []
    box = float(cfg.time_s)
    epoch_images = None if cfg.max_epochs is None else cfg.max_epochs * n  # images for max_epochs
    eval_images = None if cfg.target_accuracy is None else max(cfg.eval_every_epochs * n, 1.0)
    next_eval = eval_images
    history: list[list[float]] = []
    stop_reason = "time_cap" if cfg.time_is_cap else "time"
    train_dtype = train_dtype_for(device, amp=True)
    scaler = torch.amp.GradScaler("cuda", enabled=train_dtype == "fp16")

    def done_fraction(elapsed_s: float) -> float:
        """The schedule's progress: the further of the time and the epochs."""
        frac = elapsed_s / box
        if epoch_images is not None:
            frac = max(frac, images_seen / epoch_images)
        return min(frac, 1.0)

    if on_cuda:
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    elapsed = 0.0
    running = True
    while running:
        views_all = sample_views(n, 1, spec, gen)[0].to(device)
        for idx, images, labels in source.epoch(batch_size, gen, shuffle=True, drop_last=True):
            for g in opt.param_groups:
                g["lr"] = cfg.lr * lr_factor(done_fraction(elapsed), _WARMUP_FRACTION, 0.0)
            x = apply_views(images, views_all[idx], spec, loaded.input_size, loaded.mean, loaded.std,
                            interpolation=loaded.interpolation)
            with autocast(train_dtype, device):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), labels)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()  # the identity unless fp16
            scaler.step(opt)
            scaler.update()
            steps += 1
            images_seen += int(labels.shape[0])
            losses.append(loss.detach())
            if len(losses) >= 50:
                losses = losses[-50:]
            if next_eval is not None and images_seen >= next_eval:
                acc = evaluate_accuracy(model, bundle.val, loaded.input_size, loaded.mean, loaded.std, device,
                                        batch_size, interpolation=loaded.interpolation)
                history.append([round(images_seen / n, 4), acc])
                next_eval += eval_images  # type: ignore[operator]
                if acc >= cfg.target_accuracy:  # type: ignore[operator]
                    stop_reason = "target_accuracy"
            elapsed = time.perf_counter() - t0
            if stop_reason != "target_accuracy" and epoch_images is not None and images_seen >= epoch_images:
                stop_reason = "max_epochs"
            if progress is not None:
                progress(1.0 * box if stop_reason in ("target_accuracy", "max_epochs") else done_fraction(elapsed) * box,
                         box)
            if stop_reason in ("target_accuracy", "max_epochs") or elapsed >= box:
                running = False
                break
    if on_cuda:
        torch.cuda.synchronize(device)
    fit_time_s = time.perf_counter() - t0
    train_loss = float(torch.stack(losses).mean().item()) if losses else float("nan")
    if not math.isfinite(train_loss):
        raise TeacherError(
            f"teacher.fit.lr: fitting {loaded.label!r} diverged (loss {train_loss}) at lr {cfg.lr}; lower teacher.fit.lr"
        )
    model.eval()
    info: dict[str, Any] = {"fit_time_s": fit_time_s, "train_loss": train_loss, "steps": steps,
                            "epochs": images_seen / n, "train_dtype": train_dtype, "stop_reason": stop_reason}
    if cfg.target_accuracy is not None:
        info["val_history"] = history
        info["target_reached"] = stop_reason == "target_accuracy"
        if stop_reason != "target_accuracy":
            last = f"{100 * history[-1][1]:.1f}%" if history else "not measured"
            log.warning(
                "teacher %s: the fit stopped (%s) after %.1f epochs with val accuracy %s, below "
                "teacher.fit.target_accuracy %g%%; raise teacher.fit.time or teacher.fit.max_epochs, or lower the target",
                loaded.label, stop_reason, images_seen / n, last, 100 * cfg.target_accuracy,
            )
    return info
