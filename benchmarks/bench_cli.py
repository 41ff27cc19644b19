"""How fast the CLI answers: ``kdsearch --help`` wall time / ``python -c pass`` wall time.

Both are started as fresh processes with the same interpreter, interleaved (pass, help, pass, help,
...), ``--runs`` times each after one untimed warm-up run of each (file-system caches). The figure is
the ratio of the medians; the target is <= 3 (the CLI must not import torch, timm or Optuna's heavy
parts to print its help). Also reported: ``kdsearch trials --help`` and ``kdsearch optimize --help``.

The commands run in a temporary folder, so ``-m kdsearch`` imports the installed kdsearch of this
interpreter (an editable install: the checkout; a wheel: site-packages), never a ``kdsearch/``
folder that happens to be in the current directory. Run it with a wheel install's interpreter to
measure what a ``pip install`` user gets.

    python benchmarks/bench_cli.py [--runs 10]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time

TARGET = 3.0


def wall_s(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tempfile.gettempdir())
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args(argv)
    py = sys.executable
    cmds = {
        "python -c pass": [py, "-c", "pass"],
        "kdsearch --help": [py, "-m", "kdsearch", "--help"],
        "kdsearch optimize --help": [py, "-m", "kdsearch", "optimize", "--help"],
        "kdsearch trials --help": [py, "-m", "kdsearch", "trials", "--help"],
    }
    for c in cmds.values():
        wall_s(c)
    times: dict[str, list[float]] = {k: [] for k in cmds}
    for _ in range(args.runs):
        for name, c in cmds.items():
            times[name].append(wall_s(c))
    base = statistics.median(times["python -c pass"])
    worst = 0.0
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=4)
        ratio = statistics.median(ts) / base
        if name != "python -c pass":
            worst = max(worst, ratio)
        print(f"{name:28s} median {statistics.median(ts) * 1e3:7.1f} ms (IQR {q[0] * 1e3:.1f}-{q[2] * 1e3:.1f}, n={len(ts)})  ratio {ratio:.2f}")
    print(f"worst ratio {worst:.2f} (target <= {TARGET})")
    return 0 if worst <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
