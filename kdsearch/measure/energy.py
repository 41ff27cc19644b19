"""Energy through Zeus (the ML.ENERGY project's ``zeus``): kdsearch's definitions on top of it.

Zeus's :class:`zeus.monitor.ZeusMonitor` takes the readings: on an NVIDIA GPU the board's NVML
energy counter (Volta and newer) or, without it, power samples polled by a helper process and
integrated; AMD GPUs through amdsmi; CPU package (and DRAM) energy through RAPL. Zeus's own
project exercises that code on real hardware; kdsearch does not re-implement it. This module is
the thin adapter that turns Zeus windows into kdsearch's figures:

- :class:`EnergyMeter` -- one Zeus window per *active segment*: ``distill()`` pauses the meter
  with its training clock around every validation, so ``kd_energy_j`` is the sum of the training
  segments' windows (validation excluded; idle power included, nothing subtracted). ``window_s``
  is the active time and ``mean_power_w = joules / window_s``.
- :func:`measure_inference_energy` -- ``infer_energy_mj_per_image_b{N}``: a back-to-back
  inference loop inside one window, for at least ``measure.energy.infer_min_time`` *and*
  :data:`MIN_COUNTER_UPDATES` changes of the counter (at most :data:`MAX_WINDOW_FACTOR` x the
  minimum time), so the counter's steps (every few tens of ms) are a small part of the figure. On
  the trial's GPU (board energy), or with ``device="cpu"`` on the CPU through RAPL (package
  energy: the edge figure ``infer_energy_mj_per_image_b{N}_cpu``).
- Missing with a reason, never 0: no usable Zeus device (``"unavailable"`` and why), a window
  whose energy is 0 (the counter did not move: too short) or negative (a counter reset).

What Zeus cannot express, and is therefore kept here (all of it in the caller's thread, so
readings are taken and recorded in order; the old poll thread that read the counter outside its
lock, and could append readings out of order, is gone):

1. *Counting counter updates* for the inference window's length: Zeus's monitor returns a
   window's energy, not how often the counter moved in it. :meth:`EnergyMeter.note_counter` reads
   the counter through Zeus's device layer (``monitor.gpus.get_total_energy_consumption`` or
   ``monitor.cpus.get_total_energy_consumption``) between bursts of forwards and counts changes.
   With Zeus's power polling (no counter) the window lasts the minimum time.
2. *A MIG slice*: Zeus refuses ``CUDA_VISIBLE_DEVICES=MIG-...`` but not a MIG instance reached
   another way; the adapter refuses any device whose torch name says MIG (NVML reports the whole
   GPU, not the slice).
3. *A counter reset inside a segment* whose end still exceeds its start cannot be seen without a
   poll thread; a reset that makes a segment negative is (the figure is then missing).
4. *The driver version* for the environment record: Zeus has no call for it; :func:`nvml_status`
   asks NVML once (after Zeus initialised it).

Dropped from the hand-written meter: the list of other processes on the GPU (Zeus has no such
call; the preflight already refuses sharing a GPU between workers unless ``study.share_gpu``).

GPU index: Zeus's GPU indices, like torch's, count the GPUs after ``CUDA_VISIBLE_DEVICES`` (Zeus
accepts integer lists only; a UUID list makes Zeus fail, and the figure is missing with Zeus's
error). Monitors are built once per process and target (a counter-less GPU starts Zeus's power
polling process once), on first use: ``import zeus`` costs seconds (it imports scikit-learn), so
nothing here imports it at module level (``kdsearch --help`` never pays it).

Tests inject a stand-in for the monitor (``EnergyMeter(monitor=fake, ...)``, or
``monitor=`` on :func:`measure_inference_energy`): the adapter's rules are tested on the CPU.
"""

from __future__ import annotations

import functools
import itertools
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol

import torch
from torch import nn

from kdsearch.config import EnergyConfig
from kdsearch.measure._common import cpu_copy, example_input, model_dtype, resolve_device, uses_channels_last

__all__ = [
    "EnergyResult",
    "EnergyMeter",
    "ZeusLikeMonitor",
    "measure_inference_energy",
    "nvml_status",
    "energy_unavailable_reason",
    "cpu_energy_unavailable_reason",
    "MIN_COUNTER_UPDATES",
    "MAX_WINDOW_FACTOR",
    "CPU_REASON",
    "COUNTER_RESET_REASON",
    "kd_energy_metrics",
]

CPU_REASON = "cpu: board energy is measured on GPUs only (the CPU figure is the _cpu one, through RAPL)"
COUNTER_RESET_REASON = "counter reset during window"
MIG_REASON = "mig: NVML energy and power cover the whole GPU, not this MIG instance"
MIN_COUNTER_UPDATES = 20  # an inference window lasts until the counter moved this often (~10 % resolution)
MAX_WINDOW_FACTOR = 3.0  # ... but at most this many times measure.energy.infer_min_time
RAPL_DIRS = ("/sys/class/powercap/intel-rapl", "/zeus_sys/class/powercap/intel-rapl")  # Zeus's two places

Target = Literal["gpu", "cpu"]


class ZeusLikeMonitor(Protocol):
    """What the adapter uses of :class:`zeus.monitor.ZeusMonitor` (tests pass a stand-in):
    ``begin_window``/``end_window`` (``end_window`` returns a Measurement with ``time``,
    ``gpu_energy`` and ``cpu_energy`` in J) and the device managers ``gpus``/``cpus``."""

    gpus: Any
    cpus: Any

    def begin_window(self, key: str, sync_execution: bool = True) -> None: ...

    def end_window(self, key: str, sync_execution: bool = True) -> Any: ...


@dataclass
class EnergyResult:
    """Energy of one window. ``joules`` is ``None`` whenever it could not be measured."""

    joules: float | None
    method: str  # "zeus-counter" | "zeus-power-poll" | "zeus-rapl" | "unavailable"
    reason: str | None = None
    gpu_name: str | None = None
    backend: str | None = None  # Zeus's device manager: NVIDIAGPUs, AMDGPUs, RAPLCPUs
    zeus: str | None = None  # Zeus's version
    temp_start_c: float | None = None
    temp_end_c: float | None = None
    window_s: float | None = None  # active (unpaused) time of the window, s
    segments: int | None = None  # active stretches, one Zeus window each (1 without pause/resume)
    paused_s: float | None = None  # time left out between pause() and resume(), s
    counter_updates: int | None = None  # counter changes seen by note_counter() (inference windows)
    mean_power_w: float | None = None  # joules / window_s

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- Zeus, imported and built lazily --------------------------------------------------------------

_MONITORS: dict[str, ZeusLikeMonitor] = {}


@functools.cache
def _zeus_version() -> str | None:
    try:
        from importlib.metadata import version  # noqa: PLC0415

        return version("zeus")
    except Exception:  # noqa: BLE001 - metadata only
        return None


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def _gpu_manager() -> tuple[Any | None, str | None]:
    """Zeus's GPU manager (NVML or amdsmi) or ``(None, reason)``; imports only ``zeus.device``."""
    try:
        from zeus.device import get_gpus  # noqa: PLC0415 - lazy on purpose (module docstring)
    except ImportError as exc:
        return None, f"zeus not importable ({exc}): pip install zeus"
    try:
        return get_gpus(), None
    except Exception as exc:  # noqa: BLE001 - any failure is a reason, not a crash
        return None, f"zeus: no GPU energy here ({_error(exc)})"


def cpu_energy_unavailable_reason() -> str | None:
    """Why CPU energy (RAPL through Zeus) cannot be measured here, or None when it can.

    Checks Zeus's RAPL folders first (no import at all when neither exists, as on most VMs and
    containers), then lets Zeus open them (the counters are root-only on Linux >= 5.10)."""
    if not any(os.path.exists(d) for d in RAPL_DIRS):
        return ("rapl: /sys/class/powercap/intel-rapl is not present (no RAPL exposed to this machine, "
                "e.g. a VM or a container without the powercap folder)")
    try:
        from zeus.device.cpu import get_cpus  # noqa: PLC0415
    except ImportError as exc:
        return f"zeus not importable ({exc}): pip install zeus"
    try:
        cpus = get_cpus()
    except Exception as exc:  # noqa: BLE001
        return f"rapl: not readable ({_error(exc)}); the energy_uj files are root-only unless made readable"
    if len(cpus) == 0:
        return "rapl: Zeus found no CPU package"
    return None


def _zeus_monitor(target: Target, index: int | None) -> tuple[ZeusLikeMonitor | None, str | None]:
    """A cached :class:`zeus.monitor.ZeusMonitor` for one GPU (no CPU packages) or for the CPU
    packages (no GPU), or ``(None, reason)``."""
    key = f"{target}:{index}"
    if key in _MONITORS:
        return _MONITORS[key], None
    if target == "gpu":
        gpus, reason = _gpu_manager()
        if gpus is None:
            return None, reason
        if index is None or index >= len(gpus):
            return None, f"zeus: GPU {index} is not among the {len(gpus)} GPUs Zeus sees"
    else:
        reason = cpu_energy_unavailable_reason()
        if reason is not None:
            return None, reason
    try:
        from zeus.monitor import ZeusMonitor  # noqa: PLC0415 - seconds to import (scikit-learn)

        if target == "gpu":
            monitor = ZeusMonitor(gpu_indices=[int(index or 0)], cpu_indices=[])
        else:
            monitor = ZeusMonitor(gpu_indices=[], cpu_indices=None)
    except Exception as exc:  # noqa: BLE001
        return None, f"zeus: monitor failed ({_error(exc)})"
    _MONITORS[key] = monitor
    return monitor, None


# -- the adapter ---------------------------------------------------------------------------------


class EnergyMeter:
    """Energy over the ``with`` block on one GPU (``target="gpu"``, Zeus GPU index ``index``) or
    on the CPU packages (``target="cpu"``), leaving out what lies between :meth:`pause` and
    :meth:`resume`. ``result`` is set by :meth:`stop` (and on exit). See the module docstring.

    ``monitor`` is a :class:`zeus.monitor.ZeusMonitor` (or a stand-in); ``None`` with
    ``unavailable_reason`` makes the meter measure nothing and say why. Prefer :meth:`for_device`.
    """

    def __init__(
        self,
        monitor: ZeusLikeMonitor | None,
        target: Target = "gpu",
        index: int | None = 0,
        *,
        unavailable_reason: str | None = None,
        gpu_name: str | None = None,
    ) -> None:
        self.monitor = monitor
        self.target = target
        self.index = index
        self.result: EnergyResult | None = None
        self._reason = unavailable_reason if monitor is None else None
        if monitor is None and self._reason is None:
            self._reason = "no energy monitor"
        self._gpu_name = gpu_name
        self._method = "unavailable"
        self._backend: str | None = None
        self._keys = itertools.count()
        self._open_key: str | None = None
        self._segment_j: list[float] = []
        self._segment_s: list[float] = []
        self._error: str | None = None
        self._t_start = 0.0
        self._temp_start: float | None = None
        self._last_counter: float | None = None
        self._updates = 0

    @classmethod
    def for_device(cls, device: torch.device | str | int | None, poll_interval_s: float = 0.02) -> EnergyMeter:
        """A meter for a torch device: CUDA -> that GPU's board (Zeus GPU index = torch index);
        CPU -> unavailable (board energy is a GPU figure; :meth:`for_cpu` measures the CPU).
        ``poll_interval_s`` is accepted for compatibility; Zeus chooses its own polling."""
        dev = resolve_device(device)
        if dev.type != "cuda":
            return cls(None, "gpu", None, unavailable_reason=CPU_REASON)
        name = None
        try:
            name = torch.cuda.get_device_name(dev)
        except Exception:  # noqa: BLE001 - metadata only
            pass
        if "MIG" in (name or "") or os.environ.get("CUDA_VISIBLE_DEVICES", "").startswith("MIG"):
            return cls(None, "gpu", dev.index, unavailable_reason=MIG_REASON, gpu_name=name)
        monitor, reason = _zeus_monitor("gpu", dev.index or 0)
        return cls(monitor, "gpu", dev.index or 0, unavailable_reason=reason, gpu_name=name)

    @classmethod
    def for_cpu(cls) -> EnergyMeter:
        """A meter for the CPU packages through RAPL (all packages: RAPL has no per-core figure)."""
        monitor, reason = _zeus_monitor("cpu", None)
        return cls(monitor, "cpu", None, unavailable_reason=reason)

    # -- readings ----------------------------------------------------------------------------------

    @property
    def method(self) -> str:
        """The method chosen at :meth:`start` (``"unavailable"`` before it)."""
        return self._method

    @property
    def unavailable_reason(self) -> str | None:
        """Why energy cannot be measured (method ``"unavailable"``), else None."""
        return self._reason if self._method == "unavailable" else None

    @property
    def counter_updates_so_far(self) -> int:
        """Counter changes seen by :meth:`note_counter` since :meth:`start`."""
        return self._updates

    def _choose_method(self) -> str:
        assert self.monitor is not None
        if self.target == "cpu":
            self._backend = type(self.monitor.cpus).__name__
            return "zeus-rapl"
        gpus = self.monitor.gpus
        self._backend = type(gpus).__name__
        if self._gpu_name is None:
            try:
                self._gpu_name = str(gpus.get_name(self.index))
            except Exception:  # noqa: BLE001 - metadata only
                pass
        return "zeus-counter" if gpus.supports_get_total_energy_consumption(self.index) else "zeus-power-poll"

    def read_counter_mj(self) -> float | None:
        """The cumulative energy counter (mJ) through Zeus's device layer, or None without one
        (Zeus's power polling). Raises what Zeus raises."""
        assert self.monitor is not None
        if self.target == "cpu":
            return float(sum(self.monitor.cpus.get_total_energy_consumption(i).cpu_mj
                             for i in range(len(self.monitor.cpus))))
        if self._method != "zeus-counter":
            return None
        return float(self.monitor.gpus.get_total_energy_consumption(self.index))

    def note_counter(self) -> None:
        """Read the counter and count a change (called by the inference loop between bursts, in
        the caller's thread: readings are recorded in the order they are taken)."""
        if self._method == "unavailable" or self.result is not None:
            return
        try:
            v = self.read_counter_mj()
        except Exception:  # noqa: BLE001 - a missed reading only delays the end of the loop
            return
        if v is None:
            return
        if self._last_counter is not None and v != self._last_counter:
            self._updates += 1
        self._last_counter = v

    def _temperature(self) -> float | None:
        if self.target != "gpu" or self.monitor is None:
            return None
        try:
            return float(self.monitor.gpus.get_gpu_temperature(self.index))
        except Exception:  # noqa: BLE001 - metadata only
            return None

    # -- lifecycle -----------------------------------------------------------------------------------

    def _begin(self) -> None:
        assert self.monitor is not None
        key = f"kdsearch-{id(self)}-{next(self._keys)}"
        self.monitor.begin_window(key, sync_execution=self.target == "gpu")
        self._open_key = key

    def _end(self) -> None:
        assert self.monitor is not None and self._open_key is not None
        key, self._open_key = self._open_key, None
        with warnings.catch_warnings():  # Zeus warns on a zero window; the adapter says why instead
            warnings.simplefilter("ignore")
            m = self.monitor.end_window(key, sync_execution=self.target == "gpu")
        if self.target == "cpu":
            joules = float(sum((m.cpu_energy or {}).values()))
        else:
            joules = float(m.gpu_energy[self.index])
        self._segment_j.append(joules)
        self._segment_s.append(float(m.time))

    def start(self) -> EnergyMeter:
        """Open the window (its first active segment)."""
        self.result = None
        if self.monitor is None:
            self._method = "unavailable"
            return self
        try:
            self._method = self._choose_method()
            self._temp_start = self._temperature()
            self._t_start = time.perf_counter()
            self._begin()
        except Exception as exc:  # noqa: BLE001
            self._method, self._reason = "unavailable", f"zeus: window did not open ({_error(exc)})"
        return self

    def pause(self) -> None:
        """Close the active segment (a no-op when unavailable, stopped or already paused)."""
        if self._method == "unavailable" or self.result is not None or self._open_key is None:
            return
        try:
            self._end()
        except Exception as exc:  # noqa: BLE001 - the sum is then unknown
            self._error = f"zeus: reading failed ({_error(exc)})"

    def resume(self) -> None:
        """Open a new active segment after :meth:`pause` (a no-op when not paused)."""
        if self._method == "unavailable" or self.result is not None or self._open_key is not None:
            return
        try:
            self._begin()
        except Exception as exc:  # noqa: BLE001
            self._error = f"zeus: reading failed ({_error(exc)})"

    def stop(self) -> EnergyResult:
        """End the window and build :attr:`result` (idempotent)."""
        if self.result is not None:
            return self.result
        meta = {"gpu_name": self._gpu_name, "backend": self._backend, "zeus": _zeus_version()}
        if self._method == "unavailable":
            self.result = EnergyResult(joules=None, method="unavailable", reason=self._reason, **meta)
            return self.result
        self.pause()
        wall = time.perf_counter() - self._t_start
        active = sum(self._segment_s)
        total = sum(self._segment_j)
        joules: float | None = None
        reason: str | None = None
        if self._error is not None:
            reason = self._error
        elif any(j < 0 for j in self._segment_j):
            reason = f"{COUNTER_RESET_REASON} (a segment read {min(self._segment_j):.4g} J)"
        elif total <= 0.0:
            reason = f"counter did not update during window ({active:.3f} s; too short)"
        else:
            joules = total
        self.result = EnergyResult(
            joules=joules,
            method=self._method,
            reason=reason,
            temp_start_c=self._temp_start,
            temp_end_c=self._temperature(),
            window_s=active,
            segments=len(self._segment_j),
            paused_s=max(0.0, wall - active),
            counter_updates=self._updates if self._last_counter is not None else None,
            mean_power_w=(joules / active) if joules is not None and active > 0 else None,
            **meta,
        )
        return self.result

    def __enter__(self) -> EnergyMeter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_inference_window(
    forward: Callable[[], object],
    images_per_forward: int,
    meter: EnergyMeter,
    min_time_s: float,
    cap_s: float,
    sync: Callable[[], None] = lambda: None,
    read_every_s: float = 0.02,
) -> tuple[int, EnergyResult]:
    """Run ``forward`` back to back inside ``meter`` (already started) until ``min_time_s`` and
    :data:`MIN_COUNTER_UPDATES` counter changes, or ``cap_s``; returns (images, the result).
    Bursts of 8 forwards keep a GPU queue full; ``sync`` waits for them before the clock is read;
    the counter is read at most every ``read_every_s``."""
    images = 0
    t0 = last_read = time.perf_counter()
    try:
        if meter.method != "unavailable":  # no point running the loop otherwise
            meter.note_counter()
            counted = meter.method in ("zeus-counter", "zeus-rapl")
            while True:
                for _ in range(8):
                    forward()
                images += 8 * images_per_forward
                sync()
                now = time.perf_counter()
                if now - last_read >= read_every_s:
                    meter.note_counter()
                    last_read = now
                ran = now - t0
                enough = not counted or meter.counter_updates_so_far >= MIN_COUNTER_UPDATES
                if ran >= cap_s or (ran >= min_time_s and enough):
                    meter.note_counter()
                    break
    finally:
        result = meter.stop()
    return images, result


def measure_inference_energy(
    model: nn.Module,
    resolution: int,
    batch_size: int,
    device: torch.device | str,
    cfg: EnergyConfig,
    in_chans: int = 3,
    max_s: float | None = None,
    *,
    on_cpu: bool = False,
    monitor: ZeusLikeMonitor | None = None,
) -> tuple[float | None, EnergyResult]:
    """Energy per image of inference, in mJ/image, and the full :class:`EnergyResult`.

    Back-to-back forwards of ``batch_size`` images (eval, inference mode) inside one Zeus window,
    after an untimed warm-up: see :func:`run_inference_window` and the module docstring.
    mJ/image = joules * 1000 / images. ``max_s`` (s) caps the loop below the caller's remaining
    time budget (never below ``infer_min_time_s``). ``on_cpu``: the CPU packages' energy (RAPL)
    of a CPU copy of the model (the edge figure), whatever ``device`` is; otherwise the board
    energy of ``device``'s GPU. ``monitor`` replaces Zeus (tests). ``None`` (with the result's
    ``reason``) when energy cannot be measured.
    """
    if not cfg.enabled:
        return None, EnergyResult(joules=None, method="unavailable", reason="disabled: measure.energy.enabled is false")
    dev = torch.device("cpu") if on_cpu else resolve_device(device)
    if monitor is not None:
        meter = EnergyMeter(monitor, "cpu" if on_cpu else "gpu", None if on_cpu else (dev.index or 0))
    elif on_cpu:
        meter = EnergyMeter.for_cpu()
    else:
        meter = EnergyMeter.for_device(dev)
    if meter.monitor is None:  # say why without running anything
        return None, meter.start().stop()
    first = next(iter(model.parameters()), None)
    net = cpu_copy(model) if on_cpu and first is not None and first.device.type != "cpu" else model
    x = example_input(batch_size, resolution, dev, model_dtype(net), in_chans, uses_channels_last(net))
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    cap_s = MAX_WINDOW_FACTOR * cfg.infer_min_time_s
    if max_s is not None:
        cap_s = max(cfg.infer_min_time_s, min(cap_s, max_s))
    was_training = net.training
    net.eval()
    try:
        with torch.inference_mode():
            for _ in range(3):
                net(x)
            sync()
            meter.start()
            images, result = run_inference_window(
                lambda: net(x), batch_size, meter, cfg.infer_min_time_s, cap_s, sync, cfg.poll_interval_s
            )
    finally:
        net.train(was_training)
    if result.joules is None or images == 0:
        return None, result
    return result.joules * 1000.0 / images, result


def nvml_status(device_index: int | None = 0) -> dict[str, Any]:
    """What Zeus can measure here, for the environment record: ``{"available", "reason",
    "gpu_name", "energy_counter", "backend", "driver", "rapl"}``. Imports ``zeus.device`` only (and
    asks NVML itself for the driver version, which Zeus does not expose). Never raises."""
    out: dict[str, Any] = {"rapl": cpu_energy_unavailable_reason() or "readable"}
    gpus, reason = _gpu_manager()
    if gpus is None:
        return {**out, "available": False, "reason": reason}
    out.update({"available": True, "reason": None, "backend": type(gpus).__name__})
    if type(gpus).__name__ == "NVIDIAGPUs":  # Zeus has no driver-version call; NVML is initialised by Zeus
        try:
            import pynvml  # noqa: PLC0415

            v = pynvml.nvmlSystemGetDriverVersion()
            out["driver"] = v.decode() if isinstance(v, bytes) else str(v)
        except Exception:  # noqa: BLE001 - metadata only
            out["driver"] = None
    if device_index is not None:
        try:
            out["gpu_name"] = str(gpus.get_name(device_index))
            out["energy_counter"] = bool(gpus.supports_get_total_energy_consumption(device_index))
        except Exception as exc:  # noqa: BLE001
            out["error"] = _error(exc)
    return out


def energy_unavailable_reason(device: torch.device | str | int | None = 0) -> str | None:
    """Why GPU board energy cannot be measured on ``device`` (a CUDA device or index), or None when
    it can: the checks a trial's meter makes (a GPU, not a MIG slice, Zeus's GPU manager, the GPU
    among Zeus's), without building the monitor (``zeus.device`` only). The preflight uses it to
    refuse an energy objective before a study starts."""
    if device is None:
        return CPU_REASON
    dev = torch.device("cuda", device) if isinstance(device, int) else resolve_device(device)
    if dev.type != "cuda":
        return CPU_REASON
    try:
        if "MIG" in torch.cuda.get_device_name(dev):
            return MIG_REASON
    except Exception:  # noqa: BLE001 - Zeus decides below
        pass
    if os.environ.get("CUDA_VISIBLE_DEVICES", "").startswith("MIG"):
        return MIG_REASON
    gpus, reason = _gpu_manager()
    if gpus is None:
        return reason
    if (dev.index or 0) >= len(gpus):
        return f"zeus: GPU {dev.index or 0} is not among the {len(gpus)} GPUs Zeus sees"
    return None


def kd_energy_metrics(meter_result: Any, images_seen: int, m: Any) -> None:
    """Set ``kd_energy_j`` (the training steps' energy), ``kd_energy_mj_per_image`` (per training
    image seen) and ``kd_mean_power_w`` in ``m`` (a :class:`~kdsearch.measure.suite.Measurements`)
    from the KD meter's ``result`` (None: the meter did not run); each missing with its reason."""
    e = meter_result
    how = e.to_dict() if e is not None else None
    names = ("kd_energy_j", "kd_energy_mj_per_image", "kd_mean_power_w")
    if e is None or e.joules is None:
        reason = f"{e.method}: {e.reason}" if e is not None else "meter did not run"
        for name in names:
            m.set_missing(name, reason, how)
        return
    m.set("kd_energy_j", e.joules, how)
    if images_seen > 0:
        m.set("kd_energy_mj_per_image", e.joules * 1000.0 / images_seen, {**(how or {}), "images": images_seen})
    else:
        m.set_missing("kd_energy_mj_per_image", "no training image was seen", how)
    if e.mean_power_w is not None:
        m.set("kd_mean_power_w", e.mean_power_w, how)
    else:
        m.set_missing("kd_mean_power_w", "the window had no length", how)
