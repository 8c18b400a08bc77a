"""GPU metrics: NVML readings reach the heartbeat, the router's /metrics and /cluster JSON, and
(when asked) the utilization policy; without NVML they are absent and nothing fails. NVML is a
fake module put in `sys.modules["pynvml"]`."""

from __future__ import annotations

import sys
import time
from types import SimpleNamespace

import pytest

from router.cluster import Worker
from router.metrics import RouterMetrics
from tideserve import gpu_metrics
from tideserve.policy.autoscale import (
    Bounds,
    Observation,
    UtilizationOptions,
    UtilizationPolicy,
    WorkerObs,
    busy_fraction,
)
from tideserve.protocol import PROTOCOL_VERSION, GpuStats, Heartbeat, Hello, decode, encode

GiB = 1 << 30


class FakeNVMLError(Exception):
    pass


class FakeNVML:
    """pynvml's calls the module uses, over a table of physical GPUs."""

    NVML_TEMPERATURE_GPU = 0
    NVMLError = FakeNVMLError

    def __init__(self, gpus: dict[int, dict], fail_init: bool = False, power: bool = True):
        self.gpus, self.fail_init, self.power = gpus, fail_init, power
        self.reads = 0

    def nvmlInit(self):
        if self.fail_init:
            raise FakeNVMLError("NVML Shared Library Not Found")

    def nvmlDeviceGetHandleByIndex(self, i):
        if i not in self.gpus:
            raise FakeNVMLError(f"no GPU {i}")
        return i

    def nvmlDeviceGetHandleByUUID(self, uuid):
        return next(i for i, g in self.gpus.items() if g["uuid"] == uuid)

    def nvmlDeviceGetUtilizationRates(self, h):
        self.reads += 1
        return SimpleNamespace(gpu=self.gpus[h]["util"], memory=0)

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(used=self.gpus[h]["used"], total=80 * GiB, free=0)

    def nvmlDeviceGetPowerUsage(self, h):
        if not self.power:
            raise FakeNVMLError("Not Supported")
        return 312_500  # mW

    def nvmlDeviceGetTemperature(self, h, sensor):
        return 64


GPUS = {
    0: {"util": 90, "used": 60 * GiB, "uuid": "GPU-aaa"},
    1: {"util": 10, "used": 5 * GiB, "uuid": "GPU-bbb"},
}


@pytest.fixture
def nvml(monkeypatch):
    gpu_metrics.reset()
    fake = FakeNVML(GPUS)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    yield fake
    gpu_metrics.reset()


def test_a_cuda_worker_samples_its_gpu(nvml):
    s = gpu_metrics.sample("cuda:1", now=100.0)
    assert s == GpuStats(10.0, 5 * GiB, 80 * GiB, 312.5, 64.0)
    assert gpu_metrics.sample("cuda", now=100.0).utilization_pct == 90.0


def test_readings_are_kept_for_a_second(nvml):
    gpu_metrics.sample("cuda:0", now=10.0)
    gpu_metrics.sample("cuda:0", now=10.5)
    assert nvml.reads == 1
    gpu_metrics.sample("cuda:0", now=11.2)
    assert nvml.reads == 2


def test_cuda_visible_devices_maps_to_physical_gpus(nvml, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")
    assert gpu_metrics.sample("cuda:0", now=1.0).utilization_pct == 10.0
    gpu_metrics.reset()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aaa")
    assert gpu_metrics.sample("cuda:0", now=1.0).utilization_pct == 90.0


def test_unsupported_power_reads_as_minus_one(monkeypatch):
    gpu_metrics.reset()
    monkeypatch.setitem(sys.modules, "pynvml", FakeNVML(GPUS, power=False))
    assert gpu_metrics.sample("cuda:0", now=1.0).power_w == -1.0
    gpu_metrics.reset()


def test_without_nvml_or_gpu_there_are_no_metrics_and_no_errors(monkeypatch):
    gpu_metrics.reset()
    assert gpu_metrics.sample("cpu") is None
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed: the import fails
    assert gpu_metrics.sample("cuda:0", now=1.0) is None
    gpu_metrics.reset()
    monkeypatch.setitem(sys.modules, "pynvml", FakeNVML(GPUS, fail_init=True))  # no driver
    assert gpu_metrics.sample("cuda:0", now=1.0) is None
    gpu_metrics.reset()
    monkeypatch.setitem(sys.modules, "pynvml", FakeNVML(GPUS))
    assert gpu_metrics.sample("cuda:7", now=1.0) is None  # a GPU NVML does not know
    gpu_metrics.reset()


def test_the_real_nvml_here_does_not_fail():
    gpu_metrics.reset()
    gpu_metrics.sample("cuda:0")  # None on a machine without a driver; a reading with one
    gpu_metrics.reset()


def heartbeat(wid: str, gpu: GpuStats | None) -> Heartbeat:
    return Heartbeat(wid, "ready", 0, 3, 0, 10, 100, 0, 8, gpu=gpu)


def worker(wid: str, gpu: GpuStats | None) -> Worker:
    hello = Hello(PROTOCOL_VERSION, wid, "decode", "127.0.0.1", "tcp://127.0.0.1:1", "m", 100,
                  16, 2048, "cuda:0" if gpu else "cpu", 1)  # fmt: skip
    hb, _ = decode(encode(heartbeat(wid, gpu)))  # as it arrives over the wire
    return Worker(hello, time.monotonic(), stats=hb)


def test_router_metrics_and_cluster_json_carry_gpu_stats_per_worker():
    gpu = GpuStats(87.0, 60 * GiB, 80 * GiB, 300.0, -1.0)
    workers = [worker("d0", gpu), worker("d1", None)]
    text = RouterMetrics().render(workers).decode()
    assert 'tideserve_worker_gpu_utilization_percent{role="decode",worker="d0"} 87.0' in text
    assert (
        'tideserve_worker_gpu_memory_total_bytes{role="decode",worker="d0"} 8.589934592e+10' in text
    )
    assert 'tideserve_worker_gpu_power_watts{role="decode",worker="d0"} 300.0' in text
    assert "tideserve_worker_gpu_temperature_celsius{" not in text  # not reported
    assert 'worker="d1"' not in "".join(ln for ln in text.splitlines() if "_gpu_" in ln)
    assert workers[0].as_json()["gpu"]["utilization_pct"] == 87.0
    assert "temperature_c" not in workers[0].as_json()["gpu"]
    assert workers[1].as_json()["gpu"] is None


def obs_worker(wid: str, running: int, gpu: float | None) -> WorkerObs:
    return WorkerObs(wid, "decode", "ready", running, 0, 0, 0, 100, 8, gpu_util_pct=gpu)


def test_the_utilization_policy_counts_gpu_busy_only_when_asked():
    w = obs_worker("d0", 1, 95.0)
    assert busy_fraction(w) == 1 / 8
    assert busy_fraction(w, use_gpu_utilization=True) == 0.95
    assert busy_fraction(obs_worker("d1", 1, None), use_gpu_utilization=True) == 1 / 8
    obs = Observation(
        now=0.0, workers=(w, obs_worker("d1", 1, 95.0)), starting={}, window_s=30.0,
        decode_tokens_per_s=0.0, prefill_tokens_per_s=0.0, ttft_p90_s=None, tpot_p90_s=None,
        queue_wait_p90_s=None, inflight={"interactive": 2}, waiting={},
    )  # fmt: skip
    off = UtilizationPolicy(Bounds(), UtilizationOptions()).decide(obs)
    on = UtilizationPolicy(Bounds(), UtilizationOptions(use_gpu_utilization=True)).decide(obs)
    assert not any(a.targets.get("decode", 0) > 2 for a in off)
    assert [a.targets["decode"] for a in on] == [3]  # 2 x 0.95 busy / 0.7 target
