"""What a dependency adds to kdsearch: install size of the packages new to the dependency closure,
and the time to import its modules after torch (CPU and wall seconds, a fresh process each run).

    python benchmarks/bench_dep_cost.py [--package zeus] [--modules zeus.monitor zeus.device] [--runs 3]
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import subprocess
import sys

from packaging.requirements import Requirement

# kdsearch's own dependencies before the one measured (pyproject.toml [project].dependencies)
BASE = ["torch", "torchvision", "timm", "optuna", "ptflops", "nvidia-ml-py", "plotly", "PyYAML", "rich",
        "safetensors", "filelock", "optuna-dashboard"]


def closure(roots: list[str]) -> dict[str, md.Distribution | None]:
    """Every installed distribution the ``roots`` require (no extras), by normalised name."""
    seen: dict[str, md.Distribution | None] = {}
    stack = list(roots)
    while stack:
        req = Requirement(stack.pop())
        name = req.name.lower().replace("_", "-")
        if name in seen:
            continue
        try:
            dist: md.Distribution | None = md.distribution(req.name)
        except md.PackageNotFoundError:
            dist = None
        seen[name] = dist
        for sub in (dist.requires or []) if dist else []:
            r = Requirement(sub)
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                stack.append(sub)
    return seen


def size_mb(dist: md.Distribution) -> float:
    total = 0
    for f in dist.files or []:
        try:
            total += os.path.getsize(dist.locate_file(f))
        except OSError:
            pass
    return total / 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--package", default="zeus")
    ap.add_argument("--modules", nargs="*", default=["zeus.monitor", "zeus.device"])
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)
    before, after = closure(BASE), closure(BASE + [args.package])
    new = {k: v for k, v in after.items() if k not in before}
    total = 0.0
    for name, dist in sorted(new.items(), key=lambda kv: -(size_mb(kv[1]) if kv[1] else 0)):
        mb = size_mb(dist) if dist else 0.0
        total += mb
        print(f"{name:24s} {mb:8.1f} MB  {dist.version if dist else 'not installed'}")
    print(f"{'total':24s} {total:8.1f} MB")
    code = ("import time, torch; c = time.process_time(); w = time.perf_counter(); import {m}; "
            "print(f'{{time.process_time() - c:.2f}} cpu s / {{time.perf_counter() - w:.2f}} wall s')")
    for m in args.modules:
        runs = [subprocess.run([sys.executable, "-c", code.format(m=m)], capture_output=True, text=True,
                               check=True).stdout.strip() for _ in range(args.runs)]
        print(f"import {m}: " + "; ".join(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
