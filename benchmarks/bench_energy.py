"""NVML energy on the GPU: which method is used, how often the counter updates, and what a KD
window and an inference window cost per image.

Figures (CUDA only; on the CPU every figure is missing with the reason):

* ``method``: ``nvml-counter`` (nvmlDeviceGetTotalEnergyConsumption), ``nvml-power-poll`` or
  ``unavailable``, as :class:`kdsearch.measure.EnergyMeter` chooses it;
* ``counter_update_period_ms``: median and spread of the intervals between distinct counter values,
  polled every 1 ms for ``--probe`` seconds under a matmul load (the windows that kdsearch measures
  must span many of these periods);
* ``kd_energy_j`` over ``--kd-time`` seconds of KD training steps of VGG-11 w0.5 @32 (batch 256,
  bf16), with ``kd_energy_mj_per_image`` and the mean power;
* ``infer_energy_mj_per_image`` at batch 1 and 256 (kdsearch's own measure_inference_energy).

    python benchmarks/bench_energy.py [--json energy.json] [--kd-time 8] [--probe 2] [--dry]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from common import vgg_student, write_json


def counter_period_ms(probe_s: float, device: torch.device) -> dict[str, object]:
    import pynvml

    pynvml.nvmlInit()
    try:
        h = pynvml.nvmlDeviceGetHandleByIndex(int(torch.cuda._get_nvml_device_index(device)))
        a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
        changes: list[float] = []
        last = pynvml.nvmlDeviceGetTotalEnergyConsumption(h)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < probe_s:
            a @ a  # keep the board busy so the counter moves
            v = pynvml.nvmlDeviceGetTotalEnergyConsumption(h)
            if v != last:
                changes.append(time.perf_counter())
                last = v
            time.sleep(0.001)
        torch.cuda.synchronize(device)
    finally:
        pynvml.nvmlShutdown()
    gaps = [(b - a_) * 1e3 for a_, b in zip(changes, changes[1:], strict=False)]
    if len(gaps) < 2:
        return {"counter_update_period_ms": None, "reason": f"only {len(changes)} counter changes in {probe_s} s"}
    q = statistics.quantiles(gaps, n=4)
    return {"counter_update_period_ms": round(statistics.median(gaps), 2), "p25_ms": round(q[0], 2),
            "p75_ms": round(q[2], 2), "changes": len(changes), "probe_s": probe_s}


def kd_window(kd_time_s: float, device: torch.device) -> dict[str, object]:
    from kdsearch.measure import EnergyMeter

    model = vgg_student(11, 0.5, 32, 10, device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batch = 256
    x = torch.randn(batch, 3, 32, 32, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(10, (batch,), device=device)
    t_logits = torch.randn(batch, 10, device=device, dtype=torch.float16)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x)
            kd = F.kl_div(F.log_softmax(out.float() / 4, 1), F.log_softmax(t_logits.float() / 4, 1), log_target=True, reduction="batchmean")
            loss = 0.9 * 16 * kd + 0.1 * F.cross_entropy(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(5):
        step()
    torch.cuda.synchronize(device)
    images = 0
    meter = EnergyMeter.for_device(device).start()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < kd_time_s:
        for _ in range(10):
            step()
        images += 10 * batch
        torch.cuda.synchronize(device)
    res = meter.stop()
    out: dict[str, object] = {"kd_energy_j": res.joules, "kd_images": images, "method": res.method,
                              "reason": res.reason, "window_s": res.window_s, "mean_power_w": res.mean_power_w,
                              "counter_updates": res.counter_updates, "gpu_name": res.gpu_name}
    out["kd_energy_mj_per_image"] = None if res.joules is None else round(res.joules * 1e3 / images, 4)
    return out


def infer_energy(device: torch.device) -> dict[str, object]:
    from kdsearch.config import EnergyConfig
    from kdsearch.measure import measure_inference_energy

    model = vgg_student(11, 0.5, 32, 10, device)
    out: dict[str, object] = {}
    for b in (1, 256):
        mj, res = measure_inference_energy(model, 32, b, device, EnergyConfig())
        out[f"infer_energy_mj_per_image_b{b}"] = mj
        out[f"infer_method_b{b}"] = res.method
        out[f"infer_window_s_b{b}"] = res.window_s
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--kd-time", type=float, default=8.0, help="seconds of KD steps inside the meter")
    ap.add_argument("--probe", type=float, default=2.0, help="seconds of counter polling")
    ap.add_argument("--dry", action="store_true", help="CPU: exercise the code path, figures missing")
    args = ap.parse_args(argv)
    from kdsearch.measure.energy import nvml_status

    data: dict[str, object] = {"nvml": nvml_status(0 if torch.cuda.is_available() else None)}
    if args.dry or not torch.cuda.is_available():
        from kdsearch.measure import EnergyMeter

        res = EnergyMeter.for_device("cpu").start().stop()
        data.update({"method": res.method, "kd_energy_j": res.joules, "reason": res.reason})
        write_json(args.json, data)
        return 0
    device = torch.device("cuda")
    ok = True
    for name, fn in (("counter", lambda: counter_period_ms(args.probe, device)), ("kd", lambda: kd_window(args.kd_time, device)),
                     ("inference", lambda: infer_energy(device))):
        try:
            data[name] = fn()
        except Exception as exc:  # noqa: BLE001 - record and go on
            data[name] = {"error": f"{type(exc).__name__}: {exc}"}
            ok = False
    kd = data.get("kd", {})
    if not isinstance(kd, dict) or not kd.get("kd_energy_j"):
        ok = False
    write_json(args.json, data)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
