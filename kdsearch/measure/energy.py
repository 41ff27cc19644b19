"""GPU energy through NVML: the board's energy counter, or integrated power samples as a fallback.

:class:`EnergyMeter` measures the energy the whole board drew over a window (idle power
included, nothing subtracted), with one of three methods, recorded on every result:

- ``"nvml-counter"`` -- ``nvmlDeviceGetTotalEnergyConsumption`` (mJ since the driver loaded,
  Volta and newer): joules = (end - start) / 1000. A background thread reads the counter every
  ``poll_interval_s`` to count how often it changed (``counter_updates``) and to notice a reset.
- ``"nvml-power-poll"`` -- where the counter is not supported: a background thread samples
  ``nvmlDeviceGetPowerUsage`` (mW) every ``poll_interval_s`` and the samples are integrated with
  the trapezoid rule between the first and the last sample (both taken by the caller's thread, at
  the window's start and end).
- ``"unavailable"`` -- NVML cannot be imported or initialised, no permission, a MIG instance
  (NVML reports the whole GPU, not the slice), or a CPU device. ``joules`` is ``None`` and
  ``reason`` says why.

A measurement that cannot be trusted is never 0: ``joules`` is ``None`` with a ``reason``.

Pausing: :meth:`EnergyMeter.pause` / :meth:`EnergyMeter.resume` leave stretches out of the window
(``distill()`` pauses the meter with its training clock around every validation, so the KD
energy is that of the training steps). With the counter the window's energy is the sum of the
counter deltas over the active segments; with power polling only sample pairs that lie inside an
active segment are integrated (a sample is taken at every boundary). ``window_s`` is the active
time; ``mean_power_w`` is ``joules / window_s``.

Counter resolution: the counter advances in steps (every few tens of ms, depending on the GPU),
so a window's energy is uncertain by about two steps. :func:`measure_inference_energy` therefore
runs its loop for at least ``infer_min_time_s`` *and* :data:`MIN_COUNTER_UPDATES` counter updates
(up to :data:`MAX_WINDOW_FACTOR` x the minimum time), and the result records ``counter_updates``.

Counter going backwards: the counter is an unsigned 64-bit count of mJ, which at 1 kW wraps after
about 585 million years, so ``end < start`` (or any backward step seen by the poll thread) can
only be a reset (driver reload, GPU reset). The window's energy is then unknown: the method stays
``"nvml-counter"`` but ``joules`` is ``None`` with reason ``"counter reset during window"``.

Other processes: NVML's list of compute processes on the GPU is read at the start and the end;
pids other than ours make ``shared=True`` (their energy is in the figure). Inside a container NVML
may report host pids, so our own process can show up as "other"; the pids are stored to judge.

Every NVML call goes through the module returned by :func:`_load_nvml` (``import pynvml`` each
time), so tests can inject a stand-in with ``monkeypatch.setitem(sys.modules, "pynvml", fake)``.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from types import ModuleType
from typing import Any

import torch
from torch import nn

from kdsearch.config import EnergyConfig
from kdsearch.measure._common import example_input, model_dtype, resolve_device, uses_channels_last

__all__ = [
    "EnergyResult",
    "EnergyMeter",
    "measure_inference_energy",
    "nvml_status",
    "energy_unavailable_reason",
    "MIN_COUNTER_UPDATES",
    "MAX_WINDOW_FACTOR",
    "CPU_REASON",
    "COUNTER_RESET_REASON",
]

CPU_REASON = "cpu: NVML measures NVIDIA GPUs only"
COUNTER_RESET_REASON = "counter reset during window"
_NVML_TEMPERATURE_GPU = 0  # pynvml.NVML_TEMPERATURE_GPU
_NVML_DEVICE_MIG_ENABLE = 1  # pynvml.NVML_DEVICE_MIG_ENABLE
MIN_COUNTER_UPDATES = 20  # an inference window lasts until the counter moved this often (~10 % resolution)
MAX_WINDOW_FACTOR = 3.0  # ... but at most this many times measure.energy.infer_min_time


def _load_nvml() -> tuple[ModuleType | None, str | None]:
    """``(pynvml, None)`` or ``(None, reason)``. Imported on every call, never cached."""
    try:
        import pynvml  # noqa: PLC0415 - lazy on purpose, see module docstring
    except ImportError as exc:
        return None, f"nvml: pynvml not importable ({exc})"
    if pynvml is None:  # pragma: no cover - import already raises for a None entry
        return None, "nvml: pynvml not importable"
    return pynvml, None


def _nvml_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


@dataclass
class EnergyResult:
    """Energy of one window. ``joules`` is ``None`` whenever it could not be measured."""

    joules: float | None
    method: str  # "nvml-counter" | "nvml-power-poll" | "unavailable"
    reason: str | None = None
    gpu_name: str | None = None
    driver: str | None = None
    temp_start_c: float | None = None
    temp_end_c: float | None = None
    shared: bool = False
    other_pids: list[int] = field(default_factory=list)
    window_s: float | None = None  # active (unpaused) time of the window, s
    segments: int | None = None  # active stretches (1 without pause/resume)
    paused_s: float | None = None  # time left out between pause() and resume(), s
    counter_updates: int | None = None  # distinct counter values seen by the poll thread
    samples: int | None = None  # power samples integrated (power-poll method)
    mean_power_w: float | None = None  # joules / window_s
    fallback_reason: str | None = None  # why the counter was not used

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def nvml_status(device_index: int | None = 0) -> dict[str, Any]:
    """What NVML can do here, for the environment record: ``{"available", "reason", "gpu_name",
    "driver", "energy_counter"}``. Never raises."""
    nvml, reason = _load_nvml()
    if nvml is None:
        return {"available": False, "reason": reason}
    try:
        nvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - any failure is a reason, not a crash
        return {"available": False, "reason": f"nvml: init failed ({_nvml_error(exc)})"}
    out: dict[str, Any] = {"available": True, "reason": None}
    try:
        out["driver"] = _text(nvml.nvmlSystemGetDriverVersion())
        if device_index is not None:
            h = nvml.nvmlDeviceGetHandleByIndex(device_index)
            out["gpu_name"] = _text(nvml.nvmlDeviceGetName(h))
            try:
                nvml.nvmlDeviceGetTotalEnergyConsumption(h)
                out["energy_counter"] = True
            except Exception as exc:  # noqa: BLE001
                out["energy_counter"] = False
                out["energy_counter_reason"] = _nvml_error(exc)
    except Exception as exc:  # noqa: BLE001
        out["error"] = _nvml_error(exc)
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass
    return out


class EnergyMeter:
    """Context manager measuring GPU board energy over the ``with`` block (see module docstring).

    ``device_index`` is the NVML index of the GPU, or ``None`` for a CPU device (the result is then
    ``unavailable``). Prefer :meth:`for_device`, which maps a torch device to its NVML handle by
    UUID (correct under ``CUDA_VISIBLE_DEVICES``). ``result`` is set on exit (also by :meth:`stop`).
    """

    def __init__(
        self,
        device_index: int | None,
        poll_interval_s: float = 0.02,
        *,
        uuid: str | None = None,
        unavailable_reason: str | None = None,
    ) -> None:
        if poll_interval_s <= 0:
            raise ValueError(f"EnergyMeter: poll_interval_s must be > 0 (got {poll_interval_s!r})")
        self.device_index = device_index
        self.poll_interval_s = poll_interval_s
        self.uuid = uuid
        self.result: EnergyResult | None = None
        self._preset_reason = unavailable_reason
        self._nvml: ModuleType | None = None
        self._handle: Any = None
        self._method = "unavailable"
        self._reason: str | None = None
        self._fallback_reason: str | None = None
        self._meta: dict[str, Any] = {}
        self._pids_start: set[int] = set()
        self._t_start = 0.0
        self._e_start_mj: int | None = None
        self._active_since: float | None = None  # perf_counter s of the open segment's start
        self._segments: list[tuple[float, float]] = []  # closed active segments (perf_counter s)
        self._seg_counter_start: int | None = None  # counter at the open segment's start, mJ
        self._counter_total_mj = 0  # counter deltas of the closed segments, mJ
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._power: list[tuple[float, float]] = []  # (perf_counter s, W)
        self._counter_values: list[int] = []
        self._counter_backwards = False
        self._poll_errors = 0

    @classmethod
    def for_device(
        cls, device: torch.device | str | int | None, poll_interval_s: float = 0.02
    ) -> EnergyMeter:
        """A meter for a torch device: CPU -> unavailable; CUDA -> its GPU, found by UUID."""
        dev = resolve_device(device)
        if dev.type != "cuda":
            return cls(None, poll_interval_s, unavailable_reason=CPU_REASON)
        uuid = None
        try:
            raw = getattr(torch.cuda.get_device_properties(dev), "uuid", None)
            if raw is not None:
                uuid = str(raw)
        except Exception:  # noqa: BLE001 - fall back to the index
            uuid = None
        try:  # honours CUDA_VISIBLE_DEVICES (numbers or UUIDs)
            index = int(torch.cuda._get_nvml_device_index(dev))
        except Exception:  # noqa: BLE001 - private helper; the index is the best remaining guess
            index = dev.index or 0
        return cls(index, poll_interval_s, uuid=uuid)

    # -- NVML helpers -----------------------------------------------------------------------

    def _get_handle(self, nvml: ModuleType) -> Any:
        if self.uuid:
            for cand in (f"GPU-{self.uuid}", self.uuid):
                try:
                    return nvml.nvmlDeviceGetHandleByUUID(cand)
                except Exception:  # noqa: BLE001 - try the next spelling, then the index
                    continue
        return nvml.nvmlDeviceGetHandleByIndex(self.device_index)

    def _other_pids(self) -> set[int]:
        assert self._nvml is not None
        procs = self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle)
        me = os.getpid()
        return {int(p.pid) for p in procs if int(p.pid) != me}

    def _temperature(self) -> float | None:
        assert self._nvml is not None
        try:
            kind = getattr(self._nvml, "NVML_TEMPERATURE_GPU", _NVML_TEMPERATURE_GPU)
            return float(self._nvml.nvmlDeviceGetTemperature(self._handle, kind))
        except Exception:  # noqa: BLE001 - metadata only
            return None

    def _read_power_w(self) -> float:
        assert self._nvml is not None
        return float(self._nvml.nvmlDeviceGetPowerUsage(self._handle)) / 1000.0

    def _read_counter_mj(self) -> int:
        assert self._nvml is not None
        return int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def method(self) -> str:
        """The method chosen at :meth:`start` (``"unavailable"`` before it)."""
        return self._method

    @property
    def unavailable_reason(self) -> str | None:
        """Why :meth:`start` found energy unmeasurable (method ``"unavailable"``), else None."""
        return self._reason if self._method == "unavailable" else None

    @property
    def counter_updates_so_far(self) -> int:
        """Counter updates (counter method) or power samples (poll method) seen so far."""
        with self._lock:
            if self._method == "nvml-counter":
                return max(len(self._counter_values) - 1, 0)
            return len(self._power)

    def _unavailable(self, reason: str) -> None:
        self._method = "unavailable"
        self._reason = reason

    def start(self) -> EnergyMeter:
        self.result = None
        if self._preset_reason is not None or self.device_index is None:
            self._unavailable(self._preset_reason or CPU_REASON)
            return self
        nvml, reason = _load_nvml()
        if nvml is None:
            self._unavailable(reason or "nvml: not importable")
            return self
        try:
            nvml.nvmlInit()
        except Exception as exc:  # noqa: BLE001
            self._unavailable(f"nvml: init failed ({_nvml_error(exc)})")
            return self
        self._nvml = nvml
        try:
            self._handle = self._get_handle(nvml)
        except Exception as exc:  # noqa: BLE001
            self._unavailable(f"nvml: no handle for GPU {self.device_index} ({_nvml_error(exc)})")
            self._shutdown()
            return self
        try:
            mig = nvml.nvmlDeviceGetMigMode(self._handle)
            current = mig[0] if isinstance(mig, (tuple, list)) else mig
            if int(current) == getattr(nvml, "NVML_DEVICE_MIG_ENABLE", _NVML_DEVICE_MIG_ENABLE):
                self._unavailable("mig: NVML energy and power cover the whole GPU, not this MIG instance")
                self._shutdown()
                return self
        except Exception:  # noqa: BLE001 - not supported means no MIG
            pass
        for key, fn in (("gpu_name", "nvmlDeviceGetName"),):
            try:
                self._meta[key] = _text(getattr(nvml, fn)(self._handle))
            except Exception:  # noqa: BLE001
                self._meta[key] = None
        try:
            self._meta["driver"] = _text(nvml.nvmlSystemGetDriverVersion())
        except Exception:  # noqa: BLE001
            self._meta["driver"] = None
        self._meta["temp_start_c"] = self._temperature()
        try:
            self._pids_start = self._other_pids()
        except Exception:  # noqa: BLE001 - the process list is not supported everywhere
            self._pids_start = set()
        # Counter first; power polling where the counter is not supported.
        try:
            self._e_start_mj = self._read_counter_mj()
            self._counter_values = [self._e_start_mj]
            self._method = "nvml-counter"
        except Exception as exc:  # noqa: BLE001
            self._fallback_reason = f"energy counter not supported ({_nvml_error(exc)})"
            try:
                first = (time.perf_counter(), self._read_power_w())
            except Exception as exc2:  # noqa: BLE001
                self._unavailable(
                    f"nvml: neither energy counter ({_nvml_error(exc)}) nor power reading ({_nvml_error(exc2)})"
                )
                self._shutdown()
                return self
            self._power = [first]
            self._method = "nvml-power-poll"
        self._stop.clear()
        self._t_start = self._power[0][0] if self._method == "nvml-power-poll" else time.perf_counter()
        self._active_since = self._t_start
        self._segments = []
        self._seg_counter_start = self._e_start_mj
        self._counter_total_mj = 0
        self._thread = threading.Thread(target=self._poll, name="kdsearch-energy-poll", daemon=True)
        self._thread.start()
        return self

    def _take_reading(self, t: float) -> int | None:
        """Read the counter (mJ, returned) or a power sample at ``t`` and record it; a counter that
        went backwards is flagged. Raises what NVML raises."""
        if self._method == "nvml-counter":
            v = self._read_counter_mj()
            with self._lock:
                if v < self._counter_values[-1]:
                    self._counter_backwards = True
                if v != self._counter_values[-1]:
                    self._counter_values.append(v)
            return v
        sample = (t, self._read_power_w())
        with self._lock:
            self._power.append(sample)
        return None

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            try:
                self._take_reading(time.perf_counter())
            except Exception:  # noqa: BLE001 - a missed sample is counted, not fatal
                self._poll_errors += 1

    def pause(self) -> None:
        """Leave what follows out of the window until :meth:`resume` (a no-op when unavailable,
        stopped or already paused). Readings failing here are counted as poll errors."""
        if self._method == "unavailable" or self.result is not None or self._active_since is None:
            return
        t = time.perf_counter()
        try:
            self._end_segment_reading(t)
        except Exception:  # noqa: BLE001
            self._poll_errors += 1
        self._segments.append((self._active_since, t))
        self._active_since = None

    def resume(self) -> None:
        """Start a new active segment after :meth:`pause` (a no-op when not paused)."""
        if self._method == "unavailable" or self.result is not None or self._active_since is not None:
            return
        t = time.perf_counter()
        try:
            v = self._take_reading(t)
            if v is not None:
                self._seg_counter_start = v
        except Exception:  # noqa: BLE001
            self._poll_errors += 1
            if self._method == "nvml-counter":
                self._counter_backwards = True  # the segment's start is unknown: no trustworthy sum
        self._active_since = t

    def _end_segment_reading(self, t: float) -> int | None:
        """Take the reading that ends the open segment at ``t`` and, on the counter, add the
        segment's energy to the total (a counter that went backwards is flagged). Returns the
        counter reading (mJ), None when polling power; raises when the reading fails."""
        v = self._take_reading(t)
        if v is not None:
            assert self._seg_counter_start is not None
            if v < self._seg_counter_start:
                self._counter_backwards = True
            self._counter_total_mj += v - self._seg_counter_start
        return v

    def _integrate_active(self, pts: list[tuple[float, float]]) -> float:
        """Trapezoid integral (J) of the power samples over the active segments only."""
        segments = list(self._segments)
        total = 0.0
        for (t0, p0), (t1, p1) in itertools.pairwise(pts):
            if any(a <= t0 and t1 <= b for a, b in segments):
                total += (t1 - t0) * (p0 + p1) / 2.0
        return total

    def stop(self) -> EnergyResult:
        """End the window and build :attr:`result` (idempotent)."""
        if self.result is not None:
            return self.result
        if self._method == "unavailable":
            self.result = EnergyResult(
                joules=None, method="unavailable", reason=self._reason, **self._meta_fields()
            )
            self._shutdown()
            return self.result
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        joules: float | None = None
        reason: str | None = None
        updates: int | None = None
        samples: int | None = None
        end_mj: int | None = None
        try:
            if self._active_since is not None:  # close the open segment with a final reading
                t = time.perf_counter()
                end_mj = self._end_segment_reading(t)
                self._segments.append((self._active_since, t))
                self._active_since = None
            t_end = self._segments[-1][1] if self._segments else time.perf_counter()
            if self._method == "nvml-counter":
                assert self._e_start_mj is not None
                updates = len(self._counter_values) - 1
                last = end_mj if end_mj is not None else self._counter_values[-1]
                if self._counter_backwards or last < self._e_start_mj:
                    reason = f"{COUNTER_RESET_REASON} (start {self._e_start_mj} mJ, end {last} mJ)"
                elif updates == 0:
                    reason = (
                        f"counter did not update during window ({t_end - self._t_start:.3f} s; too short)"
                    )
                else:
                    joules = self._counter_total_mj / 1000.0
            else:
                pts = sorted(self._power)
                samples = len(pts)
                joules = self._integrate_active(pts)
        except Exception as exc:  # noqa: BLE001
            t_end = time.perf_counter()
            joules, reason = None, f"nvml: final reading failed ({_nvml_error(exc)})"
        meta = self._meta_fields()
        meta["temp_end_c"] = self._temperature()
        other = set(self._pids_start)
        try:
            other |= self._other_pids()
        except Exception:  # noqa: BLE001
            pass
        active = sum(b - a for a, b in self._segments) if self._segments else t_end - self._t_start
        window = active
        self.result = EnergyResult(
            joules=joules,
            method=self._method,
            reason=reason,
            shared=bool(other),
            other_pids=sorted(other),
            window_s=window,
            segments=len(self._segments),
            paused_s=max(0.0, (t_end - self._t_start) - active),
            counter_updates=updates,
            samples=samples,
            mean_power_w=(joules / window) if joules is not None and window > 0 else None,
            fallback_reason=self._fallback_reason,
            **meta,
        )
        self._shutdown()
        return self.result

    def _meta_fields(self) -> dict[str, Any]:
        return {
            "gpu_name": self._meta.get("gpu_name"),
            "driver": self._meta.get("driver"),
            "temp_start_c": self._meta.get("temp_start_c"),
            "temp_end_c": self._meta.get("temp_end_c"),
        }

    def _shutdown(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001
                pass
            self._nvml = None

    def __enter__(self) -> EnergyMeter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def measure_inference_energy(
    model: nn.Module,
    resolution: int,
    batch_size: int,
    device: torch.device | str,
    cfg: EnergyConfig,
    in_chans: int = 3,
    max_s: float | None = None,
) -> tuple[float | None, EnergyResult]:
    """Board energy per image of inference, in mJ/image, and the full :class:`EnergyResult`.

    Runs back-to-back forwards of ``batch_size`` images (fp32, eval, inference mode) inside an
    :class:`EnergyMeter`, after an untimed warm-up, for at least ``cfg.infer_min_time_s`` seconds
    and at least :data:`MIN_COUNTER_UPDATES` counter updates (power samples with the polling
    fallback), at most :data:`MAX_WINDOW_FACTOR` x ``infer_min_time_s``: the counter advances
    every few tens of ms, so the window spans many of its steps. mJ/image = joules * 1000 /
    images. ``max_s`` (s) caps the loop below the caller's remaining time budget (never below
    ``infer_min_time_s``). ``None`` (with the result's ``reason``) when energy cannot be measured:
    CPU device, disabled, or NVML unavailable.
    """
    dev = resolve_device(device)
    if not cfg.enabled:
        return None, EnergyResult(
            joules=None, method="unavailable", reason="disabled: measure.energy.enabled is false"
        )
    if dev.type != "cuda":
        return None, EnergyResult(joules=None, method="unavailable", reason=CPU_REASON)
    dtype = model_dtype(model)
    x = example_input(batch_size, resolution, dev, dtype, in_chans, uses_channels_last(model))
    was_training = model.training
    model.eval()
    images = 0
    try:
        with torch.inference_mode(), torch.cuda.device(dev):
            for _ in range(3):
                model(x)
            torch.cuda.synchronize(dev)
            meter = EnergyMeter.for_device(dev, cfg.poll_interval_s).start()
            try:
                if meter.method != "unavailable":  # no point running the loop otherwise
                    t0 = time.perf_counter()
                    cap_s = MAX_WINDOW_FACTOR * cfg.infer_min_time_s
                    if max_s is not None:
                        cap_s = max(cfg.infer_min_time_s, min(cap_s, max_s))
                    # Keep a few forwards queued so the GPU stays busy; check the clock between bursts.
                    while True:
                        for _ in range(8):
                            model(x)
                        images += 8 * batch_size
                        torch.cuda.synchronize(dev)
                        ran = time.perf_counter() - t0
                        if ran >= cap_s or (
                            ran >= cfg.infer_min_time_s and meter.counter_updates_so_far >= MIN_COUNTER_UPDATES
                        ):
                            break
            finally:
                result = meter.stop()
    finally:
        model.train(was_training)
    if result.joules is None or images == 0:
        return None, result
    return result.joules * 1000.0 / images, result


def energy_unavailable_reason(device: torch.device | str | int | None = 0) -> str | None:
    """Why NVML energy cannot be measured on ``device`` (a CUDA device or index), or None when it
    can: opens an :class:`EnergyMeter` the way a trial does (NVML import and init, the GPU's
    handle, MIG, the counter or a power reading) and closes it at once. Takes milliseconds;
    the preflight uses it to refuse an energy objective before a study starts."""
    if device is None:
        return CPU_REASON
    dev = torch.device("cuda", device) if isinstance(device, int) else resolve_device(device)
    if dev.type != "cuda":
        return CPU_REASON
    meter = EnergyMeter.for_device(dev).start()
    reason = meter.unavailable_reason
    meter.stop()
    return reason


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
