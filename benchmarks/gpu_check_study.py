"""The study step of ``make gpu-check``: a short real search on the GPU, then its trials and report.

Real run: JPEG CIFAR-10 (``--data-root``, image-folder layout, stored at 32 px, 20,000 training
images), a small ViT teacher (6 blocks, 192 wide, 4-px patches) fitted from random weights on the
GPU for 90 s in bf16, VGG students at 32-64 px in 60 s boxes, 1 worker, a 3 min 30 s budget that
includes the teacher fit and the cache build. Dry run (``--dry``): synthetic data, a 1-block
teacher fitted for 3 s, 2 s boxes, on the CPU. Writes ``study.yaml``, ``trials.json`` and
``report.html`` under ``--out``.

    python benchmarks/gpu_check_study.py --out DIR [--data-root PATH | --dry]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import yaml

GPU_STUDY: dict[str, object] = {
    "study": {"name": "gpu-check", "sampler": "tpe", "seed": 0, "budget": "3m30s", "trial_time": "60s",
              "grace": "60s", "n_startup_trials": 4, "workers": 1},
    "data": {"dataset": "imagefolder", "image_size": 32, "val_fraction": 0.05, "max_train_samples": 20000,
             "max_test_samples": 2000},
    "teacher": {"name": "vit_tiny_patch16_224", "label": "ViT-6x192",
                "model_kwargs": {"img_size": 32, "patch_size": 4, "depth": 6, "embed_dim": 192, "num_heads": 3},
                "fit": {"enabled": "true", "time": "90s", "lr": 0.001, "batch_size": 256},
                "cache": {"views": 8, "crop_padding": 4, "batch_size": 1024}},
    "student": {"family": "vgg", "resolution": [32, 64],
                "vgg": {"depth": [2, 3, 5, 8, 11], "width": {"low": 0.0625, "high": 1.0, "log": True}}},
    "distill": {"temperature": {"low": 1.0, "high": 8.0, "log": True}, "alpha": {"low": 0.3, "high": 0.95},
                "lr": 0.05, "batch_size": 256},
    "objectives": {"val_accuracy": "maximize", "latency_ms_b1": "minimize"},
    "measure": {"latency": {"batch_sizes": [1, 256], "max_time": "1s"}},
}
DRY_STUDY: dict[str, object] = {
    "study": {"name": "gpu-check", "sampler": "tpe", "seed": 0, "budget": "40s", "trial_time": "2s",
              "grace": "60s", "n_trials": 2, "workers": 1},
    "data": {"dataset": "synthetic", "num_classes": 4, "synthetic_train_size": 160, "synthetic_test_size": 64,
             "image_size": 16, "val_fraction": 0.2},
    "teacher": {"name": "vit_tiny_patch16_224", "label": "ViT-tiny",
                "model_kwargs": {"img_size": 16, "patch_size": 4, "depth": 1, "embed_dim": 32, "num_heads": 2},
                "fit": {"enabled": "true", "time": "3s", "lr": 0.003}, "cache": {"views": 2, "crop_padding": 2}},
    "student": {"family": "vgg", "resolution": [16], "vgg": {"depth": [2, 3], "width": 0.0625}},
    "distill": {"temperature": 4.0, "alpha": 0.7, "lr": 0.05, "batch_size": 32},
    "objectives": {"val_accuracy": "maximize", "macs": "minimize"},
    "measure": {"latency": {"batch_sizes": [1, 8], "min_repeats": 3, "max_repeats": 10, "max_time": "0.2s"}},
}


def run(argv: list[str], log_name: str, out: Path) -> tuple[int, str]:
    """Run one kdsearch command; its output goes to ``out/log_name`` and (the end) to stdout."""
    print("$ " + " ".join(argv), flush=True)
    res = subprocess.run(argv, capture_output=True, text=True)
    (out / log_name).write_text(res.stdout + res.stderr)
    print(res.stdout[-4000:] + res.stderr[-2000:], flush=True)
    return res.returncode, res.stdout


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--data-root", default=None, help="JPEG CIFAR-10 folder (train/, test/)")
    ap.add_argument("--dry", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.dry and not args.data_root:
        print("gpu_check_study: --data-root is required (see benchmarks/GPU.md: carry .data)", file=sys.stderr)
        return 2
    study = DRY_STUDY if args.dry else dict(GPU_STUDY, data=dict(GPU_STUDY["data"], root=args.data_root))  # type: ignore[arg-type]
    cfg = out / "study.yaml"
    cfg.write_text(yaml.safe_dump(study, sort_keys=False))
    kd = [sys.executable, "-m", "kdsearch"]
    run_dir = str(out / "runs")
    rc, _ = run(kd + ["optimize", "--config", str(cfg), "--run-dir", run_dir, "--plain"], "optimize.log", out)
    rc_t, trials_json = run(kd + ["trials", "--study-name", "gpu-check", "--run-dir", run_dir, "--json"], "trials-cmd.log", out)
    if rc_t == 0:
        (out / "trials.json").write_text(trials_json)
    rc_r, _ = run(kd + ["report", "--study-name", "gpu-check", "--run-dir", run_dir, "--out", str(out / "report.html")],
               "report.log", out)
    return max(rc, rc_t, rc_r)


if __name__ == "__main__":
    sys.exit(main())
