"""Fitting the teacher to the data set (from scratch, or a new head), time-boxed and cached.

A teacher without weights for the data set's classes cannot teach, so it is trained once on the
train split at its own input size with cross-entropy: AdamW (``cfg.lr``, ``cfg.weight_decay``,
no decay on norms/biases), the same time-based schedule as the KD loop
(:func:`~kdsearch.distill.schedule.lr_factor`, 5 % warm-up then cosine to 0 over ``cfg.time_s``
of training), pad-and-crop (``image_size // 8`` px, 4 px at 32 px) plus flip augmentation via
:func:`~kdsearch.data.augment.apply_views`, bf16 autocast on CUDA (fp16 with a ``GradScaler`` on a
GPU without bf16: :mod:`kdsearch.distill.precision`; the info records ``train_dtype``).

The fitted weights are stored in ``<cache_dir>/<key[:16]>.safetensors`` (key: sha256 over teacher
name, architecture, original weights hash, input size/normalisation, data set fingerprint and the
fit config), written atomically under a file lock, so a second run or a second worker loads them
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

__all__ = ["fit_teacher", "fit_key"]

log = logging.getLogger(__name__)

FIT_FORMAT_VERSION = 1
_WARMUP_FRACTION = 0.05


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
        "fit": dataclasses.asdict(cfg),
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
    ``progress(done_s, total_s)`` reports training seconds. ``info``: ``fit_time_s`` (training
    time of the fit, also when loaded), ``from_cache``, ``train_loss`` (mean of the last steps),
    ``steps``, ``epochs``, ``path``.
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

    on_cuda = device.type == "cuda"
    model = loaded.model
    model.train()
    spec = ViewSpec(image_size=bundle.image_size, padding=max(1, bundle.image_size // 8), flip=True)
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
    train_dtype = train_dtype_for(device, amp=True)
    scaler = torch.amp.GradScaler("cuda", enabled=train_dtype == "fp16")
    if on_cuda:
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    elapsed = 0.0
    while elapsed < box:
        views_all = sample_views(n, 1, spec, gen)[0].to(device)
        for idx, images, labels in source.epoch(batch_size, gen, shuffle=True, drop_last=True):
            for g in opt.param_groups:
                g["lr"] = cfg.lr * lr_factor(elapsed / box, _WARMUP_FRACTION, 0.0)
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
            elapsed = time.perf_counter() - t0
            if progress is not None:
                progress(min(elapsed, box), box)
            if elapsed >= box:
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
    return {"fit_time_s": fit_time_s, "train_loss": train_loss, "steps": steps, "epochs": images_seen / n,
            "train_dtype": train_dtype}
