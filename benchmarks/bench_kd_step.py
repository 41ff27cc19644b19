"""Cost of a distillation step: cached teacher logits vs labels only vs an online teacher.

Figures (ratios taken within one run, steps interleaved A/B/A/B, device synchronised around each
step; warm-up first; median and interquartile range over ``--steps`` steps):

* P1  cached-KD step / CE-only step, same student, same batches. Both steps do the same data work
      as :func:`kdsearch.distill.distill` (one batch from the BatchSource, one view look-up, one
      ``apply_views``), so the difference is the logit gather plus the KL term. Target <= 1.10.
      Student: VGG-11 width 1/4 at 32 px on CUDA; VGG-8 width 1/4 at 32 px on the CPU (batch 128,
      a step is well over 5 ms). Cross-checked with the real loop: ``distill()`` for ``--loop-box``
      seconds in each mode, ratio of its seconds per step (skip with ``--loop-box 0``).
* P2  online-teacher KD step / cached KD step, same student. Teacher: DeiT-S
      (deit_small_patch16_224, random weights) at 224 px on CUDA; vit_tiny_patch16_224 at 128 px
      (4x the student's 32 px) on the CPU. Reported, no target.
* P3  (CUDA only) VGG-11 width 1.0 at 32 px, cached KD, bf16 autocast, channels_last: training
      throughput (img/s) and model FLOP utilisation = 3 * 2 * MACs * img/s / peak bf16 FLOP/s
      (forward + backward ~ 3 forwards; MACs from ptflops). Peak: dense bf16 tensor-core figure
      of the GPU (H100 SXM 989 TFLOP/s, H100 PCIe 756, H200 989, A100 312, L4 121, RTX 4090 165),
      or ``--peak-tflops``.

The teacher cache for P1/P2/P3 is built by a one-block ViT (its cost per look-up does not depend
on which teacher filled it). Exit code 1 if a requested figure could not be measured.

    python benchmarks/bench_kd_step.py [--device auto|cpu|cuda] [--figures P1,P2,P3]
                                       [--steps 30] [--warmup 5] [--threads N] [--loop-box 3]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from kdsearch.config import DataConfig, DistillConfig, TeacherCacheConfig, TeacherConfig
from kdsearch.data import DataBundle, apply_views, load_data, make_batch_source, sample_views
from kdsearch.distill import (
    KDHyper,
    OnlineTeacher,
    TeacherCache,
    TopKTargets,
    build_or_load_cache,
    distill,
    kd_loss,
    kd_loss_topk,
)
from kdsearch.models import StudentSpec, build_student, create_teacher, param_groups

from common import Summary, environment_lines, format_table, pick_device, summarize, time_interleaved

P1_TARGET = 1.10
BATCH = 128
NUM_CLASSES = 10
PEAK_BF16_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "H200": 989.0,
    "GH200": 989.0,
    "A100": 312.0,
    "L4": 121.0,
    "RTX 4090": 165.0,
}


def make_step(
    student: torch.nn.Module,
    mode: str,
    bundle: DataBundle,
    cache: TeacherCache,
    online: OnlineTeacher | None,
    resolution: int,
    device: torch.device,
) -> Callable[[], None]:
    """One training step of ``mode`` (ce | cached | online), doing what distill() does per step."""
    source = make_batch_source(bundle.train, device, resident=True)
    gen = torch.Generator().manual_seed(0)
    n = source.num_images
    on_cuda = device.type == "cuda"
    epoch_view_ids = torch.randint(cache.num_views, (n,), generator=gen).to(device)
    epoch_views = sample_views(n, 1, cache.view_spec, gen)[0].to(device)
    opt = torch.optim.SGD(param_groups(student, 5e-4), lr=0.01, momentum=0.9, nesterov=True)
    student.train()

    def batches():
        while True:
            yield from source.epoch(BATCH, gen, shuffle=True, drop_last=True)

    it = batches()

    def step() -> None:
        idx, images, labels = next(it)
        if mode == "cached":
            view_ids = epoch_view_ids[idx]
            views = cache.views[view_ids, idx]
            targets = cache.teacher_targets(view_ids, idx)
        else:
            views = epoch_views[idx]
            targets = (
                online.teacher_logits(views, images) if mode == "online" and online is not None else None
            )
        x = apply_views(
            images, views, cache.view_spec, resolution, bundle.mean, bundle.std, channels_last=on_cuda
        )
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_cuda):
            logits = student(x)
        if isinstance(targets, TopKTargets):
            loss = kd_loss_topk(logits, targets.values, targets.indices, targets.rest_logit, labels, 4.0, 0.9)
        else:
            loss = kd_loss(logits, targets, labels, 4.0, 0.9)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def student(depth: int, width: float, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    m = build_student(
        StudentSpec(family="vgg", resolution=32, num_classes=NUM_CLASSES, arch={"depth": depth, "width": width})
    )
    m = m.to(device)
    return m.to(memory_format=torch.channels_last) if device.type == "cuda" else m


def loop_seconds_per_step(
    bundle: DataBundle,
    cache: TeacherCache | None,
    view_cache: TeacherCache,
    depth: int,
    width: float,
    device: torch.device,
    box_s: float,
) -> float:
    source = make_batch_source(bundle.train, device, resident=True)
    r = distill(
        student(depth, width, device),
        train=source,
        val=bundle.val,
        bundle=bundle,
        teacher_source=cache,
        hyper=KDHyper(4.0, 0.9, 0.01),
        cfg=DistillConfig(eval_every_fraction=1.0),
        time_box_s=box_s,
        resolution=32,
        device=device,
        seed=0,
        view_spec=view_cache.view_spec,
    )
    return r.kd_time_s / r.steps


def peak_tflops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, f"--peak-tflops {override:g}"
    name = torch.cuda.get_device_properties(device).name
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_BF16_TFLOPS[key], f"{key} dense bf16 {PEAK_BF16_TFLOPS[key]:g} TFLOP/s"
    return None, f"unknown peak for {name!r} (give --peak-tflops)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    ap.add_argument("--figures", default="P1,P2,P3", help="comma-separated subset of P1,P2,P3")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per mode (>= 20)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    ap.add_argument(
        "--loop-box", type=float, default=3.0, help="seconds per distill() cross-check run; 0 = skip"
    )
    ap.add_argument(
        "--peak-tflops", type=float, default=None, help="override the GPU's peak bf16 TFLOP/s (P3)"
    )
    args = ap.parse_args()
    if args.steps < 20:
        ap.error("--steps must be >= 20")
    figures = {f.strip().upper() for f in args.figures.split(",") if f.strip()}
    if not figures <= {"P1", "P2", "P3"}:
        ap.error(f"--figures: unknown {sorted(figures - {'P1', 'P2', 'P3'})}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.backends.cudnn.benchmark = True
    for line in environment_lines(device):
        print(line)

    bundle = load_data(
        DataConfig(
            dataset="synthetic", synthetic_train_size=2304, synthetic_test_size=64, num_classes=NUM_CLASSES
        )
    )
    bundle = dataclasses.replace(bundle, train=bundle.train.to(device), val=bundle.val.to(device))
    torch.manual_seed(0)
    tiny = create_teacher(
        TeacherConfig(
            name="vit_tiny_patch16_224",
            model_kwargs={"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2},
        ),
        NUM_CLASSES,
        device,
    )
    with tempfile.TemporaryDirectory(prefix="bench-kd-") as cache_dir:
        cache = build_or_load_cache(
            tiny, bundle, TeacherCacheConfig(views=8, batch_size=512), Path(cache_dir), device
        )
    depth, width = (11, 0.25) if on_cuda else (8, 0.25)
    label = f"vgg{depth}-w{width:g}@32, batch {BATCH}" + (", bf16, channels_last" if on_cuda else ", fp32")
    print(f"student: {label}; train images {len(bundle.train)}; cache K={cache.num_views} on {cache.device}")

    rows: list[list[object]] = []
    failed: list[str] = []

    if "P1" in figures:
        try:
            base = student(depth, width, device)
            steps = {
                "ce": make_step(copy.deepcopy(base), "ce", bundle, cache, None, 32, device),
                "cached": make_step(copy.deepcopy(base), "cached", bundle, cache, None, 32, device),
            }
            s = summarize(time_interleaved(steps, device, args.steps, args.warmup))
            ratio = s["cached"].median_ms / s["ce"].median_ms
            print(f"P1 CE-only step {s['ce']}; cached-KD step {s['cached']}; ratio {ratio:.3f}")
            rows.append(
                [
                    "P1",
                    f"cached KD / CE-only step ({label})",
                    str(s["cached"]),
                    str(s["ce"]),
                    f"{ratio:.3f}",
                    f"<= {P1_TARGET:.2f} {'ok' if ratio <= P1_TARGET else 'MISSED'}",
                ]
            )
            if args.loop_box > 0:
                sp_ce = loop_seconds_per_step(bundle, None, cache, depth, width, device, args.loop_box)
                sp_kd = loop_seconds_per_step(bundle, cache, cache, depth, width, device, args.loop_box)
                r2 = sp_kd / sp_ce
                print(
                    f"P1 distill() {args.loop_box:g} s boxes: CE {sp_ce * 1e3:.2f} ms/step, cached {sp_kd * 1e3:.2f} ms/step"
                )
                rows.append(
                    [
                        "P1 loop",
                        f"distill() s/step, cached / CE ({args.loop_box:g} s box each, 1 run)",
                        f"{sp_kd * 1e3:.2f} ms",
                        f"{sp_ce * 1e3:.2f} ms",
                        f"{r2:.3f}",
                        f"<= {P1_TARGET:.2f}",
                    ]
                )
        except Exception:  # noqa: BLE001 - report and go on with the other figures
            traceback.print_exc()
            failed.append("P1")

    if "P2" in figures:
        try:
            if on_cuda:
                tname, tsize, tkw = "deit_small_patch16_224", 224, {}
            else:
                tname, tsize, tkw = "vit_tiny_patch16_224", 128, {"img_size": 128}
            torch.manual_seed(0)
            big = create_teacher(TeacherConfig(name=tname, model_kwargs=tkw), NUM_CLASSES, device)
            online = OnlineTeacher(big, cache.view_spec)
            base = student(depth, width, device)
            steps = {
                "cached": make_step(copy.deepcopy(base), "cached", bundle, cache, None, 32, device),
                "online": make_step(copy.deepcopy(base), "online", bundle, cache, online, 32, device),
            }
            s = summarize(time_interleaved(steps, device, args.steps, min(args.warmup, 3)))
            ratio = s["online"].median_ms / s["cached"].median_ms
            print(
                f"P2 cached step {s['cached']}; online step ({tname} @ {tsize}) {s['online']}; ratio {ratio:.1f}"
            )
            rows.append(
                [
                    "P2",
                    f"online ({tname} @ {tsize} px) / cached KD step",
                    str(s["online"]),
                    str(s["cached"]),
                    f"{ratio:.1f}",
                    "reported",
                ]
            )
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            failed.append("P2")

    if "P3" in figures:
        if not on_cuda:
            print("P3 skipped: bf16 training throughput / MFU is a CUDA figure (this run is on the CPU)")
            rows.append(["P3", "VGG-11 w1.0 @32 bf16 KD throughput", "-", "-", "-", "skipped: needs CUDA"])
        else:
            try:
                from kdsearch.measure import measure_complexity

                m = student(11, 1.0, device)
                macs, _params = measure_complexity(m, 32)
                step = make_step(m, "cached", bundle, cache, None, 32, device)
                s = Summary(time_interleaved({"kd": step}, device, args.steps, 10)["kd"])
                img_s = BATCH / (s.median_ms / 1e3)
                peak, peak_note = peak_tflops(device, args.peak_tflops)
                mfu = 3 * 2 * macs * img_s / (peak * 1e12) if peak else None
                mfu_txt = f"{mfu * 100:.1f} % of {peak_note}" if mfu is not None else peak_note
                print(
                    f"P3 VGG-11 w1.0 step {s}; {img_s:,.0f} img/s; {macs / 1e6:.1f} MMACs/img; MFU {mfu_txt}"
                )
                rows.append(
                    [
                        "P3",
                        f"VGG-11 w1.0 @32 bf16 cached KD, batch {BATCH}",
                        str(s),
                        "-",
                        f"{img_s:,.0f} img/s",
                        f"MFU {mfu_txt}",
                    ]
                )
            except Exception:  # noqa: BLE001
                traceback.print_exc()
                failed.append("P3")

    print()
    print(format_table(["figure", "what", "A (median, IQR)", "B (median, IQR)", "A / B", "target"], rows))
    if failed or not rows:
        print(f"could not measure: {', '.join(failed) or 'nothing requested'}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
