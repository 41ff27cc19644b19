"""P4: the overhead of a whole trial around its KD box, as a share of the box.

Overhead = everything a trial costs that is not KD training: building the student, validation
during the box, accuracy on val/test, the measurement phase (latency, memory, energy, ops),
storing metrics and the checkpoint artifact -- plus the worker's per-process setup when the
teacher cache already exists (loading data and the cache), amortised over one trial as the worst
case. Target: <= 10% of a 60 s box. Issue 12 adds the *evaluation* share on real CIFAR-10: the
validation passes of the box (in-box ones on ``distill.eval_subset``, the final one on all of
val) must stay under 5% of the box, also on the CPU.

Method: one worker context is prepared twice (the first builds the teacher fit and cache, which a
study pays once; the second is timed: that is what a new worker pays), then ``--trials`` trials
run through the real objective (``kdsearch.search.objective.run_trial``) on a journal-file study.
Wall times come from ``time.perf_counter``; the KD time is the trial's own ``kd_time_s``; the
validation time is the loop's own ``eval_time_s`` (``perf_counter`` around each pass, which
reads its result back, so the device is synchronised); the rest of the phase split is taken from
the objective's progress callbacks.

    python benchmarks/bench_trial_overhead.py            # 60 s box, synthetic data
    python benchmarks/bench_trial_overhead.py --box 20 --trials 2
    # issue 12: real JPEG CIFAR-10 (45,000 train / 5,000 val / 10,000 test), rungs on, 45 s box
    mkdir -p /tmp/cifar10 && tar xzf ../shared/data/cifar10-jpeg.tar.gz -C /tmp/cifar10
    python benchmarks/bench_trial_overhead.py --data /tmp/cifar10 --box 45 --trials 3 --pruning
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import optuna
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kdsearch.config import config_from_dict
from kdsearch.search.objective import run_trial
from kdsearch.search.study import create_or_resume
from kdsearch.search.worker_setup import prepare_worker
from kdsearch.storage import run_paths

from common import environment_lines, format_table, pick_device  # noqa: E402


def study_config(run_dir: Path, args: argparse.Namespace) -> dict:
    """A CIFAR-sized trial: 32 px, 10 classes, a VGG-8 at width 1/4 by default, default measurement;
    synthetic data, or the image folder ``args.data`` (e.g. JPEG CIFAR-10, all of it)."""
    data: dict = {"dataset": "synthetic", "num_classes": 10, "synthetic_train_size": 5000,
                  "synthetic_test_size": 1000, "image_size": 32}
    if args.data:
        data = {"dataset": "imagefolder", "root": args.data, "image_size": 32, "val_fraction": 0.1}
    distill: dict = {}
    if args.eval_subset is not None:
        distill["eval_subset"] = None if args.eval_subset == 0 else args.eval_subset
    return {
        "study": {"name": "p4", "run_dir": str(run_dir), "trial_time": args.box, "budget": "24h",
                  # Rungs evaluated and ranked, but never pruning: every trial is the same student,
                  # and what is measured is the cost of the evaluations, not the decisions.
                  "pruning": {"enabled": args.pruning, "min_competitors": 1000}},
        "data": data,
        "teacher": {"name": "vit_tiny_patch16_224", "model_kwargs": {"img_size": 32, "patch_size": 4, "depth": 2,
                                                                     "embed_dim": 96, "num_heads": 3},
                    "fit": {"enabled": "true", "time": args.fit_time}, "cache": {"views": args.views}},
        "student": {"family": "vgg", "resolution": 32, "vgg": {"depth": args.depth, "width": args.width}},
        "distill": distill,
        "objectives": {"val_accuracy": "maximize", "latency_ms_b1": "minimize"},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--box", type=float, default=60.0, help="KD time box, s")
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads on CPU (0 = default)")
    ap.add_argument("--data", default=None, help="an image folder (train/, test/) instead of synthetic data")
    ap.add_argument("--pruning", action="store_true", help="study.pruning.enabled: evaluate at the rungs too")
    ap.add_argument("--eval-subset", type=int, default=None, help="distill.eval_subset (0 = all of val)")
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--views", type=int, default=8, help="teacher cache views")
    ap.add_argument("--fit-time", type=float, default=10.0, help="teacher fit, s (its quality is not measured)")
    args = ap.parse_args()
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="kdsearch-p4-") as tmp:
        cfg = config_from_dict(study_config(Path(tmp), args))
        paths = run_paths(tmp, "p4")
        t0 = time.perf_counter()
        prepare_worker(cfg, paths, device)  # fits the teacher and builds the cache: paid once per study
        first_prepare_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ctx = prepare_worker(cfg, paths, device)  # what a new worker pays: data + cache load
        setup_s = time.perf_counter() - t0
        study, _ = create_or_resume(cfg)
        rows = []
        for _ in range(args.trials):
            marks: list[tuple[str, float]] = []

            def progress(phase: str, frac: float | None, msg: str, marks: list = marks) -> None:
                # "measure" runs twice (fixed costs before the box, accuracy after): name by message.
                name = f"{phase} ({msg})" if phase == "measure" else phase
                if not marks or marks[-1][0] != name:
                    marks.append((name, time.perf_counter()))

            trial = study.ask()
            t0 = time.perf_counter()
            values = run_trial(ctx, trial, progress)
            wall = time.perf_counter() - t0
            study.tell(trial, values)
            ua = study.trials[-1].user_attrs
            hist = ua["kd_history"]
            phases = [(name, (marks[i + 1][1] if i + 1 < len(marks) else t0 + wall) - at)
                      for i, (name, at) in enumerate(marks)]
            rows.append({"wall": wall, "kd": float(ua["kd_time_s"]), "overhead": wall - float(ua["kd_time_s"]),
                         "eval": float(hist["eval_time_s"]), "final_eval": float(hist["final_eval_time_s"]),
                         "evaluations": int(hist["evaluations"]), "phases": phases,
                         "val_accuracy": float(ua["val_accuracy"])})
    if not rows:
        print("could not measure: no trial ran", file=sys.stderr)
        return 1
    over = [r["overhead"] for r in rows]
    evals = [r["eval"] for r in rows]
    med = statistics.median(over)
    med_eval = statistics.median(evals)
    share = med / args.box
    share_with_setup = (med + setup_s) / args.box
    for line in environment_lines(device):
        print(line)
    print(f"data: {args.data or 'synthetic'}: train {len(ctx.bundle.train)}, val {len(ctx.bundle.val)}, "
          f"test {len(ctx.bundle.test)}; eval_subset {cfg.distill.eval_subset}; pruning {cfg.study.pruning.enabled}")
    print(f"first prepare (teacher fit {cfg.teacher.fit.time_s:.0f}s + cache build, paid once per study): {first_prepare_s:.1f} s")
    for i, r in enumerate(rows):
        split = ", ".join(f"{k} {v:.2f}s" for k, v in r["phases"])
        print(f"trial {i}: wall {r['wall']:.2f}s, kd {r['kd']:.2f}s, overhead {r['overhead']:.2f}s; "
              f"validation {r['eval']:.2f}s in {r['evaluations']} passes (final on all of val {r['final_eval']:.2f}s); "
              f"val acc {r['val_accuracy']:.4f}; phases: {split}")
    table = [
        ["box (s)", f"{args.box:.0f}"],
        ["trials", str(len(rows))],
        ["per-trial overhead, median (s)", f"{med:.2f} (min {min(over):.2f}, max {max(over):.2f})"],
        ["worker setup with a built cache (s)", f"{setup_s:.2f}"],
        ["P4 overhead / box (per trial)", f"{100 * share:.1f}%"],
        ["P4 overhead / box (+ worker setup, worst case)", f"{100 * share_with_setup:.1f}%"],
        ["target", "<= 10%"],
        ["validation passes per trial", str(rows[0]["evaluations"])],
        ["validation time, median (s)", f"{med_eval:.2f} (min {min(evals):.2f}, max {max(evals):.2f})"],
        ["validation / box (issue 12)", f"{100 * med_eval / args.box:.1f}%"],
        ["target", "< 5%"],
    ]
    print(format_table(["P4 whole-trial overhead", "value"], table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
