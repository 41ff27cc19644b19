"""How fast ``kdsearch report`` and ``kdsearch trials --pareto`` answer on a 1,000-trial study.

A study is generated into a temporary journal file with Optuna's public API
(``optuna.trial.create_trial`` + ``study.add_trials``): ``--trials`` FrozenTrials (default 1,000)
with the user attributes a real search stores (every metric, ``missing_metrics``, ``methods``,
``spec``, ``kd_history``, ``normalization``, constraint violations, artifact id, ...), two
objectives (``val_accuracy`` max, ``latency_ms_b1`` min), a constraint on ``params``, about 8% FAIL
and 4% PRUNED trials, and the study user attributes (config, environment, teachers).

Each command runs as a fresh process (``python -m kdsearch ...``), wall clock, ``--runs`` times
after one untimed warm-up (file-system caches); the figure is the median. Target: <= 5 s each.
Also printed: the process's CPU time (user + sys, from ``resource.getrusage``) and the load
average, since on a busy machine the wall clock measures the neighbours as much as kdsearch.

    python benchmarks/bench_report.py [--trials 1000] [--runs 3] [--keep DIR]
"""

from __future__ import annotations

import argparse
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

TARGET_S = 5.0
STUDY = "bench1000"
PARAMS_LIMIT = 400_000


def _trial(rng: random.Random, number: int) -> Any:
    """One realistic FrozenTrial (COMPLETE, FAIL or PRUNED) as the search would store it."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    from optuna.trial import TrialState, create_trial

    family = rng.choice(["vgg", "mobilenetv3"])
    res = rng.choice([16, 24, 32])
    depth = rng.choice([2, 3, 4, 5, 8])
    width = math.exp(rng.uniform(math.log(1 / 64), math.log(0.25)))
    temperature = rng.choice([2.0, 4.0, 8.0])
    alpha = rng.uniform(0.3, 0.95)
    params: dict[str, Any] = {"family": family, "resolution": res, "temperature": temperature, "alpha": alpha}
    dists: dict[str, Any] = {
        "family": CategoricalDistribution(["vgg", "mobilenetv3"]),
        "resolution": CategoricalDistribution([16, 24, 32]),
        "temperature": CategoricalDistribution([2.0, 4.0, 8.0]),
        "alpha": FloatDistribution(0.3, 0.95),
    }
    if family == "vgg":
        params.update(vgg_depth=depth, vgg_width=width)
        dists.update(vgg_depth=CategoricalDistribution([2, 3, 4, 5, 8]),
                     vgg_width=FloatDistribution(1 / 64, 0.25, log=True))
        arch: dict[str, Any] = {"depth": depth, "width": width}
        label = f"vgg{depth}-w{width:.3g}@{res}"
    else:
        cm, dm = rng.choice([0.5, 0.75]), rng.choice([0.5, 0.75])
        params.update(mobilenetv3_channel_multiplier=cm, mobilenetv3_depth_multiplier=dm)
        dists.update(mobilenetv3_channel_multiplier=CategoricalDistribution([0.5, 0.75]),
                     mobilenetv3_depth_multiplier=CategoricalDistribution([0.5, 0.75]))
        arch = {"size": "small", "channel_multiplier": cm, "depth_multiplier": dm}
        label = f"mobilenetv3-small-c{cm}-d{dm}@{res}"
    ua: dict[str, Any] = {
        "spec": {"family": family, "resolution": res, "num_classes": 10, "arch": arch, "in_chans": 3},
        "student": label, "teacher": "ViT-tiny", "teacher_name": "vit_tiny_patch16_224", "teacher_mode": "cached",
        "temperature": temperature, "alpha": alpha, "lr": 0.05, "dataset": "digits", "device": "cpu",
        "train_dtype": "fp32", "gpu_sharing": {"workers_per_gpu": None, "share_gpu": False},
    }
    roll = rng.random()
    if roll < 0.08:
        ua.update(fail_reason=rng.choice(["oom", "diverged", "timeout"]), fail_detail="loss became NaN at step 412")
        return create_trial(state=TrialState.FAIL, params=params, distributions=dists, user_attrs=ua)
    if roll < 0.12:
        return create_trial(state=TrialState.PRUNED, params=params, distributions=dists, user_attrs=ua,
                            intermediate_values={1: rng.uniform(0.1, 0.5)})
    size = width * depth * res / 32
    acc = max(0.1, min(0.99, 0.55 + 0.35 * math.tanh(6 * size) + rng.gauss(0, 0.04)))
    lat = 0.2 + 3.0 * size + abs(rng.gauss(0, 0.05))
    n_params = int(2e3 + 3e6 * width * width * depth)
    metrics = {
        "val_accuracy": acc, "test_accuracy": acc - rng.uniform(0, 0.02), "kd_time_s": 10.0 + rng.uniform(0, 0.4),
        "params": n_params, "macs": n_params * res * res / 4, "model_size_mb": n_params * 4 / 1e6,
        "activation_peak_mb_b1": 0.01 * res * depth, "peak_kd_memory_mb": None, "kd_energy_j": None,
        "infer_energy_mj_per_image": None, "latency_ms_b1": lat, "latency_p90_ms_b1": lat * 1.1,
        "latency_ms_b64": lat * 20, "latency_p90_ms_b64": lat * 22, "throughput_img_s_b64": 64e3 / (lat * 20),
    }
    ua.update(metrics)
    ua["missing_metrics"] = {
        "peak_kd_memory_mb": "cpu: torch.cuda.max_memory_allocated is CUDA-only",
        "kd_energy_j": "unavailable: NVML not available on this machine",
        "infer_energy_mj_per_image": "unavailable: NVML not available on this machine",
    }
    ua["methods"] = {
        m: {"method": "perf_counter", "device": "cpu", "repeats": 50, "batch_size": 1, "spread": 0.03,
            "threads": 2, "warmup_s": 0.1}
        for m in metrics if m.startswith("latency")
    } | {"val_accuracy": {"method": "top-1 on the held-out split, inference mode", "resolution": res,
                          "dtype": "fp32", "batch_size": 64, "split": "val", "n": 288},
         "macs": {"method": "ptflops"}}
    ua["normalization"] = {"mean": [0.3, 0.3, 0.3], "std": [0.38, 0.38, 0.38]}
    ua["kd_history"] = {
        "val": [[round(t, 3), round(acc * (1 - math.exp(-t / 3)), 4)] for t in (2.5, 5.0, 7.5, 10.0)],
        "steps": 900, "epochs": 48.0, "images_seen": 57_600, "final_train_loss": 0.4, "stopped_early": False,
        "stop_requested_s": None, "cooldown_s": None, "teacher_forward_count": 0, "train_dtype": "fp32",
    }
    violation = float(n_params - PARAMS_LIMIT)
    ua["constraint_violations"] = {"params": violation}
    ua["feasible"] = violation <= 0
    if violation > 0:
        ua["infeasible_reason"] = f"params={n_params} > {PARAMS_LIMIT}"
    ua["artifact_id"] = f"{number:08x}-0000-4000-8000-{rng.getrandbits(48):012x}"
    ua["weights_sha256"] = f"{rng.getrandbits(256):064x}"
    return create_trial(state=TrialState.COMPLETE, values=[acc, lat], params=params, distributions=dists,
                        user_attrs=ua, constraints={"params": violation})


def make_study(run_dir: Path, n_trials: int = 1000, seed: int = 0) -> str:
    """Write the generated study to ``run_dir/<STUDY>/journal.log``; return its storage URL."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    folder = Path(run_dir) / STUDY
    folder.mkdir(parents=True, exist_ok=True)
    journal = folder / "journal.log"
    storage = JournalStorage(JournalFileBackend(str(journal)))
    study = optuna.create_study(study_name=STUDY, storage=storage, directions=["maximize", "minimize"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study.set_metric_names(["val_accuracy", "latency_ms_b1"])
    study.set_user_attr("config", {
        "study": {"name": STUDY, "sampler": "tpe", "trial_time": 10.0},
        "data": {"dataset": "digits", "val_fraction": 0.2, "seed": 0},
        "objectives": {"val_accuracy": "maximize", "latency_ms_b1": "minimize"},
        "constraints": {"params": PARAMS_LIMIT},
    })
    study.set_user_attr("environment", {"device": "cpu", "torch": "2.x", "python": "3.11", "host": "bench"})
    study.set_user_attr("time_spent_s", 10_400.0)
    study.set_user_attr("teachers", {"ViT-tiny": {"val_accuracy": 0.94, "test_accuracy": 0.93,
                                                  "weights_sha256": "ab" * 32}})
    study.set_user_attr("kdsearch_version", "bench")
    rng = random.Random(seed)
    study.add_trials([_trial(rng, i) for i in range(n_trials)])
    return f"journal:{journal}"


def wall_s(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the child) of one run of ``argv``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    dt = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return dt, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--keep", help="generate the study into this folder (kept) instead of a temp folder")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kdsearch-bench-report-") as tmp:
        run_dir = Path(args.keep) if args.keep else Path(tmp)
        t0 = time.perf_counter()
        url = make_study(run_dir, args.trials)
        print(f"generated {args.trials} trials in {time.perf_counter() - t0:.1f} s: {url}")
        py = [sys.executable, "-m", "kdsearch"]
        where = ["--study-name", STUDY, "--run-dir", str(run_dir)]
        cmds = {
            "kdsearch report": [*py, "report", *where, "--out", str(run_dir / "report.html")],
            "kdsearch trials --pareto": [*py, "trials", *where, "--pareto"],
        }
        for c in cmds.values():
            wall_s(c)
        worst = 0.0
        for name, c in cmds.items():
            runs = [wall_s(c) for _ in range(args.runs)]
            ts, cpu = [w for w, _ in runs], [c for _, c in runs]
            med = statistics.median(ts)
            worst = max(worst, med)
            print(f"{name:26s} median {med:6.2f} s wall (min {min(ts):.2f}, max {max(ts):.2f}, n={len(ts)}), "
                  f"{statistics.median(cpu):.2f} s CPU")
        print(f"worst {worst:.2f} s (target <= {TARGET_S} s); load average {os.getloadavg()[0]:.1f} "
              f"on {os.cpu_count()} CPUs")
    return 0 if worst <= TARGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
