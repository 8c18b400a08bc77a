"""Cost of a run in worker-seconds, read from the server while the run goes on.

Lifecycle: ``WorkerMeter.run`` is started beside the replay and polls ``GET /cluster`` once a
second (tideserve answers ``{"workers": [...]}``; every worker listed holds a device, whatever
its state). A server without ``/cluster`` is asked ``GET /metrics`` instead, and the distinct
``worker`` labels of ``tideserve_worker_kv_blocks_total`` are counted; a server with neither is
marked unsupported and left alone. When the run ends, the task is cancelled and
``worker_seconds(end_s)`` integrates the sampled count as a step function over the run.
"""

from __future__ import annotations

import asyncio
import json
import re
import time

import aiohttp

_POLL_TIMEOUT_S = 2.0
_METRIC_WORKER = re.compile(rb'^tideserve_worker_kv_blocks_total\{[^}]*worker="([^"]*)"', re.M)


class WorkerMeter:
    """Samples of (seconds from the run's start, number of workers)."""

    def __init__(self, session: aiohttp.ClientSession, endpoint: str, interval_s: float = 1.0):
        self.session = session
        self.endpoint = endpoint.rstrip("/")
        self.interval_s = interval_s
        self.samples: list[tuple[float, int]] = []
        self.source: str | None = None  # "/cluster" or "/metrics" once one answered
        self.is_supported = True  # False once neither endpoint answered

    async def run(self, t0: float) -> None:
        """Poll until cancelled; ``t0`` is the run's start on ``time.perf_counter``."""
        while self.is_supported:
            count = await self.poll()
            if count is not None:
                self.samples.append((time.perf_counter() - t0, count))
            await asyncio.sleep(self.interval_s)

    async def poll(self) -> int | None:
        """The worker count now; None when this poll failed."""
        for source in [self.source] if self.source else ["/cluster", "/metrics"]:
            count = await self._get(source)
            if count is not None:
                self.source = source
                return count
        if self.source is None:
            self.is_supported = False
        return None

    async def _get(self, source: str) -> int | None:
        try:
            async with self.session.get(
                self.endpoint + source, timeout=aiohttp.ClientTimeout(total=_POLL_TIMEOUT_S)
            ) as resp:
                if resp.status != 200:
                    return None
                body = await resp.read()
        except (TimeoutError, aiohttp.ClientError, OSError):
            return None
        return count_workers(source, body)

    def worker_seconds(self, end_s: float) -> float | None:
        return integrate(self.samples, end_s) if self.samples else None


def count_workers(source: str, body: bytes) -> int | None:
    """The worker count in a ``/cluster`` JSON body or a ``/metrics`` Prometheus body."""
    if source == "/metrics":
        names = set(_METRIC_WORKER.findall(body))
        return len(names) if names else None
    try:
        workers = json.loads(body).get("workers")
    except (ValueError, AttributeError):
        return None
    return len(workers) if isinstance(workers, list) else None


def integrate(samples: list[tuple[float, int]], end_s: float) -> float:
    """Integral of the sampled count over [0, end_s]: each sample holds until the next, and the
    first one also covers the time before it."""
    points = sorted(samples)
    starts = [0.0] + [t for t, _ in points[1:]]
    ends = [t for t, _ in points[1:]] + [end_s]
    return sum(
        n * max(0.0, min(b, end_s) - max(a, 0.0)) for (_, n), a, b in zip(points, starts, ends)
    )
