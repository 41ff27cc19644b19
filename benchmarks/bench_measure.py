"""How long the per-trial measurement phase takes, as a share of a 60 s KD box.

Builds a representative student (VGG-8 at width 0.25, 32 px, 10 classes; from kdsearch.models
when it is there, else an equivalent inline VGG), runs one untimed warm-up of
``kdsearch.measure.measure_inference`` with the default ``MeasureConfig`` on the available device
(CUDA if present, else CPU), then times ``--repeats`` full runs. Prints the median and spread,
the device and date, the per-step breakdown of the median run, and a table LAST.

Target: the phase takes <= 5% of a 60 s box (3 s). Exit code 1 if it could not measure (an
exception, or a latency figure missing); the target is reported, not enforced.

    python benchmarks/bench_measure.py [--repeats 5] [--box 60] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import time

import torch
from torch import nn

from kdsearch.config import MeasureConfig
from kdsearch.measure import collect_environment, measure_inference

TARGET_SHARE = 0.05


def _inline_vgg8(width: float = 0.25, num_classes: int = 10) -> nn.Module:
    """VGG-8 (5 conv blocks + 3 FC) with channels scaled by ``width``: conv-bn-relu, max-pools."""
    cfg = [64, "M", 128, "M", 256, "M", 512, "M", 512, "M"]
    layers: list[nn.Module] = []
    chs = 3
    for item in cfg:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
        else:
            out = max(1, round(int(item) * width))
            layers += [
                nn.Conv2d(chs, out, 3, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
            ]
            chs = out
    hidden = max(1, round(4096 * width))
    return nn.Sequential(
        *layers,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(chs, hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, num_classes),
    )


def build_model() -> tuple[nn.Module, str]:
    try:
        from kdsearch.models import StudentSpec, build_student

        spec = StudentSpec("vgg", 32, 10, {"depth": 8, "width": 0.25})
        return build_student(spec), f"kdsearch.models {spec.label}"
    except Exception as exc:  # noqa: BLE001 - the inline model is the same architecture
        return _inline_vgg8(), f"inline vgg8-w0.25@32 (kdsearch.models unavailable: {type(exc).__name__})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--box", type=float, default=60.0, help="KD time box, seconds")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    dev = torch.device(args.device)
    model, label = build_model()
    model = model.to(dev)
    cfg = MeasureConfig()
    env = collect_environment(dev)
    print(f"date: {dt.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(
        f"device: {dev} {env.get('device_name')} | cpu: {env.get('cpu_model')} x{env.get('cpu_count')}"
        f" | torch {env.get('torch')} | threads {env.get('torch_threads')}"
    )
    print(f"model: {label}, params {sum(p.numel() for p in model.parameters())}")
    print(
        f"config: latency batch_sizes={cfg.latency.batch_sizes} devices={cfg.latency.devices}"
        f" cpu_threads={cfg.latency.cpu_threads} warmup={cfg.latency.warmup}"
        f" repeats {cfg.latency.min_repeats}..{cfg.latency.max_repeats} max_time={cfg.latency.max_time_s}s;"
        f" energy enabled={cfg.energy.enabled} min_time={cfg.energy.infer_min_time_s}s"
    )

    try:
        warm = measure_inference(model, 32, dev, cfg)  # imports, allocator, autotuning
        runs = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            m = measure_inference(model, 32, dev, cfg)
            runs.append((time.perf_counter() - t, m))
    except Exception as exc:  # noqa: BLE001
        print(f"FAILED: could not measure: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1

    times = sorted(t for t, _ in runs)
    med = statistics.median(times)
    med_run = min(runs, key=lambda r: abs(r[0] - med))[1]
    missing_latency = [k for k, v in med_run.values.items() if k.startswith("latency") and v is None]
    print(f"warm-up run: {warm.elapsed_s:.3f} s")
    print("per-step wall time of the median run (s):")
    for step, s in sorted(med_run.timings_s.items(), key=lambda kv: -kv[1]):
        print(f"  {step:28s} {s:7.3f}")
    print("values of the median run:")
    for k, v in med_run.values.items():
        print(f"  {k:28s} {v!r:>24}  {med_run.missing.get(k, '')}")

    share = med / args.box
    spread = times[-1] - times[0]
    ok = share <= TARGET_SHARE
    print()
    print(
        f"| measure_inference phase ({dev.type}) | median s | min s | max s | spread s | n | share of {args.box:g} s box | target |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| {label} | {med:.3f} | {times[0]:.3f} | {times[-1]:.3f} | {spread:.3f} | {len(times)} |"
        f" {share:.1%} | <= {TARGET_SHARE:.0%} {'met' if ok else 'MISSED'} |"
    )
    if missing_latency:
        print(f"FAILED: latency not measured: {missing_latency}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
