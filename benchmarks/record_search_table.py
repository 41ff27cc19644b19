"""Record the replay table of issue 12: real KD trials on JPEG CIFAR-10, one JSON line per config.

Each row is one VGG student distilled with kdsearch's own :func:`kdsearch.distill.distill` from a
fixed teacher (fitted once, logits cached once), with its validation accuracy recorded at every
1/27 of the box through the ``on_eval`` hook, its final val/test accuracy, and its fixed costs
(params, MACs, model size, batch-1 CPU latency). ``benchmarks/bench_search.py`` replays search
strategies against the table in simulated time.

The box is a **CPU-time box**: ``--box-s`` seconds of this process's CPU time (one torch
thread), not of wall clock. The recording machine has 2 cores shared with other jobs; a
wall-clock box would give a trial 10 s or 6 s of compute depending on the neighbours, and the
table would rank the load, not the students. ``distill()`` times its box with
``time.perf_counter``; the recorder substitutes the process CPU clock for that one name
(``--clock process``) so the box, the LR schedule and the rung fractions all run on CPU time.
``--clock wall`` keeps the real clock.

``--schedule wsd-rung`` replaces the cosine LR schedule (for this recording only) by
warmup-stable-decay with a short cool-down ending at each rung (1/9, 1/3) and a final decay over
the last 20% of the box: the issue's question whether such a schedule ranks students better at
the rungs.

Resumable: rows already in ``--out`` (matched by ``id``) are skipped, new rows are appended and
flushed one by one. ``--shard i/n`` records every n-th config so n processes can share the grid.

    mkdir -p /tmp/cifar10 && tar xzf ../shared/data/cifar10-jpeg.tar.gz -C /tmp/cifar10
    python benchmarks/record_search_table.py --out benchmarks/search_table/cosine.jsonl --shard 0/2
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import platform
import sys
import time
import types
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # zero_cost.py sits beside this script

RUNGS_WSD = (1.0 / 9.0, 1.0 / 3.0)  # fractions of the box where wsd-rung cools down
GRID: dict[str, tuple[Any, ...]] = {
    "depth": (2, 3, 4, 5, 8),
    "width": (0.0625, 0.125, 0.25, 0.5),
    "resolution": (16, 32),
    "temperature": (2.0, 6.0),
    "alpha": (0.5, 0.9),
}
EVAL_EVERY = 1.0 / 27.0


# The hard table of issue 21: a wider VGG grid plus a few MobileNetV3 students.
HARD_GRID: dict[str, tuple[Any, ...]] = {
    "depth": (2, 3, 4, 5, 8, 11),
    "width": (0.0625, 0.125, 0.1875, 0.25, 0.375, 0.5),
    "resolution": (16, 24, 32),
    "temperature": (2.0, 6.0),
    "alpha": (0.5, 0.9),
}
# MobileNetV3 (timm's tables; every registered width). ~50 steps in a 10 s CPU box for small 0.5,
# ~15-30 for the rest (measured with 1 thread): few, but that is the family on this machine.
HARD_MOBILENET: dict[str, tuple[Any, ...]] = {
    "arch": (("small", 0.5), ("small", 0.75), ("small", 1.0), ("large", 0.75), ("large", 1.0)),
    "resolution": (16, 24, 32),
    "temperature": (2.0, 6.0),
    "alpha": (0.5, 0.9),
}
HARD_ORDER_SEED = 21  # the hard grid is recorded in this seeded random order: any prefix is a random sample
ZC_BATCH = 256  # images (two training batches) the zero-cost scores see
ZC_SEED = 2121  # which train images those are: the same for every row


def grid_configs(grid: str = "old") -> list[dict[str, Any]]:
    """Every config of the grid, in a fixed order, each with a stable id.

    ``old``: :data:`GRID` (VGG only, rows as in issue 12). ``hard``: :data:`HARD_GRID` (VGG) then
    :data:`HARD_MOBILENET`; every config carries ``family``, MobileNetV3 ones ``size`` and
    ``channel_multiplier`` with ``depth`` and ``width`` None.
    """
    out: list[dict[str, Any]] = []
    table = GRID if grid == "old" else HARD_GRID
    keys = list(table)
    for values in itertools.product(*(table[k] for k in keys)):
        c = dict(zip(keys, values, strict=True))
        c["id"] = "d{depth}-w{width:g}-r{resolution}-T{temperature:g}-a{alpha:g}".format(**c)
        if grid == "hard":
            c["family"] = "vgg"
        out.append(c)
    if grid == "hard":
        for (size, mult), res, temp, alpha in itertools.product(*HARD_MOBILENET.values()):
            out.append({
                "family": "mobilenetv3", "size": size, "channel_multiplier": mult, "depth": None, "width": None,
                "resolution": res, "temperature": temp, "alpha": alpha,
                "id": f"mnv3{size}-c{mult:g}-r{res}-T{temp:g}-a{alpha:g}",
            })
    return out


def student_dict(c: dict[str, Any], num_classes: int) -> dict[str, Any]:
    """The flat StudentSpec dict of config ``c`` (the same form before and after the family split)."""
    common = {"resolution": c["resolution"], "num_classes": num_classes, "in_chans": 3}
    if c.get("family", "vgg") == "vgg":
        return {"family": "vgg", **common, "depth": c["depth"], "width": c["width"]}
    return {"family": c["family"], **common, "size": c["size"], "channel_multiplier": c["channel_multiplier"],
            "depth_multiplier": 1.0}


def wsd_rung_factor(progress: float, warmup_fraction: float, final_lr_fraction: float = 0.0) -> float:
    """Warmup-stable-decay with a cool-down before each rung of :data:`RUNGS_WSD`.

    Linear warm-up over ``warmup_fraction``; then the peak LR, except (a) a linear cool-down to
    ``final_lr_fraction`` over the last quarter of each rung interval, ending at the rung, and a
    re-warm to the peak over half that width after it; (b) a linear decay over the last 20% of
    the box. Same signature as :func:`kdsearch.distill.schedule.lr_factor`.
    """
    p = min(max(progress, 0.0), 1.0)
    if warmup_fraction > 0 and p < warmup_fraction:
        return p / warmup_fraction
    lo = final_lr_fraction
    if p >= 0.8:
        return lo + (1.0 - lo) * (1.0 - p) / 0.2
    prev = 0.0
    for r in RUNGS_WSD:
        w = 0.25 * (r - prev)
        if r - w <= p < r:
            return lo + (1.0 - lo) * (r - p) / w
        if r <= p < r + w / 2:
            return lo + (1.0 - lo) * (p - r) / (w / 2)
        prev = r
    return 1.0


def stratified_subset(split: Any, n: int, num_classes: int, seed: int) -> Any:
    """A fixed, class-balanced subset of ``n`` images of ``split`` (an ImageSplit)."""
    g = torch.Generator().manual_seed(seed)
    per = n // num_classes
    picks = []
    for c in range(num_classes):
        idx = torch.nonzero(split.labels == c).flatten()
        picks.append(idx[torch.randperm(len(idx), generator=g)[:per]])
    sel = torch.cat(picks).sort().values
    return type(split)(split.images[sel], split.labels[sel])


def study_dict(args: argparse.Namespace) -> dict[str, Any]:
    """The study file the recording runs under (data, teacher, distill recipe)."""
    hard = args.grid == "hard"
    fit: dict[str, Any] = {"enabled": "auto", "time": f"{args.teacher_fit_s}s", "lr": 0.002}
    if hard:  # a quality-aimed fit: the cosine schedule runs over max_epochs (or the wall-clock cap)
        fit.update({"max_epochs": args.teacher_epochs, "target_accuracy": 0.85, "eval_every_epochs": 2.0})
    return {
        "study": {"name": "search-table", "seed": 0, "trial_time": f"{args.box_s}s", "budget": "10h"},
        "data": {
            "dataset": "imagefolder",
            "root": args.data_root,
            "image_size": 32,
            "val_fraction": 0.02,  # 1,000 images carved from train
            "max_train_samples": args.train_n,
            "max_test_samples": 1000,
        },
        "teacher": {
            "name": "resnet18",
            "label": "CNN",
            "input_size": 32,
            # hard: half the channels, ~2.7x the training throughput on 2 CPU cores (measured)
            **({"model_kwargs": {"channels": [32, 64, 128, 256]}} if hard else {}),
            "fit": fit,
            "cache": {"views": 4, "crop_padding": 4, "batch_size": 256},
        },
        "student": {"family": "vgg", "resolution": 32, "vgg": {"depth": 4, "width": 0.25}},
        "distill": {
            "temperature": 4.0, "alpha": 0.9, "lr": 0.05, "batch_size": 128,
            "eval_every_fraction": EVAL_EVERY,
        },
        "objectives": {"val_accuracy": "maximize", "macs": "minimize"},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="JSON-lines table (appended, resumable)")
    ap.add_argument("--grid", choices=("old", "hard"), default="old",
                    help="old: the 160-row table of issue 12; hard: the wider grid of issue 21 (stronger teacher)")
    ap.add_argument("--run-dir", type=Path, default=None,
                    help="teacher fit + logit cache (default /tmp/kdsearch-search-table[-hard])")
    ap.add_argument("--data-root", default="/tmp/cifar10")
    ap.add_argument("--train-n", type=int, default=None,
                    help="stratified KD/teacher train subset (default 10000 old, 40000 hard)")
    ap.add_argument("--val-subset", type=int, default=500, help="fixed stratified val images for the curve")
    ap.add_argument("--box-s", type=float, default=10.0, help="KD box, seconds of --clock")
    ap.add_argument("--clock", choices=("process", "wall"), default="process")
    ap.add_argument("--schedule", choices=("cosine", "wsd-rung"), default="cosine")
    ap.add_argument("--teacher-fit-s", type=float, default=None,
                    help="teacher fit: the box (old, default 180) or the wall-clock cap (hard, default 9000)")
    ap.add_argument("--teacher-epochs", type=float, default=20.0, help="hard: the teacher fit's max_epochs")
    ap.add_argument("--prepare-only", action="store_true", help="fit the teacher, build the cache, stop")
    ap.add_argument("--shard", default="0/1", help="i/n: record configs i, i+n, i+2n, ...")
    ap.add_argument("--limit", type=int, default=None, help="record at most this many configs (a subset)")
    ap.add_argument("--subset-seed", type=int, default=0, help="order of configs when --limit is given")
    ap.add_argument("--ids", nargs="*", default=None, help="record only these config ids (e.g. to time one row)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reverse", action="store_true", help="record this shard's configs last to first")
    ap.add_argument("--done-from", type=Path, nargs="*", default=[],
                    help="other tables whose rows count as done (re-read before each config)")
    args = ap.parse_args()
    hard = args.grid == "hard"
    if args.run_dir is None:
        args.run_dir = Path("/tmp/kdsearch-search-table" + ("-hard" if hard else ""))
    if args.train_n is None:
        args.train_n = 40000 if hard else 10000
    if args.teacher_fit_s is None:
        args.teacher_fit_s = 9000.0 if hard else 180.0

    torch.set_num_threads(args.threads)
    from zero_cost import zero_cost_scores

    from kdsearch.config import LatencyConfig, config_from_dict
    from kdsearch.data import apply_views
    from kdsearch.distill import KDHyper, distill
    from kdsearch.distill import loop as distill_loop
    from kdsearch.measure import evaluate_accuracy, measure_complexity, measure_latency, model_size_mb
    from kdsearch.models import StudentSpec, build_student
    from kdsearch.search.worker_setup import prepare_worker
    from kdsearch.storage import run_paths

    cfg = config_from_dict(study_dict(args))
    # The fitted teacher and its logit cache live in one place for every shard and schedule.
    paths = run_paths(args.run_dir, "search-table")
    device = torch.device("cpu")
    t0 = time.perf_counter()
    last_report = [0.0, ""]

    def report(phase: str, fraction: float | None, message: str) -> None:
        """Print the fit's and the cache's progress at most once a minute (and every phase change)."""
        now = time.perf_counter()
        if phase != last_report[1] or now - last_report[0] >= 60.0:
            last_report[:] = [now, phase]
            frac = "" if fraction is None else f" {100 * fraction:.1f}%"
            print(f"[{dt.datetime.now(dt.UTC):%H:%M:%S}] {phase}{frac}: {message} ({now - t0:.0f}s)", flush=True)

    ctx = prepare_worker(cfg, paths, device, report)
    teacher = next(iter(ctx.teachers.values()))
    print(f"prepared in {time.perf_counter() - t0:.1f}s: teacher val {teacher.val_accuracy:.4f} "
          f"test {teacher.test_accuracy:.4f}; train {len(ctx.bundle.train)} val {len(ctx.bundle.val)} "
          f"test {len(ctx.bundle.test)}", flush=True)
    if args.prepare_only:
        print(json.dumps({"teacher_fit": teacher.fit_info}, default=str), flush=True)
        return 0
    val_sub = stratified_subset(ctx.bundle.val, args.val_subset, ctx.bundle.num_classes, seed=12)

    if args.clock == "process":
        # distill() reads time.perf_counter for its box; give it the process CPU clock instead.
        distill_loop.time = types.SimpleNamespace(perf_counter=time.process_time, sleep=time.sleep)
    if args.schedule == "wsd-rung":
        distill_loop.lr_factor = wsd_rung_factor

    configs = grid_configs(args.grid)
    grid_index = {c["id"]: i for i, c in enumerate(configs)}
    if hard:  # a seeded random order, so the rows recorded so far are a random sample of the grid
        g = torch.Generator().manual_seed(HARD_ORDER_SEED)
        configs = [configs[i] for i in torch.randperm(len(configs), generator=g).tolist()]
    if args.limit is not None:
        g = torch.Generator().manual_seed(args.subset_seed)
        configs = [configs[i] for i in torch.randperm(len(configs), generator=g)[: args.limit].tolist()]
    if args.ids is not None:
        unknown = sorted(set(args.ids) - set(grid_index))
        if unknown:
            print(f"--ids: not in the {args.grid} grid: {unknown}", file=sys.stderr)
            return 2
        configs = [c for c in configs if c["id"] in set(args.ids)]
    i_shard, n_shard = (int(x) for x in args.shard.split("/"))
    configs = configs[i_shard::n_shard]
    done: set[str] = set()
    if args.out.exists():
        done = {json.loads(line)["id"] for line in args.out.read_text().splitlines() if line.strip()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # The zero-cost batch: ZC_BATCH fixed train images in their first cached view, and the cached
    # teacher logits of exactly those views (what every kdsearch trial distils from).
    zc_idx = torch.randperm(len(ctx.bundle.train), generator=torch.Generator().manual_seed(ZC_SEED))[:ZC_BATCH]
    zc_idx = zc_idx.sort().values
    zc_view_ids = torch.zeros_like(zc_idx)
    zc_images = ctx.bundle.train.images[zc_idx]
    zc_views = teacher.source.views[zc_view_ids, zc_idx]
    zc_teacher = teacher.source.teacher_logits(zc_view_ids, zc_idx)
    lat_cfg = LatencyConfig(batch_sizes=(1,), min_repeats=5, max_repeats=50, max_time_s=0.5)
    if args.reverse:
        configs = configs[::-1]

    def done_elsewhere() -> set[str]:
        ids: set[str] = set()
        for path in args.done_from:
            if path.exists():
                ids |= {json.loads(line)["id"] for line in path.read_text().splitlines() if line.strip()}
        return ids

    done |= done_elsewhere()
    todo = [c for c in configs if c["id"] not in done]
    print(f"{len(todo)} of {len(configs)} configs to record ({len(done)} rows already in {args.out})", flush=True)
    for k, c in enumerate(todo):
        if args.done_from and c["id"] in done_elsewhere():
            continue  # another process recorded it meanwhile
        wall0 = time.perf_counter()
        spec = StudentSpec.from_dict(student_dict(c, ctx.bundle.num_classes))
        seed = 1000 + grid_index[c["id"]]  # the same seed for a config in every recording
        torch.manual_seed(seed)
        student = build_student(spec)
        # Zero-cost scores of the untrained student (on copies: the student trained below is untouched).
        zc_x = apply_views(zc_images, zc_views, ctx.view_spec, c["resolution"], ctx.bundle.mean, ctx.bundle.std)
        zc = zero_cost_scores(student, zc_x, zc_teacher)
        curve: list[list[float]] = []

        def on_eval(train_s: float, fraction: float, val_acc: float, _curve: list[list[float]] = curve) -> bool:
            _curve.append([round(fraction, 5), round(val_acc, 5)])
            return False

        hyper = KDHyper(temperature=c["temperature"], alpha=c["alpha"], lr=0.05)
        result = distill(
            student, train=ctx.train_source, val=val_sub, bundle=ctx.bundle, teacher_source=teacher.source,
            hyper=hyper, cfg=cfg.distill, time_box_s=args.box_s, resolution=c["resolution"], device=device,
            seed=seed, view_spec=ctx.view_spec, eval_batch_size=250, on_eval=on_eval,
        )
        student.eval()
        mean, std = ctx.bundle.mean, ctx.bundle.std
        val_acc = evaluate_accuracy(student, ctx.bundle.val, c["resolution"], mean, std, device, 250)
        test_acc = evaluate_accuracy(student, ctx.bundle.test, c["resolution"], mean, std, device, 250)
        macs, params = measure_complexity(student, c["resolution"])
        lat = measure_latency(student, c["resolution"], 1, device, lat_cfg)
        row = {
            **c,
            "seed": seed,
            "schedule": args.schedule,
            "clock": args.clock,
            "box_s": args.box_s,
            "kd_time_s": round(result.kd_time_s, 4),
            "steps": result.steps,
            "epochs": round(result.epochs, 4),
            "curve": curve,  # [fraction of the box, val accuracy on the fixed val subset]
            "val_subset_n": len(val_sub),
            "val_accuracy": val_acc,  # all of val (1,000)
            "test_accuracy": test_acc,
            "params": params,
            "macs": macs,
            "model_size_mb": round(model_size_mb(student), 6),
            "latency_ms_b1": None if lat.median_ms is None else round(lat.median_ms, 5),
            "wall_s": round(time.perf_counter() - wall0, 2),
            **zc,  # zero-cost scores (benchmarks/zero_cost.py), from the untrained student
        }
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"[{k + 1}/{len(todo)}] {c['id']}: steps {result.steps} val {val_acc:.3f} "
              f"curve[3] {curve[min(2, len(curve) - 1)][1]:.3f} wall {row['wall_s']}s", flush=True)
    meta = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.platform()}",
        "torch": torch.__version__, "python": sys.version.split()[0],
        "teacher_val_accuracy": teacher.val_accuracy, "teacher_test_accuracy": teacher.test_accuracy,
        "teacher_fit": teacher.fit_info, "args": {k: str(v) for k, v in vars(args).items()},
        "grid": args.grid,
        "grid_axes": {k: list(v) for k, v in (HARD_GRID if hard else GRID).items()},
        **({"grid_mobilenet": {k: list(v) for k, v in HARD_MOBILENET.items()}} if hard else {}),
    }
    args.out.with_suffix(f".meta-{i_shard}.json").write_text(json.dumps(meta, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
