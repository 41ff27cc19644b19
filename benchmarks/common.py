"""Shared pieces of the benchmark scripts: device choice, synchronised interleaved timing, tables.

Timings are ratios taken within one run: the steps being compared are interleaved (A, B, A, B,
...) so slow drift of a shared machine (clock boost, other processes) hits both sides alike.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence

import torch

__all__ = [
    "pick_device",
    "sync",
    "time_interleaved",
    "Summary",
    "summarize",
    "environment_lines",
    "format_table",
    "vgg_student",
    "write_json",
]


def pick_device(arg: str) -> torch.device:
    """``auto`` -> CUDA if visible else CPU; otherwise the named device (``cpu``, ``cuda``, ``cuda:1``)."""
    if arg == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(arg)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine")
    return dev


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    fns: dict[str, Callable[[], object]], device: torch.device, steps: int, warmup: int
) -> dict[str, list[float]]:
    """Seconds per call of each function: ``warmup`` untimed calls each, then ``steps`` rounds in
    which every function runs once, each call timed with ``perf_counter`` between device syncs."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(steps):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


class Summary:
    """Median and quartiles of a list of seconds, in ms."""

    def __init__(self, seconds: Sequence[float]) -> None:
        if len(seconds) < 2:
            raise ValueError("need at least two timings")
        q = statistics.quantiles(seconds, n=4)
        self.n = len(seconds)
        self.median_ms = statistics.median(seconds) * 1e3
        self.p25_ms, self.p75_ms = q[0] * 1e3, q[2] * 1e3

    @property
    def iqr_rel(self) -> float:
        """Interquartile range / median (the spread reported next to every figure)."""
        return (self.p75_ms - self.p25_ms) / self.median_ms

    def __str__(self) -> str:
        return f"{self.median_ms:.2f} ms (IQR {self.p25_ms:.2f}-{self.p75_ms:.2f}, n={self.n})"


def summarize(times: dict[str, list[float]]) -> dict[str, Summary]:
    return {name: Summary(v) for name, v in times.items()}


def environment_lines(device: torch.device) -> list[str]:
    lines = [
        f"date:   {dt.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"torch:  {torch.__version__} (CUDA build {torch.version.cuda or 'none'})",
        f"host:   {platform.node()} {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"{torch.get_num_threads()} torch threads",
    ]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        lines.append(
            f"device: {device} {props.name}, {props.total_memory / 2**30:.0f} GiB, driver CUDA {torch.version.cuda}"
        )
    else:
        lines.append(f"device: cpu ({platform.processor() or platform.machine()})")
    return lines


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain fixed-width table (readable in logs, no terminal needed)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    sep = "-+-".join("-" * w for w in widths)
    out = [" | ".join(c.ljust(w) for c, w in zip(cells[0], widths, strict=True)), sep]
    out += [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells[1:]]
    return "\n".join(out)


def vgg_student(depth: int, width: float, resolution: int, num_classes: int, device: torch.device) -> torch.nn.Module:
    """A seeded VGG student on ``device`` (channels_last on CUDA, as distill() runs it)."""
    from kdsearch.models import StudentSpec, build_student

    torch.manual_seed(0)
    spec = StudentSpec.from_dict(
        {"family": "vgg", "depth": depth, "width": width, "resolution": resolution, "num_classes": num_classes}
    )
    m = build_student(spec).to(device)
    return m.to(memory_format=torch.channels_last) if device.type == "cuda" else m


def write_json(path: str | None, data: object) -> None:
    """Write ``data`` as indented JSON to ``path`` (when given) and echo it."""
    import json

    text = json.dumps(data, indent=2, default=str)
    print(text)
    if path:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
