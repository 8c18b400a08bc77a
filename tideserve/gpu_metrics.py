"""A worker's GPU state from NVML (the `nvidia-ml-py` package, imported as `pynvml`).

    sample("cuda:0")  -> GpuStats(utilization_pct, memory_used/total_bytes, power_w, temp_c)
    sample("cpu")     -> None

Workers put the sample in every Heartbeat (`Heartbeat.gpu`); the router exports it in /metrics
per worker and in /cluster; the autoscaler's utilization policy may count it as busy. Without
NVML (the package missing, no driver, a CPU worker) every sample is None: the metrics are
absent and nothing fails. NVML is initialised once per process, on first use; a reading is
kept for `MIN_INTERVAL_S`, so a fast heartbeat does not query the driver each time.

NOTE: NVML numbers GPUs physically; `cuda:N` counts the GPUs in CUDA_VISIBLE_DEVICES. The
mapping goes through that variable (indices or UUIDs), as CUDA does.
"""

from __future__ import annotations

import logging
import os
import time
from types import ModuleType

from tideserve.protocol import GpuStats

log = logging.getLogger(__name__)

MIN_INTERVAL_S = 1.0

_nvml: ModuleType | None = None
_nvml_state = "untried"  # "untried", "ok" or "unavailable"
_handles: dict[int, object] = {}
_last: dict[int, tuple[float, GpuStats | None]] = {}  # cuda index -> (when, reading)


def load_nvml() -> ModuleType | None:
    """The initialised pynvml module, or None (not installed, no driver); tried once."""
    global _nvml, _nvml_state
    if _nvml_state == "untried":
        _nvml_state = "unavailable"
        try:
            import pynvml

            pynvml.nvmlInit()
            _nvml, _nvml_state = pynvml, "ok"
        except Exception as e:  # ImportError, or pynvml.NVMLError without a driver
            log.info("no GPU metrics: NVML unavailable (%s)", e)
    return _nvml


def reset() -> None:
    """Forgets NVML and every cached reading (tests; a process that lost its driver)."""
    global _nvml, _nvml_state
    _nvml, _nvml_state = None, "untried"
    _handles.clear()
    _last.clear()


def cuda_index(device: str) -> int | None:
    """The CUDA ordinal of a device name ("cuda" = 0, "cuda:1" = 1); None when not CUDA."""
    kind, _, index = device.partition(":")
    if kind != "cuda":
        return None
    return int(index) if index.isdigit() else 0


def sample(device: str, now: float | None = None) -> GpuStats | None:
    """The GPU behind `device` now (or as read within MIN_INTERVAL_S); None without one."""
    index = cuda_index(device)
    if index is None:
        return None
    now = time.monotonic() if now is None else now
    cached = _last.get(index)
    if cached is not None and now - cached[0] < MIN_INTERVAL_S:
        return cached[1]
    nvml = load_nvml()
    stats = _read(nvml, index) if nvml is not None else None
    _last[index] = (now, stats)
    return stats


def _read(nvml: ModuleType, index: int) -> GpuStats | None:
    try:
        handle = _handle(nvml, index)
        util = nvml.nvmlDeviceGetUtilizationRates(handle)
        mem = nvml.nvmlDeviceGetMemoryInfo(handle)
    except Exception as e:  # pynvml.NVMLError: a GPU gone, or not supported
        log.debug("NVML cannot read GPU %d: %s", index, e)
        return None
    return GpuStats(
        utilization_pct=float(util.gpu),
        memory_used_bytes=int(mem.used),
        memory_total_bytes=int(mem.total),
        power_w=_optional(lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0),  # mW
        temperature_c=_optional(
            lambda: float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
        ),
    )


def _handle(nvml: ModuleType, index: int):
    handle = _handles.get(index)
    if handle is None:
        visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")]
        visible = [v for v in visible if v]
        name = visible[index] if index < len(visible) else str(index)
        if name.isdigit():
            handle = nvml.nvmlDeviceGetHandleByIndex(int(name))
        else:  # a UUID ("GPU-...") or a MIG device
            handle = nvml.nvmlDeviceGetHandleByUUID(name)
        _handles[index] = handle
    return handle


def _optional(read) -> float:
    try:
        return float(read())
    except Exception:  # pynvml.NVMLError_NotSupported on some boards
        return -1.0
