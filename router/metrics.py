"""The router's Prometheus metrics (a registry of its own, so tests can build many routers)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5, 5)
_GPU_GAUGES = (  # (GpuStats field, metric name suffix, help)
    ("utilization_pct", "utilization_percent", "GPU busy share of the last NVML sample period"),
    ("memory_used_bytes", "memory_used_bytes", "GPU memory in use (all processes)"),
    ("memory_total_bytes", "memory_total_bytes", "GPU memory"),
    ("power_w", "power_watts", "GPU power draw"),
    ("temperature_c", "temperature_celsius", "GPU temperature"),
)


class _EventCounts:
    """Exports the cluster's failure-handling counts (a dict it keeps) as one counter."""

    def __init__(self, counts: Callable[[], dict[str, int]]) -> None:
        self.counts = counts

    def collect(self):
        c = CounterMetricFamily(
            "tideserve_cluster_events",
            "failure handling: workers dropped, requests re-dispatched, parked, failed",
            labels=["event"],
        )
        for event, n in sorted(self.counts().items()):
            c.add_metric([event], n)
        yield c


class _KVTransferCounts:
    """Exports the prefill -> decode KV transfers that landed, by transport, as one counter."""

    def __init__(self, counts: Callable[[], dict[str, int]]) -> None:
        self.counts = counts

    def collect(self):
        c = CounterMetricFamily(
            "tideserve_kv_transfers",
            "prefill -> decode KV transfers that landed (the decode worker's first token), "
            "by transport: tcp, shm, gloo, nccl",
            labels=["transport"],
        )
        for transport, n in sorted(self.counts().items()):
            c.add_metric([transport], n)
        yield c


class RouterMetrics:
    def __init__(
        self,
        cluster_counts: Callable[[], dict[str, int]] = dict,
        kv_transfers: Callable[[], dict[str, int]] = dict,
    ) -> None:
        r = self.registry = CollectorRegistry()
        r.register(_EventCounts(cluster_counts))
        r.register(_KVTransferCounts(kv_transfers))
        self.requests = Counter(
            "tideserve_requests",
            "HTTP requests by endpoint and status",
            ["endpoint", "status"],
            registry=r,
        )
        self.ttft = Histogram(
            "tideserve_ttft_seconds",
            "time to first token",
            ["slo_class"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "tideserve_tpot_seconds",
            "time per output token after the first",
            ["slo_class"],
            buckets=_TPOT_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "tideserve_e2e_seconds",
            "request latency, end to end",
            ["slo_class"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter("tideserve_tokens", "tokens processed", ["kind"], registry=r)
        self.migration_pause = Histogram(
            "tideserve_migration_pause_seconds",
            "how long a migrated request stood still (its last stage and the commit)",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        self.migrations_inflight = Gauge(
            "tideserve_migrations_inflight", "live migrations under way", registry=r
        )
        self.inflight = Gauge(
            "tideserve_requests_inflight", "requests admitted and unfinished", registry=r
        )
        self.worker_queue = Gauge(
            "tideserve_worker_queued_prefill_tokens",
            "prompt tokens queued",
            ["worker", "role"],
            registry=r,
        )
        self.worker_running = Gauge(
            "tideserve_worker_running", "sequences running", ["worker", "role"], registry=r
        )
        self.worker_kv_used = Gauge(
            "tideserve_worker_kv_blocks_used", "KV blocks in use", ["worker", "role"], registry=r
        )
        self.worker_kv_total = Gauge(
            "tideserve_worker_kv_blocks_total", "KV blocks", ["worker", "role"], registry=r
        )
        # from each worker's heartbeat (NVML); absent for workers without a GPU or NVML
        self.gpu = {
            field: Gauge(f"tideserve_worker_gpu_{name}", doc, ["worker", "role"], registry=r)
            for field, name, doc in _GPU_GAUGES
        }

    def render(self, workers) -> bytes:
        for g in (
            self.worker_queue,
            self.worker_running,
            self.worker_kv_used,
            self.worker_kv_total,
            *self.gpu.values(),
        ):
            g.clear()
        for w in workers:
            labels = (w.worker_id, w.hello.role)
            s = w.stats
            self.worker_kv_total.labels(*labels).set(w.hello.num_kv_blocks)
            if s is not None:
                self.worker_queue.labels(*labels).set(s.queued_prefill_tokens)
                self.worker_running.labels(*labels).set(s.num_running)
                self.worker_kv_used.labels(*labels).set(s.kv_blocks_used)
            if s is not None and s.gpu is not None:
                for field, gauge in self.gpu.items():
                    value = getattr(s.gpu, field)
                    if value >= 0:  # -1: NVML does not report it on this GPU
                        gauge.labels(*labels).set(value)
        return generate_latest(self.registry)
