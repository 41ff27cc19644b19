"""Teacher-logit cache: the teacher's logits on K stored augmented views of the train split.

The teacher is the same for every trial, so its forward passes are paid once per
(teacher weights, data set, view spec, K): :func:`build_or_load_cache` runs the teacher on
``K`` views of every train image (views are int16 ``(dy, dx, flip)`` triples, see
:mod:`kdsearch.data.augment`), stores the views with the logits, and every later trial and every
worker process loads the file instead. A trial then draws one stored view per image per epoch and
gets the exact pixels the teacher saw, so cached KD costs a gather plus the KL term.

On disk (``<cache_dir>/<key[:16]>/``):

* ``logits.safetensors``: ``views`` int16 ``[K, N, 3]`` and either ``logits`` fp16 ``[K, N, C]``
  (dense) or ``topk_values`` fp16 ``[K, N, k]``, ``topk_indices`` int16/int32 ``[K, N, k]`` and
  ``rest_logit`` fp32 ``[K, N]`` (top-k format, see :mod:`kdsearch.distill.loss`).
* ``manifest.json``: the full key, what went into it, shapes and dtypes, the data file's sha256,
  the build id, host, pid and creation time. Written last, so its presence marks a finished build.
* ``used_by.json``: the studies that built or loaded it (``{"studies": {name: {"first_used",
  "last_used", "built"}}}``), written under the lock; ``kdsearch cache`` lists it.

Where: ``<run_dir>/_cache/logits`` by default (:func:`kdsearch.storage.run_paths`), one folder
shared by every study of the run folder, so a second study with the same key (same teacher and
weights, data fingerprint, views, normalisation, precision, top-k) loads the first one's cache
and says so (:meth:`TeacherCache.describe`: ``built`` false, ``built_by``); ``teacher.cache.dir``
(``--cache-dir``) moves it, e.g. to one folder for a whole machine.

Size and place: :mod:`kdsearch.distill.cache_size` estimates the cache before anything runs (the
preflight refuses one whose build cannot fit in host memory) and resolves ``topk: auto`` (top 20
above 100 classes). After the build or load, the views go to the device; the logits go there too
when they fit (:func:`~kdsearch.distill.cache_size.choose_placement`), else they stay on the
host, pinned, and each batch's rows are gathered on the host and copied to the device.

Concurrency: the build and the load run under ``filelock.FileLock(<cache_dir>/<key[:16]>.lock)``;
files are written to temp files and renamed into place. A second process waits on the lock, then
loads what the first one built. On load the manifest key and the data file's sha256 are checked;
a stale or corrupt cache is rebuilt (and the reason logged), never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from filelock import FileLock
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors_bytes

from kdsearch.checkpoint import atomic_write_bytes, atomic_write_text, sha256_file
from kdsearch.config import TeacherCacheConfig
from kdsearch.data import ViewSpec, apply_views, make_batch_source, sample_views
from kdsearch.distill.cache_size import choose_placement, resolve_topk
from kdsearch.distill.loss import TopKTargets
from kdsearch.distill.precision import autocast_dtype, train_dtype_for

if TYPE_CHECKING:
    from kdsearch.data import DataBundle
    from kdsearch.models import LoadedTeacher

__all__ = ["TeacherCache", "build_or_load_cache", "build_dtype", "cache_key", "CACHE_FORMAT_VERSION", "USAGE_FILE"]

log = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
DATA_FILE = "logits.safetensors"
MANIFEST_FILE = "manifest.json"
USAGE_FILE = "used_by.json"  # kdsearch.storage.list_caches reads it (same name there)
ProgressCallback = Callable[[int, int], None]


class TeacherCache:
    """Teacher logits for ``K`` stored views of each of ``N`` train images (dense or top-k).

    ``views`` is int16 ``[K, N, 3]``. Look-ups take ``view_ids`` and ``indices`` (int64 ``[B]``,
    on any device) and return fp32 tensors on the device of ``indices``.
    """

    def __init__(
        self,
        *,
        key: str,
        view_spec: ViewSpec,
        tensors: dict[str, torch.Tensor],
        num_classes: int,
        manifest: dict[str, Any],
        path: Path,
        built: bool,
        rebuild_reason: str | None = None,
        build_forward_count: int = 0,
    ) -> None:
        self.key = key
        self.view_spec = view_spec
        self.views: torch.Tensor = tensors["views"]
        self.logits: torch.Tensor | None = tensors.get("logits")
        self.topk_values: torch.Tensor | None = tensors.get("topk_values")
        self.topk_indices: torch.Tensor | None = tensors.get("topk_indices")
        self.rest_logit: torch.Tensor | None = tensors.get("rest_logit")
        self.num_classes = int(num_classes)
        self.manifest = manifest
        self.path = path  # the cache folder
        self.built = built  # True if this call built the cache, False if it loaded it
        self.rebuild_reason = rebuild_reason  # why an existing cache was not used (None: none existed)
        self.build_forward_count = build_forward_count  # teacher forward passes spent building (0 on load)
        self.placement = "host"  # where the logits live: "device" or "host" (see place())
        self.placement_reason = "not placed yet"
        self.pinned = False  # host logits in pinned memory (gathered per batch, copied asynchronously)
        self.elapsed_s: float | None = None  # wall time of build_or_load_cache (build, or load and check)
        self.used_by: dict[str, Any] = {}  # the usage record (used_by.json) after this call

    # -- description ---------------------------------------------------------------------------
    @property
    def num_views(self) -> int:
        return int(self.views.shape[0])

    @property
    def num_images(self) -> int:
        return int(self.views.shape[1])

    @property
    def is_topk(self) -> bool:
        return self.logits is None

    @property
    def build_id(self) -> str:
        return str(self.manifest["build_id"])

    @property
    def teacher_forward_count(self) -> int:
        """Teacher forward passes spent serving look-ups: always 0, the cache holds no teacher."""
        return 0

    @property
    def device(self) -> torch.device:
        """Where the views live (the training device once placed)."""
        return self.views.device

    @property
    def logits_device(self) -> torch.device:
        """Where the logits live: the training device, or the host when they did not fit there."""
        t = self.logits if self.logits is not None else self.topk_values
        assert t is not None
        return t.device

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors().values())

    def logits_nbytes(self) -> int:
        """Bytes of the logit tensors (everything but the views)."""
        return sum(t.numel() * t.element_size() for n, t in self._tensors().items() if n != "views")

    def _tensors(self) -> dict[str, torch.Tensor]:
        names = ("views", "logits", "topk_values", "topk_indices", "rest_logit")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def to(self, device: torch.device | str) -> TeacherCache:
        """Move every stored tensor to ``device`` (in place; returns self)."""
        for name, t in self._tensors().items():
            setattr(self, name, t.to(device))
        self.pinned = False
        self.placement, self.placement_reason = "device", f"moved to {device}"
        return self

    def place(self, device: torch.device | str, free_bytes: int | None = None) -> TeacherCache:
        """Put the cache where training on ``device`` can use it (in place; returns self).

        The views always go to ``device``. The logits go too when
        :func:`~kdsearch.distill.cache_size.choose_placement` says they fit (``free_bytes``: the
        device's free memory, read now when not given); otherwise they stay on the host, pinned
        when ``device`` is CUDA, and look-ups gather each batch there and copy it over.
        """
        dev = torch.device(device)
        where, why = choose_placement(self.logits_nbytes(), dev, free_bytes)
        if where == "device":
            self.to(dev)
        else:
            self.views = self.views.to(dev)
            for name, t in self._tensors().items():
                if name == "views":
                    continue
                t = t.to("cpu")
                if dev.type == "cuda" and not t.is_pinned():
                    t = t.pin_memory()
                setattr(self, name, t)
            self.pinned = dev.type == "cuda"
        self.placement, self.placement_reason = where, why
        log.info("teacher cache %s: logits on the %s (%s)", self.path, where, why)
        return self

    def describe(self) -> dict[str, Any]:
        """JSON-ready: key, folder, size, whether this call built it, how long the call took, the
        build's own time, and the studies that used it (``built_by``: the one that built it)."""
        studies = self.used_by.get("studies", {}) if isinstance(self.used_by, dict) else {}
        built_by = next((n for n, u in studies.items() if isinstance(u, dict) and u.get("built")), None)
        return {
            "key": self.key,
            "folder": str(self.path),
            "nbytes": self.nbytes(),
            "built": self.built,
            "rebuild_reason": self.rebuild_reason,
            "elapsed_s": None if self.elapsed_s is None else round(self.elapsed_s, 3),
            "build_time_s": self.manifest.get("build_time_s"),
            "built_by": built_by,
            "used_by": sorted(studies),
        }

    # -- look-ups ------------------------------------------------------------------------------
    def _rows(self, t: torch.Tensor, vi: torch.Tensor, ii: torch.Tensor, out: torch.device) -> torch.Tensor:
        """``t[vi, ii]`` on ``out``, in ``t``'s dtype. Host-held logits are gathered on the host
        into pinned memory and copied asynchronously (the caching host allocator keeps the
        buffer alive until the copy is done)."""
        if t.device == out:
            return t[vi, ii]
        flat_idx = vi.to(t.device) * t.shape[1] + ii.to(t.device)
        flat = t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])
        if self.pinned and out.type == "cuda":
            buf = torch.empty((flat_idx.shape[0], *t.shape[2:]), dtype=t.dtype, pin_memory=True)
            torch.index_select(flat, 0, flat_idx, out=buf)
            return buf.to(out, non_blocking=True)
        return flat.index_select(0, flat_idx).to(out)

    def teacher_targets(self, view_ids: torch.Tensor, indices: torch.Tensor) -> torch.Tensor | TopKTargets:
        """What the loss needs: dense fp32 logits ``[B, C]``, or :class:`TopKTargets` (top-k cache)."""
        out_dev = indices.device
        if self.logits is not None:
            return self._rows(self.logits, view_ids, indices, out_dev).to(torch.float32)
        assert self.topk_values is not None and self.topk_indices is not None and self.rest_logit is not None
        return TopKTargets(
            values=self._rows(self.topk_values, view_ids, indices, out_dev).to(torch.float32),
            indices=self._rows(self.topk_indices, view_ids, indices, out_dev).to(torch.int64),
            rest_logit=self._rows(self.rest_logit, view_ids, indices, out_dev).to(torch.float32),
        )

    def teacher_logits(self, view_ids: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Dense fp32 logits ``[B, C]``. For a top-k cache this is a reconstruction: the non-top-k
        classes get the equal logit ``rest_logit - log(C - k)`` (exact softmax mass at T = 1)."""
        t = self.teacher_targets(view_ids, indices)
        if isinstance(t, torch.Tensor):
            return t
        rest_count = self.num_classes - t.values.shape[1]
        fill = (t.rest_logit - math.log(rest_count)) if rest_count > 0 else t.rest_logit
        dense = fill[:, None].expand(-1, self.num_classes).clone()
        return dense.scatter_(1, t.indices, t.values)


# ----------------------------------------------------------------------------------------------
# Key


def cache_key(
    teacher: LoadedTeacher,
    bundle: DataBundle,
    cfg: TeacherCacheConfig,
    view_spec: ViewSpec,
    split: str = "train",
    dtype: str | None = None,
) -> str:
    """sha256 hex over everything that changes the stored logits (not the teacher's display label).

    ``dtype`` is the precision the teacher runs in while building (``"bf16"``, ``"fp16"``,
    ``"fp32"``: :mod:`kdsearch.distill.precision`); ``None`` keeps the key of a cache built the
    default way (bf16 autocast on CUDA, fp32 on the CPU), as before the precision was chosen."""
    ident = {
        "format_version": CACHE_FORMAT_VERSION,
        "teacher": teacher.name,
        "weights_sha256": teacher.weights_sha256,
        "input_size": int(teacher.input_size),
        "mean": [float(m) for m in teacher.mean],
        "std": [float(s) for s in teacher.std],
        "dataset_fingerprint": bundle.fingerprint,
        "split": split,
        "view_spec": view_spec.to_dict(),
        "views": int(cfg.views),
        # "auto" enters as the k it resolves to (None: all logits), so the default keeps the keys
        # of caches built before "auto" existed; an explicit k enters as written, as it always did.
        "topk": cfg.topk if cfg.topk != "auto" else cfg.resolved_topk(bundle.num_classes),
    }
    if teacher.interpolation != "bilinear":  # bilinear was the only mode before: its keys stay
        ident["interpolation"] = teacher.interpolation
    if dtype is not None:
        ident["dtype"] = dtype
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------------------------
# Build or load


def build_dtype(device: torch.device, dtype: str | None) -> str | None:
    """The precision a cache is built in on ``device``: ``dtype`` when given, else the device's own
    choice (:func:`~kdsearch.distill.precision.train_dtype_for`, the student's and the teacher
    fit's: fp16 below compute capability 8.0, never an emulated bf16). A bf16 or CPU default stays
    ``None``, the key such caches always had."""
    if dtype is not None or torch.device(device).type != "cuda":
        return dtype
    resolved = train_dtype_for(device, amp=True)
    return None if resolved == "bf16" else resolved


def build_or_load_cache(
    teacher: LoadedTeacher,
    bundle: DataBundle,
    cfg: TeacherCacheConfig,
    cache_dir: Path,
    device: torch.device | str,
    progress: ProgressCallback | None = None,
    dtype: str | None = None,
    used_by: str | None = None,
) -> TeacherCache:
    """Load the cache for (teacher, train split, view spec, K, top-k, dtype) or build it; return it
    placed for training on ``device`` (:meth:`TeacherCache.place`: the logits stay on the host,
    pinned, when they do not fit on the device).

    ``progress(done, total)`` is called while building, in teacher-view evaluations (K * N).
    ``dtype`` (``"bf16"`` | ``"fp16"`` | ``"fp32"``) is the teacher's precision while building, and
    part of the key; ``None``: the device's own choice (:func:`build_dtype`).
    ``used_by`` (a study name) is added to the cache's ``used_by.json``; a load says which study
    built the cache it reuses (logged, and :meth:`TeacherCache.describe`).
    """
    t0 = time.perf_counter()
    device = torch.device(device)
    if teacher.num_classes != bundle.num_classes:
        raise ValueError(
            f"teacher {teacher.label!r} has {teacher.num_classes} classes but the data set has "
            f"{bundle.num_classes}; fit the teacher to the data set first"
        )
    dtype = build_dtype(device, dtype)
    view_spec = ViewSpec(image_size=bundle.image_size, padding=cfg.crop_padding, flip=cfg.flip)
    key = cache_key(teacher, bundle, cfg, view_spec, dtype=dtype)
    folder = Path(cache_dir) / key[:16]
    folder.parent.mkdir(parents=True, exist_ok=True)
    expected = {"views": cfg.views, "num_images": len(bundle.train), "num_classes": bundle.num_classes}
    with FileLock(str(folder) + ".lock"):
        cache, reason = _try_load(folder, key, view_spec, expected)
        if cache is None:
            if reason != "absent":
                log.warning("teacher cache %s: rebuilding (%s)", folder, reason)
            else:
                log.info("teacher cache %s: building", folder)
            cache = _build(teacher, bundle, cfg, view_spec, key, folder, device, progress, dtype)
            cache.rebuild_reason = None if reason == "absent" else reason
        cache.used_by = _record_use(folder, used_by, cache.built)
    cache.elapsed_s = time.perf_counter() - t0
    if not cache.built:
        by = cache.describe()["built_by"]
        log.info("teacher cache %s: reused (key %s..., built%s in %s s), loaded in %.1f s", folder, key[:16],
                 f" by study {by}" if by else "", cache.manifest.get("build_time_s"), cache.elapsed_s)
    return cache.place(device)


def _record_use(folder: Path, study: str | None, built: bool) -> dict[str, Any]:
    """Add ``study`` to ``<folder>/used_by.json`` (under the cache's lock) and return the record.
    A missing or unreadable record starts afresh: it describes the cache, it does not guard it."""
    path = folder / USAGE_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(record, dict) or not isinstance(record.get("studies"), dict):
            record = {"studies": {}}
    except (OSError, ValueError):
        record = {"studies": {}}
    if built:  # a (re)build makes a new cache: who used the old one no longer matters
        record = {"studies": {}}
    if study is not None:
        now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        entry = record["studies"].get(study) or {"first_used": now, "built": False}
        entry["last_used"] = now
        entry["built"] = bool(entry.get("built")) or built
        record["studies"][study] = entry
    if study is not None or built:
        atomic_write_text(path, json.dumps(record, indent=2, sort_keys=True))
    return record


def _try_load(
    folder: Path, key: str, view_spec: ViewSpec, expected: dict[str, int]
) -> tuple[TeacherCache | None, str]:
    """(cache, "") if a valid cache is there, else (None, why not)."""
    manifest_path = folder / MANIFEST_FILE
    data_path = folder / DATA_FILE
    if not manifest_path.is_file():
        return None, "absent"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return None, f"manifest unreadable ({exc})"
    if manifest.get("key") != key:
        return None, f"manifest key {str(manifest.get('key'))[:16]}... does not match {key[:16]}..."
    if manifest.get("format_version") != CACHE_FORMAT_VERSION:
        return None, f"format version {manifest.get('format_version')} != {CACHE_FORMAT_VERSION}"
    if not data_path.is_file():
        return None, f"data file {DATA_FILE} missing"
    digest = sha256_file(data_path)  # streamed: a multi-GB top-k cache is not read twice into memory
    if digest != manifest.get("data_sha256"):
        return (
            None,
            f"data file sha256 {digest[:12]}... != manifest {str(manifest.get('data_sha256'))[:12]}...",
        )
    try:
        tensors = load_file(str(data_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        return None, f"data file unreadable ({exc})"
    for name, meta in manifest.get("tensors", {}).items():
        t = tensors.get(name)
        if (
            t is None
            or list(t.shape) != meta["shape"]
            or str(t.dtype).removeprefix("torch.") != meta["dtype"]
        ):
            return None, f"tensor {name!r} does not match the manifest"
    k, n = int(tensors["views"].shape[0]), int(tensors["views"].shape[1])
    if (k, n, manifest.get("num_classes")) != (
        expected["views"],
        expected["num_images"],
        expected["num_classes"],
    ):
        return None, f"shape (K={k}, N={n}) does not fit the data set"
    cache = TeacherCache(
        key=key,
        view_spec=view_spec,
        tensors=tensors,
        num_classes=expected["num_classes"],
        manifest=manifest,
        path=folder,
        built=False,
    )
    return cache, ""


def _build(
    teacher: LoadedTeacher,
    bundle: DataBundle,
    cfg: TeacherCacheConfig,
    view_spec: ViewSpec,
    key: str,
    folder: Path,
    device: torch.device,
    progress: ProgressCallback | None,
    dtype: str | None = None,
) -> TeacherCache:
    split = bundle.train
    n, num_views, num_classes = len(split), cfg.views, bundle.num_classes
    k = resolve_topk(cfg, num_classes, n)
    # Views are drawn on the CPU from a seed derived from the key: same key, same views, anywhere.
    gen = torch.Generator(device="cpu").manual_seed(int(key[:15], 16))
    views = sample_views(n, num_views, view_spec, gen)  # int16 [K, N, 3]
    if k is None:
        out = {"logits": torch.empty((num_views, n, num_classes), dtype=torch.float16)}
    else:
        index_dtype = torch.int16 if num_classes <= torch.iinfo(torch.int16).max else torch.int32
        out = {
            "topk_values": torch.empty((num_views, n, k), dtype=torch.float16),
            "topk_indices": torch.empty((num_views, n, k), dtype=index_dtype),
            "rest_logit": torch.empty((num_views, n), dtype=torch.float32),
        }

    model = teacher.model
    was_training = model.training
    model.eval()
    use_cuda = device.type == "cuda"
    amp_dtype = (autocast_dtype(dtype) if dtype is not None else torch.bfloat16) if use_cuda else None
    total = num_views * n
    done = forwards = 0
    t0 = time.perf_counter()
    # Images come through the data package's batch source (resident, host or streamed from disk),
    # in index order; each image batch is read once and seen through all K views.
    resident = not bundle.streaming and split.images.device.type == device.type
    source = make_batch_source(split, device, resident)
    order_gen = torch.Generator(device="cpu")  # unused: shuffle=False
    amp = torch.autocast("cuda", dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None)
    with torch.inference_mode(), amp:
        for idx, images, _labels in source.epoch(cfg.batch_size, order_gen, shuffle=False, drop_last=False):
            i = idx.to("cpu")
            for v in range(num_views):
                x = apply_views(
                    images, views[v, i], view_spec, teacher.input_size, teacher.mean, teacher.std,
                    interpolation=teacher.interpolation,
                )
                logits = model(x).float()
                forwards += 1
                if k is None:
                    out["logits"][v, i] = logits.to("cpu", torch.float16)
                else:
                    vals, top = logits.topk(k, dim=1)
                    if k < num_classes:
                        rest = torch.logsumexp(logits.scatter(1, top, float("-inf")), dim=1)
                    else:
                        rest = torch.full((logits.shape[0],), float("-inf"), device=logits.device)
                    out["topk_values"][v, i] = vals.to("cpu", torch.float16)
                    out["topk_indices"][v, i] = top.to("cpu", out["topk_indices"].dtype)
                    out["rest_logit"][v, i] = rest.to("cpu", torch.float32)
                done += int(i.shape[0])
                if progress is not None:
                    progress(done, total)
    if use_cuda:
        torch.cuda.synchronize(device)
    build_s = time.perf_counter() - t0
    model.train(was_training)

    tensors = {"views": views, **out}
    # safetensors needs contiguous tensors; all are freshly allocated, so this is free.
    raw = save_safetensors_bytes({name: t.contiguous() for name, t in tensors.items()})
    manifest = {
        "format": "kdsearch-teacher-cache",
        "format_version": CACHE_FORMAT_VERSION,
        "key": key,
        "build_id": uuid.uuid4().hex,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "created_unix": time.time(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "build_time_s": round(build_s, 3),
        "build_device": str(device),
        "build_dtype": {torch.bfloat16: "bf16-autocast", torch.float16: "fp16-autocast"}.get(amp_dtype, "fp32"),
        "teacher": {
            "name": teacher.name,
            "label": teacher.label,
            "weights_sha256": teacher.weights_sha256,
            "input_size": int(teacher.input_size),
            "mean": list(teacher.mean),
            "std": list(teacher.std),
            "norm_source": teacher.norm_source,
            "interpolation": teacher.interpolation,
        },
        "dataset": bundle.name,
        "dataset_fingerprint": bundle.fingerprint,
        "split": "train",
        "num_images": n,
        "num_classes": num_classes,
        "view_spec": view_spec.to_dict(),
        "views": num_views,
        "topk": k,
        "tensors": {
            name: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
            for name, t in tensors.items()
        },
        "data_file": DATA_FILE,
        "data_bytes": len(raw),
        "data_sha256": hashlib.sha256(raw).hexdigest(),
    }
    folder.mkdir(parents=True, exist_ok=True)
    # Drop the old manifest first: no reader may pair it with the new data file.
    (folder / MANIFEST_FILE).unlink(missing_ok=True)
    atomic_write_bytes(folder / DATA_FILE, raw)
    atomic_write_text(folder / MANIFEST_FILE, json.dumps(manifest, indent=2, sort_keys=True))
    log.info("teacher cache %s: built in %.1f s (%d teacher batches)", folder, build_s, forwards)
    return TeacherCache(
        key=key,
        view_spec=view_spec,
        tensors=tensors,
        num_classes=num_classes,
        manifest=manifest,
        path=folder,
        built=True,
        build_forward_count=forwards,
    )
