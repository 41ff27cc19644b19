"""The first minute of ``make gpu-check``: the four things a first real GPU must confirm (issue 20).

1. **device banner** -- what ``kdsearch optimize`` prints before the first trial
   (``kdsearch.measure.device.describe_worker_device`` / ``format_device_banner``);
2. **precision** -- the training dtype kdsearch picks (``train_dtype_for``) against the rule:
   bf16 where the GPU runs bf16 natively (compute capability >= 8.0), fp16 + GradScaler below,
   fp32 on the CPU;
3. **probe vs box** -- ``probe_peak_memory_mb`` (the fail-fast probe, autotuner warmed) and
   ``peak_kd_memory_mb`` (a short box) of the same student in the same process agree within
   :data:`PROBE_BOX_TOLERANCE`;
4. **a Zeus energy window** -- ``EnergyMeter`` (Zeus) around a few seconds of KD steps gives
   joules > 0 with ``zeus-counter`` or ``zeus-power-poll``.

Writes one JSON (``--json``) with a ``checks`` table (name, ok, detail) and exits 1 when a check
that can run here fails. ``--dry`` runs the same code on the CPU: the CUDA-only checks are
recorded as skipped with the reason (and figures missing with theirs), never as passed.

    python benchmarks/gpu_first_minute.py --json first-minute.json [--dry]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

PROBE_BOX_TOLERANCE = 0.15  # |box - probe| / box
ENERGY_WINDOW_S = 3.0


def check_banner(device: torch.device) -> dict[str, Any]:
    try:
        from kdsearch.measure.device import describe_worker_device, format_device_banner  # noqa: PLC0415
    except ImportError as exc:  # helper e1-device's module; absent on a branch without it
        return {"name": "device banner", "ok": None, "detail": f"skipped: kdsearch.measure.device missing ({exc})"}
    info = describe_worker_device(device)
    banner = format_device_banner(info)
    ok = bool(banner) and (device.type != "cuda" or torch.cuda.get_device_name(device) in banner)
    return {"name": "device banner", "ok": ok, "detail": banner,
            "info": info if isinstance(info, dict) else getattr(info, "__dict__", str(info))}


def check_precision(device: torch.device) -> dict[str, Any]:
    from kdsearch.distill.precision import train_dtype_for  # noqa: PLC0415

    chosen = train_dtype_for(device, amp=True)
    if device.type != "cuda":
        return {"name": "precision", "ok": chosen == "fp32", "detail": f"cpu -> {chosen} (rule: fp32)"}
    major, minor = torch.cuda.get_device_capability(device)
    expected = "bf16" if major >= 8 else "fp16"
    try:
        native = torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # an older torch without the argument
        native = None
    return {"name": "precision", "ok": chosen == expected,
            "detail": f"cc {major}.{minor} -> {chosen} (rule: {expected}; native bf16: {native})"}


def _tiny_world(device: torch.device, dry: bool) -> tuple[Any, Any]:
    from kdsearch.config import DataConfig, DistillConfig  # noqa: PLC0415
    from kdsearch.data import ViewSpec, load_data, make_batch_source  # noqa: PLC0415
    from kdsearch.distill import KDHyper, distill  # noqa: PLC0415
    from kdsearch.models import StudentSpec, build_student  # noqa: PLC0415

    bundle = load_data(DataConfig(dataset="synthetic", synthetic_train_size=128 if dry else 4096,
                                  synthetic_test_size=32))
    if device.type == "cuda":
        bundle = bundle.to(device)
    source = make_batch_source(bundle.train, device, resident=True)
    arch = {"depth": 2, "width": 0.125} if dry else {"depth": 8, "width": 0.5}
    student = build_student(StudentSpec("vgg", 32, bundle.num_classes, arch)).to(device)
    cfg = DistillConfig(batch_size=32 if dry else 256, eval_subset=16 if dry else 64)

    class Done(Exception):
        pass

    def run(model: torch.nn.Module, meters: tuple, steps: int | None, box_s: float) -> None:
        def stop_after(step: int, loss: torch.Tensor) -> torch.Tensor:
            if steps is not None and step > steps:
                raise Done
            return loss

        try:
            distill(model, train=source, val=bundle.val, bundle=bundle, teacher_source=None,
                    hyper=KDHyper(4.0, 0.0, 0.05), cfg=cfg, time_box_s=box_s, resolution=32, device=device,
                    seed=0, view_spec=ViewSpec(bundle.image_size, 4, True), meters=meters, on_step=stop_after)
        except Done:
            pass

    return student, run


def check_probe_vs_box(device: torch.device, dry: bool) -> dict[str, Any]:
    import copy  # noqa: PLC0415

    from kdsearch.measure import KDMemoryTracker  # noqa: PLC0415
    from kdsearch.measure.memory import probe_kd_peak  # noqa: PLC0415

    student, run = _tiny_world(device, dry)
    copies = [copy.deepcopy(student)]  # the probe trains a copy, as the objective's does
    probe = KDMemoryTracker(device)
    probe_kd_peak(lambda n, meters: run(copies[0], tuple(meters), n, 60.0), probe, 3)
    copies.clear()
    box = KDMemoryTracker(device)
    with box:
        run(student, (box,), None, 0.3 if dry else 4.0)
    out = {"name": "probe vs box", "probe_peak_memory_mb": probe.value_mb, "peak_kd_memory_mb": box.value_mb,
           "method": box.method()}
    if probe.value_mb is None or box.value_mb is None:
        return {**out, "ok": None, "detail": f"skipped: {box.reason or probe.reason}"}
    rel = abs(box.value_mb - probe.value_mb) / max(box.value_mb, 1e-9)
    return {**out, "ok": rel <= PROBE_BOX_TOLERANCE,
            "detail": f"probe {probe.value_mb:.1f} MB, box {box.value_mb:.1f} MB, |diff|/box {rel:.3f} "
                      f"(tolerance {PROBE_BOX_TOLERANCE})"}


def check_energy(device: torch.device, dry: bool) -> dict[str, Any]:
    from kdsearch.measure import EnergyMeter  # noqa: PLC0415

    student, run = _tiny_world(device, dry)
    meter = EnergyMeter.for_device(device)
    with meter:
        run(student, (meter,), None, 0.3 if dry else ENERGY_WINDOW_S)
    r = meter.result
    assert r is not None
    out = {"name": "zeus energy window", "result": r.to_dict()}
    if r.method == "unavailable":
        return {**out, "ok": None if device.type != "cuda" else False, "detail": f"unavailable: {r.reason}"}
    ok = r.joules is not None and r.joules > 0 and r.method in ("zeus-counter", "zeus-power-poll")
    return {**out, "ok": ok, "detail": f"{r.method}: {r.joules} J over {r.window_s} s ({r.segments} segments), "
                                       f"{r.mean_power_w} W; reason {r.reason}"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--dry", action="store_true", help="the CPU: CUDA-only checks are skipped with the reason")
    args = ap.parse_args(argv)
    device = torch.device("cuda", 0) if torch.cuda.is_available() and not args.dry else torch.device("cpu")
    checks: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for name, fn in (("device banner", lambda: check_banner(device)), ("precision", lambda: check_precision(device)),
                     ("probe vs box", lambda: check_probe_vs_box(device, args.dry)),
                     ("zeus energy window", lambda: check_energy(device, args.dry))):
        t = time.perf_counter()
        try:
            res = fn()
        except Exception as exc:  # noqa: BLE001 - recorded as a failed check, the next one runs
            res = {"name": name, "ok": False, "detail": f"{type(exc).__name__}: {exc}"}
        res["wall_s"] = round(time.perf_counter() - t, 2)
        checks.append(res)
        print(f"{res['name']}: {'ok' if res['ok'] else 'SKIPPED' if res['ok'] is None else 'FAILED'} -- {res['detail']}",
              flush=True)
    data = {"device": str(device), "dry": args.dry, "wall_s": round(time.perf_counter() - t0, 1), "checks": checks}
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=2, default=str))
    return 1 if any(c["ok"] is False for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
