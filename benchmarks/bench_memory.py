"""GPU memory of a KD training step against the evaluation pass, with cudnn.benchmark on and off.

For each student (VGG-2 w1.0 @224, VGG-8 w0.5 @64, VGG-19 w1.0 @32; batch 256 as in
studies/cifar10-deit.yaml) it records, in MB above the baseline allocated before the step
(weights, optimiser state and the resident batch excluded):

* ``train_step_peak_mb``: forward + Hinton KD loss on cached fp16 teacher logits + backward +
  SGD step, bf16 autocast, channels_last (what ``peak_kd_memory_mb`` must measure);
* ``eval_fp32_b512_peak_mb``: the old in-loop validation (fp32, no autocast, batch 512, no_grad);
* ``eval_amp_inference_peak_mb``: evaluation as it should run (inference_mode, the training
  autocast, batch 256);
* ``reserved_mb``: what the caching allocator holds after the step (cuDNN workspaces included).

Peaks are ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, after two warm-up
steps (so cudnn.benchmark's autotuning has run). On the CPU every figure is missing with the reason.

    python benchmarks/bench_memory.py [--json memory.json] [--dry]
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from common import vgg_student, write_json

STUDENTS = ((2, 1.0, 224), (8, 0.5, 64), (19, 1.0, 32))
DRY_STUDENTS = ((2, 0.0625, 16),)
NUM_CLASSES = 10


def _mb(n_bytes: int) -> float:
    return round(n_bytes / 2**20, 1)


def measure_one(depth: int, width: float, res: int, batch: int, device: torch.device, cudnn_benchmark: bool) -> dict[str, object]:
    on_cuda = device.type == "cuda"
    torch.backends.cudnn.benchmark = cudnn_benchmark
    model = vgg_student(depth, width, res, NUM_CLASSES, device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, res, res, device=device)
    if on_cuda:
        x = x.to(memory_format=torch.channels_last)
    y = torch.randint(NUM_CLASSES, (batch,), device=device)
    t_logits = torch.randn(batch, NUM_CLASSES, device=device, dtype=torch.float16)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_cuda)

    def train_step() -> None:
        with amp:
            out = model(x)
            t = 4.0
            kd = F.kl_div(F.log_softmax(out.float() / t, 1), F.log_softmax(t_logits.float() / t, 1), log_target=True, reduction="batchmean")
            loss = 0.9 * t * t * kd + 0.1 * F.cross_entropy(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    row: dict[str, object] = {"student": f"vgg{depth}-w{width:g}@{res}", "batch": batch, "cudnn_benchmark": cudnn_benchmark}
    model.train()
    for _ in range(2):
        train_step()
    if not on_cuda:
        for key in ("train_step_peak_mb", "eval_fp32_b512_peak_mb", "eval_amp_inference_peak_mb", "reserved_mb"):
            row[key] = None
        row["missing_reason"] = "CUDA not available: torch.cuda.max_memory_allocated measures CUDA memory only"
        return row
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    for _ in range(3):
        train_step()
    torch.cuda.synchronize(device)
    row["train_step_peak_mb"] = _mb(torch.cuda.max_memory_allocated(device) - base)
    row["reserved_mb"] = _mb(torch.cuda.memory_reserved(device))
    opt.zero_grad(set_to_none=True)
    model.eval()
    xe = torch.randn(512, 3, res, res, device=device).to(memory_format=torch.channels_last)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    with torch.no_grad():
        model(xe)
    torch.cuda.synchronize(device)
    row["eval_fp32_b512_peak_mb"] = _mb(torch.cuda.max_memory_allocated(device) - base)
    del xe
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    with torch.inference_mode(), amp:
        model(x)
    torch.cuda.synchronize(device)
    row["eval_amp_inference_peak_mb"] = _mb(torch.cuda.max_memory_allocated(device) - base)
    return row  # the caller empties the allocator's cache once the model and batch are gone


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--dry", action="store_true", help="one tiny student on the CPU (figures missing)")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry else "cpu")
    students = DRY_STUDENTS if args.dry else STUDENTS
    batch = 8 if args.dry else 256
    rows = []
    failed = 0
    for depth, width, res in students:
        for bench in (True, False):
            try:
                rows.append(measure_one(depth, width, res, batch, device, bench))
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            except torch.OutOfMemoryError as exc:
                rows.append({"student": f"vgg{depth}-w{width:g}@{res}", "cudnn_benchmark": bench, "error": f"OOM: {exc}"[:300]})
                failed += 1
    write_json(args.json, {"device": str(device), "rows": rows})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
