"""One prepared command that settles every GPU claim: ``make gpu-check``.

It runs the steps below in order, keeps going past a failed step, gives each step a wall-clock
limit, stops starting new steps once the whole deadline would be passed, and writes everything
under one folder (``--out``, default ``gpu-check-out/``):

=====================  =====================================================================
step                   what it writes
=====================  =====================================================================
environment            ``environment.json``: device, driver, torch/CUDA, date (and nvidia-smi)
first-minute           ``first-minute.json`` (``gpu_first_minute.py``): the device banner, the
                       precision chosen, probe vs box peak memory, a Zeus energy window
gpu-tests              ``gpu-tests.xml`` (JUnit) and the log of ``pytest -m gpu``
kd-step                ``bench_kd_step.py`` on CUDA: P1 cached/CE, P2 online DeiT-S/cached, P3 img/s
memory                 ``memory.json``: training-step peak vs eval pass, cudnn.benchmark on/off
energy                 ``energy.json``: Zeus method, counter update period, kd_energy_j per image
latency-cap            ``latency-cap.json``: the measurement phase's time cap for a slow student
study                  a short real study (JPEG CIFAR-10, ViT teacher fitted on the GPU),
                       ``trials.json`` and ``report.html``
summary                ``summary.md``: every figure, ready to paste into benchmarks/RESULTS.md
=====================  =====================================================================

``--dry`` (``make gpu-check GPU_CHECK_DRY=1``) runs the same steps with tiny sizes on the CPU in
under two minutes, and says which steps were skipped because they need CUDA. A test runs the dry
mode, so this script cannot rot between GPU runs. benchmarks/GPU.md says what has to travel to
the GPU machine and how.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


@dataclass
class Step:
    """One step: a command line, its wall-clock limit and whether it needs CUDA."""

    name: str
    argv: list[str]
    limit_s: float
    needs_cuda: bool = False
    outputs: list[str] = field(default_factory=list)  # files under --out that the step writes


@dataclass
class StepResult:
    name: str
    status: str  # ok | failed (rc N) | timeout | skipped: <why>
    wall_s: float
    log: str


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _environment(out: Path) -> dict[str, object]:
    """What a reader needs to trust the figures: device, driver, versions, date."""
    env: dict[str, object] = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
    }
    try:
        import torch

        env["torch"] = torch.__version__
        env["cuda_build"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            env["device"] = props.name
            env["device_memory_gib"] = round(props.total_memory / 2**30, 1)
            env["bf16_supported"] = torch.cuda.is_bf16_supported()
        else:
            env["device"] = f"cpu ({platform.processor() or platform.machine()})"
    except ImportError as exc:
        env["torch"] = f"not importable: {exc}"
    try:
        import pynvml

        pynvml.nvmlInit()
        env["driver"] = pynvml.nvmlSystemGetDriverVersion()
        pynvml.nvmlShutdown()
    except Exception as exc:  # noqa: BLE001 - recorded, not fatal
        env["driver"] = f"unavailable: {type(exc).__name__}: {exc}"
    smi = shutil.which("nvidia-smi")
    if smi:
        res = subprocess.run([smi], capture_output=True, text=True, timeout=30)
        (out / "nvidia-smi.txt").write_text(res.stdout + res.stderr)
    (out / "environment.json").write_text(json.dumps(env, indent=2))
    return env


def _unpack_cifar(dry: bool) -> tuple[Path | None, str]:
    """The JPEG CIFAR-10 folder for the study step: ``.data/cifar10`` (unpacked once from
    ``.data/cifar10-jpeg.tar.gz``, which benchmarks/GPU.md says to carry)."""
    if dry:
        return None, "dry mode: synthetic data instead of CIFAR-10"
    folder = ROOT / ".data" / "cifar10"
    if (folder / "train").is_dir():
        return folder, "found"
    tar = ROOT / ".data" / "cifar10-jpeg.tar.gz"
    if not tar.is_file():
        return None, f"missing {tar.relative_to(ROOT)}: copy ../shared/data/cifar10-jpeg.tar.gz there and carry .data"
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tar) as tf:
        tf.extractall(folder, filter="data")
    return folder, "unpacked"


def build_steps(out: Path, dry: bool, py: str) -> list[Step]:
    kd = [py, str(BENCH / "bench_kd_step.py")]
    kd += ["--device", "cpu", "--figures", "P1", "--steps", "20", "--warmup", "1", "--loop-box", "0"] if dry else [
        "--device", "cuda", "--figures", "P1,P2,P3", "--steps", "30", "--loop-box", "0"]
    study_out = out / "study"
    cifar, _why = _unpack_cifar(dry)
    study = [py, str(BENCH / "gpu_check_study.py"), "--out", str(study_out)]
    if dry:
        study.append("--dry")
    elif cifar is not None:
        study += ["--data-root", str(cifar)]
    pytest_args = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "--junitxml", str(out / "gpu-tests.xml"), str(ROOT / "tests")]
    mem = [py, str(BENCH / "bench_memory.py"), "--json", str(out / "memory.json")] + (["--dry"] if dry else [])
    energy = [py, str(BENCH / "bench_energy.py"), "--json", str(out / "energy.json")] + (["--dry"] if dry else [])
    cap = [py, str(BENCH / "bench_latency_cap.py"), "--json", str(out / "latency-cap.json")] + (["--dry"] if dry else [])
    first = [py, str(BENCH / "gpu_first_minute.py"), "--json", str(out / "first-minute.json")] + (["--dry"] if dry else [])
    return [
        Step("first-minute", first, 90 if dry else 60, outputs=["first-minute.json"]),
        Step("gpu-tests", pytest_args, 40 if dry else 120, outputs=["gpu-tests.xml"]),
        Step("kd-step", kd, 90 if dry else 75, needs_cuda=False),
        Step("memory", mem, 30 if dry else 45, needs_cuda=False, outputs=["memory.json"]),
        Step("energy", energy, 30 if dry else 40, needs_cuda=False, outputs=["energy.json"]),
        Step("latency-cap", cap, 30 if dry else 40, outputs=["latency-cap.json"]),
        Step("study", study, 60 if dry else 230, outputs=["study/trials.json", "study/report.html"]),
    ]


def run_step(step: Step, out: Path, remaining_s: float) -> StepResult:
    log_path = out / f"{step.name}.log"
    limit = min(step.limit_s, remaining_s)
    if limit < 5:
        log_path.write_text("skipped: the whole check's deadline leaves no time for this step\n")
        return StepResult(step.name, "skipped: out of time", 0.0, log_path.name)
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), str(BENCH), os.environ.get("PYTHONPATH", "")])))
    t0 = time.perf_counter()
    with log_path.open("w") as log:
        log.write("$ " + " ".join(step.argv) + "\n")
        log.flush()
        try:
            proc = subprocess.run(step.argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env, timeout=limit)
            status = "ok" if proc.returncode == 0 else f"failed (rc {proc.returncode})"
        except subprocess.TimeoutExpired:
            status = f"timeout after {limit:.0f} s"
    wall = time.perf_counter() - t0
    return StepResult(step.name, status, wall, log_path.name)


def _tail(path: Path, n: int = 25) -> str:
    lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
    return "\n".join(lines[-n:])


def _json_block(path: Path) -> str:
    if not path.is_file():
        return "(not written)"
    return "```json\n" + path.read_text() + "\n```"


def write_summary(out: Path, env: dict[str, object], results: list[StepResult], dry: bool, total_s: float) -> Path:
    lines = [
        f"# gpu-check {'(DRY: CPU, tiny sizes; CUDA-only figures are skipped)' if dry else ''}".rstrip(),
        "",
        f"- date: {env.get('date')}",
        f"- device: {env.get('device')}; driver: {env.get('driver')}",
        f"- torch {env.get('torch')}, CUDA build {env.get('cuda_build')}, cuDNN {env.get('cudnn')}, Python {env.get('python')}",
        f"- command: `make gpu-check{' GPU_CHECK_DRY=1' if dry else ''}`; total wall clock {total_s:.0f} s",
        "",
        "| step | status | wall s | log |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {r.name} | {r.status} | {r.wall_s:.1f} | {r.log} |" for r in results]
    lines += ["", "## first minute (gpu_first_minute.py)", "", "```", _tail(out / "first-minute.log", 8), "```"]
    lines += ["", "## kd-step (bench_kd_step.py)", "", "```", _tail(out / "kd-step.log", 12), "```"]
    lines += ["", "## memory (bench_memory.py)", "", _json_block(out / "memory.json")]
    lines += ["", "## energy (bench_energy.py)", "", _json_block(out / "energy.json")]
    lines += ["", "## latency cap (bench_latency_cap.py)", "", _json_block(out / "latency-cap.json")]
    lines += ["", "## gpu tests", "", "```", _tail(out / "gpu-tests.log", 15), "```"]
    lines += ["", "## study", "", "```", _tail(out / "study.log", 30), "```", ""]
    path = out / "summary.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "gpu-check-out"), help="folder for every output (created)")
    ap.add_argument("--dry", action="store_true", help="tiny sizes on the CPU; CUDA-only figures are skipped")
    ap.add_argument("--deadline", type=float, default=None, help="seconds for the whole check (default 390, dry 260)")
    ap.add_argument("--steps", default=None, help="comma-separated subset of step names (default: all)")
    args = ap.parse_args(argv)
    dry = args.dry or os.environ.get("GPU_CHECK_DRY", "") not in ("", "0")
    deadline_s = args.deadline or (260.0 if dry else 390.0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    env = _environment(out)
    cuda = _cuda_available()
    if not dry and not cuda:
        print("gpu-check: CUDA is not available here; run with GPU_CHECK_DRY=1 for the CPU dry mode", file=sys.stderr)
        return 2
    steps = build_steps(out, dry, sys.executable)
    if args.steps:
        wanted = set(args.steps.split(","))
        steps = [s for s in steps if s.name in wanted]
    results: list[StepResult] = []
    for step in steps:
        remaining = deadline_s - (time.perf_counter() - t0)
        print(f"== {step.name} (limit {min(step.limit_s, max(remaining, 0)):.0f} s)", flush=True)
        res = run_step(step, out, remaining)
        results.append(res)
        print(f"   {res.status} in {res.wall_s:.1f} s -> {out / res.log}", flush=True)
    total = time.perf_counter() - t0
    summary = write_summary(out, env, results, dry, total)
    print(f"summary: {summary} ({total:.0f} s)")
    return 0 if all(r.status == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
