"""int8 for the edge on real data: a JPEG CIFAR-10 VGG student's accuracy drop and ORT CPU speed-up.

Runs the path a user runs, through the CLI:

1. ``kdsearch optimize`` on a generated one-trial study: CIFAR-10 as an image folder (the JPEG
   copy in ``../shared/data``, unpacked to ``--data``), a stratified subset of the training split
   (``--train-images``), a small ViT teacher fitted on the spot, one VGG student (``--depth``,
   ``--width``) at 32 px distilled for ``--box``; latency measured on the trial's device and in
   ONNX Runtime (``measure.latency.devices: [auto, ort-cpu]``).
2. ``kdsearch export --format onnx --quantize int8`` (static QDQ, ``--calibration-method``, with
   ``--calibration-images`` drawn from the training split).

and reports from the card: fp32 and int8 val/test accuracy through onnxruntime, the drop, the
top-1 agreement, and the ORT CPU latency (1 intra-op thread) at batch 1 and 64 with the int8
speed-up. ``--dry`` shrinks everything so that it runs in about a minute.

    mkdir -p /tmp/cifar10 && tar xzf ../shared/data/cifar10-jpeg.tar.gz -C /tmp/cifar10
    python benchmarks/bench_int8.py [--data /tmp/cifar10] [--work /tmp/bench-int8] [--json out.json] [--dry]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from common import environment_lines, format_table, summarize, time_interleaved, write_json

STUDY = "cifar10-int8"


def study_file(args: argparse.Namespace) -> dict:
    """The one-trial study: imagefolder CIFAR-10 subset, ViT teacher fitted here, one VGG student."""
    return {
        "study": {"name": STUDY, "sampler": "random", "seed": 0, "budget": "2h", "trial_time": f"{args.box}s",
                  "grace": f"{args.grace}s"},
        "data": {"dataset": "imagefolder", "root": str(args.data), "image_size": 32, "val_fraction": 0.1,
                 "max_train_samples": args.train_images, "max_test_samples": args.test_images, "seed": 0},
        "teacher": {
            "name": "vit_tiny_patch16_224", "label": "ViT-tiny",
            "model_kwargs": {"img_size": 32, "patch_size": 4, "depth": 4, "embed_dim": 96, "num_heads": 3},
            "fit": {"enabled": "true", "time": f"{args.teacher_fit}s", "lr": 0.002},
            "cache": {"views": 4, "crop_padding": 4},
        },
        "student": {"family": "vgg", "resolution": [32], "vgg": {"depth": [args.depth], "width": [args.width]}},
        "distill": {"temperature": 4.0, "alpha": args.alpha, "lr": 0.05, "batch_size": 128},
        "objectives": {"val_accuracy": "maximize", "latency_ms_b1_ort": "minimize"},
        "measure": {"latency": {"batch_sizes": [1, 64], "devices": ["auto", "ort-cpu"], "ort_threads": 1}},
    }


def kdsearch(*argv: object) -> float:
    """Run the kdsearch CLI in a subprocess (as a user would); return its wall time (s)."""
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "kdsearch", *map(str, argv)]
    print("$", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def interleaved(export: Path, resolution: int, steps: int) -> dict[str, dict[str, object]]:
    """fp32 and int8 ``model*.onnx`` timed in alternation (1 intra-op thread) at batch 1 and 64."""
    import numpy as np

    from kdsearch.measure.runtime_ort import ort_session

    sessions = {"fp32": ort_session(export / "model.onnx", 1), "int8": ort_session(export / "model.int8.onnx", 1)}
    out: dict[str, dict[str, object]] = {}
    for b, n in ((1, steps), (64, max(20, steps // 5))):
        x = np.random.default_rng(0).standard_normal((b, 3, resolution, resolution), dtype=np.float32)
        fns = {k: (lambda s=s, x=x: s.run(None, {"input": x})) for k, s in sessions.items()}
        summ = summarize(time_interleaved(fns, torch.device("cpu"), n, warmup=10))
        out[f"b{b}"] = {k: f"{v.median_ms:.4g} ms (IQR {v.p25_ms:.4g}-{v.p75_ms:.4g}, n={v.n})" for k, v in summ.items()}
        out[f"b{b}"]["speedup"] = summ["fp32"].median_ms / summ["int8"].median_ms
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=Path("/tmp/cifar10"), help="unpacked cifar10-jpeg (train/, test/)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-int8"), help="run and export folder")
    ap.add_argument("--json", default=None)
    ap.add_argument("--train-images", type=int, default=10000)
    ap.add_argument("--test-images", type=int, default=2000)
    ap.add_argument("--depth", type=int, default=5)
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--alpha", type=float, default=0.3, help="KD weight (the teacher fitted here is weak)")
    ap.add_argument("--box", type=int, default=300, help="KD time box, s")
    ap.add_argument("--teacher-fit", type=int, default=90, help="teacher fit time, s")
    ap.add_argument("--grace", type=int, default=600, help="study.grace, s: room for evaluation and measurement "
                    "on a loaded machine")
    ap.add_argument("--calibration-images", type=int, default=512)
    ap.add_argument("--calibration-method", default="minmax")
    ap.add_argument("--steps", type=int, default=300, help="interleaved fp32/int8 timing rounds at batch 1")
    ap.add_argument("--reuse", action="store_true", help="keep a finished run and export in --work; time only")
    ap.add_argument("--dry", action="store_true")
    args = ap.parse_args(argv)
    if args.dry:
        args.train_images, args.test_images, args.box, args.teacher_fit = 1000, 500, 10, 10
        args.calibration_images = min(args.calibration_images, 128)
    if not (args.data / "train").is_dir():
        raise SystemExit(f"--data {args.data}: no train/ folder; unpack ../shared/data/cifar10-jpeg.tar.gz there")
    env = environment_lines(torch.device("cpu"))
    args.work.mkdir(parents=True, exist_ok=True)
    cfg_path = args.work / "study.yaml"
    cfg_path.write_text(yaml.safe_dump(study_file(args), sort_keys=False))
    run_dir, out = args.work / "runs", args.work / "export"
    optimize_s = export_s = None
    if not (args.reuse and (out / "card.json").is_file()):
        optimize_s = kdsearch("optimize", "--config", cfg_path, "--run-dir", run_dir, "--n-trials", 1, "--plain")
        export_s = kdsearch(
            "export", "--study-name", STUDY, "--run-dir", run_dir, "--trial", 0, "--format", "onnx",
            "--quantize", "int8", "--calibration-images", args.calibration_images,
            "--calibration-method", args.calibration_method, "--out", out,
        )
    card = json.loads((out / "card.json").read_text())
    inter = interleaved(out, card["spec"]["resolution"], args.steps)
    q = card["quantization"]
    acc, lat, agree = q["accuracy"], q["latency_ms"], q["top1_agreement"]
    rows = [
        ["val accuracy (ORT)", f"{100 * acc['fp32']['val']:.2f}%", f"{100 * acc['int8']['val']:.2f}%",
         f"{100 * (acc['int8']['val'] - acc['fp32']['val']):+.2f} points"],
        ["test accuracy (ORT)", f"{100 * acc['fp32']['test']:.2f}%", f"{100 * acc['int8']['test']:.2f}%",
         f"{100 * (acc['int8']['test'] - acc['fp32']['test']):+.2f} points"],
        *[[f"ORT CPU latency b{b[1:]}, 1 thread", f"{lat['fp32'][b]:.4g} ms", f"{lat['int8'][b]:.4g} ms",
           f"{lat['speedup'][b]:.2f}x speed-up"] for b in lat["fp32"]],
        ["model file", f"{q['size_mb']['fp32']:.3g} MB", f"{q['size_mb']['int8']:.3g} MB",
         f"{q['size_mb']['fp32'] / q['size_mb']['int8']:.2f}x smaller"],
    ]
    data = {
        "student": card["student"], "params": card["metrics"].get("params", {}).get("value"),
        "macs": card["metrics"].get("macs", {}).get("value"),
        "pytorch_val_accuracy": acc["pytorch"].get("val_accuracy"), "quantization": q,
        "interleaved": inter, "optimize_s": optimize_s, "export_s": export_s, "environment": env, "settings": vars(args) | {
            "data": str(args.data), "work": str(args.work)},
    }
    write_json(args.json, data)
    print("\n".join(env))
    print(f"student {card['student']} ({data['params']} params, {data['macs']} MACs), teacher {card['teacher']}; "
          f"PyTorch val accuracy {100 * (acc['pytorch'].get('val_accuracy') or 0):.2f}%")
    print(f"calibration: {q['calibration']['method']}, {q['calibration']['images']} training images; "
          f"{q['format']}, activations {q['activations']}, weights {q['weights']}, reduce_range {q['reduce_range']}")
    print(f"top-1 agreement int8 vs fp32: val {100 * agree['val']:.2f}%, test {100 * agree['test']:.2f}% "
          f"({q['data']['n_val']} val, {q['data']['n_test']} test images)")
    if optimize_s is not None and export_s is not None:
        print(f"optimize {optimize_s:.0f} s, export {export_s:.0f} s")
    print("card (kdsearch export: fp32 then int8, adaptive repeats, median):")
    print(format_table(["figure", "fp32", "int8", "change"], rows))
    print("interleaved cross-check (fp32, int8, fp32, int8, ...; 1 intra-op thread; median and IQR):")
    print(format_table(
        ["batch", "fp32", "int8", "fp32 / int8"],
        [[b, v["fp32"], v["int8"], f"{v['speedup']:.2f}x"] for b, v in inter.items()],
    ))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
