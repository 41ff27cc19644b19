"""The teacher-logit cache's size, known before anything runs, and where the cache can live.

Size (bytes) of a cache of ``K`` views of ``N`` train images over ``C`` classes:

* dense logits: ``K x N x C x 2`` (fp16);
* top-k logits: ``K x N x k x (2 + i)`` (fp16 values, int16/int32 class indices: ``i`` = 2 up to
  32,767 classes, else 4) plus ``K x N x 4`` (the fp32 logsumexp of the other classes);
* plus the views (crop offsets and flip): ``K x N x 3 x 2`` (int16).

ImageNet-1k with the defaults and all logits: 1,281,167 x 32 x 1000 x 2 B = 82 GB. With
``teacher.cache.topk: auto`` a label space above 100 classes stores the top 20 logits instead
(ImageNet-1k: about 3.7 GB); :func:`resolve_topk` says so in a log line.

Where it lives: the build holds the whole cache in host memory twice (the tensors and their
serialised file image), and a load holds it once. So host memory is the binding limit: when the
build cannot fit in the host's available memory, :func:`check_caches_fit` refuses the study
before it starts, naming the estimate and the keys to change. After the load, the logits move
to the device when they take at most :data:`DEVICE_SHARE` of its free memory (the rest is for
training); otherwise they stay on the host, pinned, and each batch's rows are gathered there and
copied (:func:`choose_placement`). The views always go to the device: they are small and the
training loop indexes them with device tensors.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from kdsearch.config import TeacherCacheConfig
from kdsearch.errors import ConfigError

__all__ = [
    "CacheSize",
    "estimate_cache_size",
    "resolve_topk",
    "host_available_bytes",
    "device_free_bytes",
    "choose_placement",
    "check_caches_fit",
    "DEVICE_SHARE",
    "BUILD_COPIES",
]

log = logging.getLogger(__name__)

DEVICE_SHARE = 0.5  # the logits go to the device only when they take at most this share of its free memory
BUILD_COPIES = 2  # the build holds the tensors and their serialised file image at once
_GB = 1e9


def _gb(n: float) -> str:
    return f"{n / _GB:.3g} GB"


@dataclass(frozen=True)
class CacheSize:
    """The estimated size of one teacher-logit cache, in bytes (see the module docstring)."""

    images: int  # N, train images
    views: int  # K, stored views per image
    num_classes: int  # C
    topk: int | None  # k stored logits per view, None: all C
    logits_bytes: int  # dense fp16 logits, or top-k values + indices + rest logit
    views_bytes: int  # int16 (dy, dx, flip) per view and image: the crop offsets

    @property
    def total_bytes(self) -> int:
        return self.logits_bytes + self.views_bytes

    @property
    def build_peak_bytes(self) -> int:
        """Host memory the build needs at its peak (:data:`BUILD_COPIES` x the cache)."""
        return BUILD_COPIES * self.total_bytes

    def describe(self) -> str:
        """``82 GB (1,281,167 images x 32 views x 1000 logits x 2 B, + 0.246 GB views)``."""
        if self.topk is None:
            per = f"{self.num_classes} logits x 2 B"
        else:
            per = f"top-{self.topk} of {self.num_classes} logits x {self._topk_entry_bytes()} B + 4 B"
        return (
            f"{_gb(self.total_bytes)} ({self.images:,} images x {self.views} views x {per}, "
            f"+ {_gb(self.views_bytes)} views)"
        )

    def _topk_entry_bytes(self) -> int:
        return 2 + _index_bytes(self.num_classes)


def _index_bytes(num_classes: int) -> int:
    return 2 if num_classes <= torch.iinfo(torch.int16).max else 4


def estimate_cache_size(num_images: int, views: int, num_classes: int, topk: int | None) -> CacheSize:
    """The size of a cache of ``views`` views of ``num_images`` images over ``num_classes`` classes,
    storing ``topk`` logits per view (``None``: all). Pure arithmetic, nothing is allocated."""
    n, k_views, c = int(num_images), int(views), int(num_classes)
    if topk is None:
        logits = k_views * n * c * 2
    else:
        k = min(int(topk), c)
        logits = k_views * n * k * (2 + _index_bytes(c)) + k_views * n * 4
    return CacheSize(
        images=n,
        views=k_views,
        num_classes=c,
        topk=None if topk is None else min(int(topk), c),
        logits_bytes=logits,
        views_bytes=k_views * n * 3 * 2,
    )


def resolve_topk(cfg: TeacherCacheConfig, num_classes: int, num_images: int | None = None) -> int | None:
    """The k the cache stores for ``num_classes`` classes (None: all logits); logs the choice
    when ``topk: auto`` picked top-k (with the dense size it avoids, when ``num_images`` is given)."""
    k = cfg.resolved_topk(num_classes)
    if cfg.topk == "auto" and k is not None:
        saved = ""
        if num_images is not None:
            dense = estimate_cache_size(num_images, cfg.views, num_classes, None)
            saved = f" (all logits would take {_gb(dense.total_bytes)})"
        log.info(
            "teacher.cache.topk auto: storing the top %d of %d logits per view%s; "
            "set teacher.cache.topk: null to store all", k, num_classes, saved,
        )
    return k


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_left() -> int | None:
    """Bytes left under a cgroup v2 memory limit (containers), or None without one."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        return max(0, int(limit) - used)
    except (OSError, ValueError):
        return None


def host_available_bytes() -> int | None:
    """Host memory a new allocation can get now, in bytes (None when unknown).

    psutil's ``available`` when installed, else Linux ``MemAvailable``, else
    ``os.sysconf`` free pages; lowered to what a cgroup v2 memory limit leaves.
    """
    avail: int | None = None
    try:
        import psutil  # type: ignore[import-untyped]  # noqa: PLC0415 - optional

        avail = int(psutil.virtual_memory().available)
    except ImportError:
        avail = _meminfo_available()
        if avail is None:
            try:
                avail = int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
            except (ValueError, OSError, AttributeError):
                avail = None
    left = _cgroup_left()
    if left is not None:
        avail = left if avail is None else min(avail, left)
    return avail


def device_free_bytes(device: torch.device | str) -> int | None:
    """Free memory on a CUDA device in bytes (``torch.cuda.mem_get_info``); None for the CPU."""
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info(dev)
    return int(free)


def choose_placement(
    logits_bytes: int, device: torch.device | str, free_bytes: int | None = None
) -> tuple[str, str]:
    """Where the cache's logits live for training on ``device``: ``("device" | "host", why)``.

    On the CPU the host is the device. On CUDA the logits go to the device when they take at most
    :data:`DEVICE_SHARE` of its free memory (``free_bytes``, read now when not given), else they
    stay on the host (pinned; each batch is gathered there and copied).
    """
    dev = torch.device(device)
    if dev.type != "cuda":
        return "device", f"{dev.type}: the host is the device"
    free = device_free_bytes(dev) if free_bytes is None else int(free_bytes)
    if free is None:
        return "host", "device free memory unknown"
    if logits_bytes <= DEVICE_SHARE * free:
        return "device", f"{_gb(logits_bytes)} <= {DEVICE_SHARE:g} x {_gb(free)} free on {dev}"
    return "host", f"{_gb(logits_bytes)} > {DEVICE_SHARE:g} x {_gb(free)} free on {dev}: kept on the host, pinned"


def check_caches_fit(
    caches: Sequence[TeacherCacheConfig],
    num_images: int,
    num_classes: int,
    host_bytes: int | None = None,
) -> list[CacheSize]:
    """Estimate every cached teacher's cache for this data set and refuse the study (one-line
    ConfigError) when the builds cannot fit in host memory (``host_bytes``, read now when not
    given; no check when unknown).

    Teachers are prepared one after another and each keeps its cache, so the peak is the sum of
    all caches plus one more copy of the largest (its build's serialised image).
    """
    sizes = [
        estimate_cache_size(num_images, c.views, num_classes, resolve_topk(c, num_classes, num_images))
        for c in caches
    ]
    if not sizes:
        return sizes
    peak = sum(s.total_bytes for s in sizes) + (BUILD_COPIES - 1) * max(s.total_bytes for s in sizes)
    avail = host_available_bytes() if host_bytes is None else int(host_bytes)
    if avail is not None and peak > avail:
        big = max(range(len(sizes)), key=lambda i: sizes[i].total_bytes)
        size, cfg = sizes[big], caches[big]
        topk_hint = "teacher.cache.topk (e.g. 20)" if size.topk is None else f"teacher.cache.topk (now {size.topk})"
        raise ConfigError(
            "teacher.cache",
            f"the teacher-logit cache needs {size.describe()}, and building it about "
            f"{_gb(peak)} of host memory, but {_gb(avail)} is available",
            None,
            f"lower teacher.cache.views (now {cfg.views}) or set {topk_hint}, or use teacher.mode: online",
        )
    return sizes
