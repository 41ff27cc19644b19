"""The measurement phase's hard time cap, held for a student whose CPU forward is slow.

VGG-19 w1.0 at 224 px costs about 19.6 GMAC per image: on a few CPU cores one batch-64 forward
takes tens of seconds, so uncapped CPU latency (``measure.latency.devices: [auto, cpu]``) once ran
past box + grace and killed the trial. This runs kdsearch's own ``measure_inference`` on that
student with ``devices: [auto, cpu]``, batch sizes 1 and 64, and a ``--budget`` (default 20 s),
and records the phase's wall time, which figures were measured, and which were refused with the
reason and the estimate. The cap holds when ``phase_s <= budget_s + tolerance`` (one forward of
the largest figure still running when the budget runs out is the tolerance: the check is made
between forwards).

    python benchmarks/bench_latency_cap.py [--json latency-cap.json] [--budget 20] [--dry]

``--dry`` uses VGG-11 w0.25 at 64 px and a 3 s budget so that it runs in seconds.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from common import vgg_student, write_json


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--budget", type=float, default=None, help="measurement budget, s (default 20, dry 3)")
    ap.add_argument("--dry", action="store_true")
    args = ap.parse_args(argv)
    from kdsearch.config import LatencyConfig, MeasureConfig
    from kdsearch.measure import measure_inference

    depth, width, res = (11, 0.25, 64) if args.dry else (19, 1.0, 224)
    budget = args.budget or (3.0 if args.dry else 20.0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = vgg_student(depth, width, res, 10, device).eval()
    cfg = MeasureConfig(latency=LatencyConfig(batch_sizes=(1, 64), devices=("auto", "cpu"), cpu_threads=1))
    t0 = time.perf_counter()
    m = measure_inference(model, res, device, cfg, budget_s=budget)
    phase_s = time.perf_counter() - t0
    lat = {k: v for k, v in m.values.items() if k.startswith("latency_ms")}
    missing = {k: v for k, v in m.missing.items() if k.startswith(("latency", "peak_infer", "infer_energy"))}
    # One in-flight forward may finish after the budget; bound it by the slowest measured batch-1 forward.
    b1 = max((v for k, v in lat.items() if v is not None and "_b1" in k), default=0.0) / 1e3
    tolerance_s = max(1.0, 2 * b1)
    data = {"student": f"vgg{depth}-w{width:g}@{res}", "device": str(device), "budget_s": budget,
            "phase_s": round(phase_s, 2), "tolerance_s": round(tolerance_s, 2),
            "cap_held": phase_s <= budget + tolerance_s, "measured": lat, "missing": missing}
    write_json(args.json, data)
    return 0 if data["cap_held"] else 1


if __name__ == "__main__":
    sys.exit(main())
