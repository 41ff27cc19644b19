"""Host memory of a worker's train split when it is not device-resident (issue 20, item 6).

Runs the worker's data sequence on real CIFAR-10 (the JPEG copy, as an image folder) with
``data.device_resident: false`` and a CUDA training device, and prints the process RSS after each
stage: the data loaded; the trial's batch source (``objective.prepare_worker``); the bundle given
that source's pinned split (``share_pinned_train``, where the code has it); the teacher fit's and
the teacher-cache build's batch sources (``fit.py`` and ``teacher_cache.py`` call
``make_batch_source`` on ``bundle.train`` exactly so).

On a machine without CUDA, ``pin_memory`` cannot run: ``--emulate-pin`` (the default there)
replaces it with a pageable copy and ``is_pinned`` with a lookup of those copies, so the copies
counted are exactly the ones the code makes on a GPU worker (pinned memory itself -- page-locked,
kept by CUDA's host allocator -- is not reproduced). Run it against the code before and after:

    mkdir -p /tmp/cifar10 && tar xzf ../shared/data/cifar10-jpeg.tar.gz -C /tmp/cifar10
    PYTHONPATH=/path/to/old/checkout python benchmarks/bench_host_memory.py   # before
    PYTHONPATH=$PWD python benchmarks/bench_host_memory.py                    # after
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch


def rss_mb() -> float:
    """Resident set size of this process, MB (10^6 bytes), from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / 1e6
    raise RuntimeError("no VmRSS in /proc/self/status")


def emulate_pinning() -> None:
    """``pin_memory`` -> a pageable copy, remembered; ``is_pinned`` -> is it one of those copies."""
    pinned: set[int] = set()

    def pin_memory(t: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        c = t.clone()
        pinned.add(c.data_ptr())
        return c

    def is_pinned(t: torch.Tensor, *args: object, **kwargs: object) -> bool:
        return t.data_ptr() in pinned

    torch.Tensor.pin_memory = pin_memory  # type: ignore[method-assign]
    torch.Tensor.is_pinned = is_pinned  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=Path("/tmp/cifar10"), help="unpacked cifar10-jpeg (train/, test/)")
    ap.add_argument("--emulate-pin", action=argparse.BooleanOptionalAction, default=not torch.cuda.is_available())
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not (args.data / "train").is_dir():
        raise SystemExit(f"--data {args.data}: no train/ folder; unpack ../shared/data/cifar10-jpeg.tar.gz there")
    if args.emulate_pin:
        emulate_pinning()
    import kdsearch.data.pipeline as pipeline
    from kdsearch.config import DataConfig
    from kdsearch.data import load_data, make_batch_source

    device = torch.device("cuda")  # the batch sources are only built here; no CUDA call is made
    stages: dict[str, float] = {"start": rss_mb()}
    bundle = load_data(DataConfig(dataset="imagefolder", root=str(args.data), device_resident="false"))
    gc.collect()
    stages["data loaded"] = rss_mb()
    train_mb = bundle.train.images.numel() / 1e6
    source = make_batch_source(bundle.train, device, resident=False)
    stages["trial source"] = rss_mb()
    share = getattr(pipeline, "share_pinned_train", None)
    if share is not None:
        bundle = share(bundle, source)
        gc.collect()
    stages["bundle shares the pinned split"] = rss_mb()
    fit_source = make_batch_source(bundle.train, device, resident=False)  # what distill/fit.py does
    stages["teacher-fit source"] = rss_mb()
    cache_source = make_batch_source(bundle.train, device, resident=False)  # what teacher_cache.py does
    stages["cache-build source"] = rss_mb()
    ptrs = {s.split.images.data_ptr() for s in (source, fit_source, cache_source)} | {bundle.train.images.data_ptr()}
    out = {
        "code": "share_pinned_train" if share is not None else "before (no share_pinned_train)",
        "emulated_pinning": bool(args.emulate_pin),
        "train_images_mb": round(train_mb, 1),
        "rss_mb": {k: round(v, 1) for k, v in stages.items()},
        "train_copies_held": len(ptrs),  # distinct train-image tensors the bundle and the sources hold
        "extra_train_copies_by_rss": round((stages["cache-build source"] - stages["data loaded"]) / train_mb, 2),
    }
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
