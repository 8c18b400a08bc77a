"""Overload: offer a multiple of a server's capacity and see what it does with the excess.

`measure_capacity` runs a closed loop at the server's admission limit and returns completed
requests per second; `offer` then sends Poisson arrivals at `rate` for `duration_s`, every
request non-streaming with a fixed output length (ignore_eos), while `RssSampler` watches a
process's memory. The outcome says how many requests were admitted and completed whole,
how many were rejected (429/503, with Retry-After) and how fast, and how many were lost
(admitted but failed, cut short or timed out): a server that degrades well loses none.
Used by tests/integration/test_overload.py and benchmarks/overload.py.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import threading
import time
from dataclasses import dataclass, field

import aiohttp


@dataclass
class Outcome:
    offered: int = 0
    completed: int = 0  # admitted and answered whole
    rejected: int = 0  # 429 or 503 with Retry-After
    lost: int = 0  # admitted, then an error, a short answer or a timeout
    other: dict[int, int] = field(default_factory=dict)  # any other status -> count
    missing_retry_after: int = 0
    admitted_latency_s: list[float] = field(default_factory=list)
    rejected_latency_s: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        def pct(xs, q):
            return round(statistics.quantiles(xs, n=100)[q - 1], 4) if len(xs) > 1 else None

        return {
            "offered": self.offered,
            "completed": self.completed,
            "rejected": self.rejected,
            "lost": self.lost,
            "other_statuses": self.other,
            "missing_retry_after": self.missing_retry_after,
            "admitted_latency_p50_s": pct(self.admitted_latency_s, 50),
            "rejection_latency_p50_s": pct(self.rejected_latency_s, 50),
            "rejection_latency_p99_s": pct(self.rejected_latency_s, 99),
        }


async def _one(session, url: str, body: dict, out: Outcome, timeout_s: float) -> None:
    t0 = time.perf_counter()
    try:
        async with session.post(
            url + "/v1/completions", json=body, timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as r:
            data = await r.json(content_type=None)
            dt = time.perf_counter() - t0
            if r.status == 200:
                usage = data.get("usage") or {}
                if usage.get("completion_tokens") == body["max_tokens"]:
                    out.completed += 1
                    out.admitted_latency_s.append(dt)
                else:
                    out.lost += 1
            elif r.status in (429, 503):
                out.rejected += 1
                out.rejected_latency_s.append(dt)
                if "Retry-After" not in r.headers:
                    out.missing_retry_after += 1
            else:
                out.other[r.status] = out.other.get(r.status, 0) + 1
    except (TimeoutError, aiohttp.ClientError):
        out.lost += 1


def _body(model: str, max_tokens: int, i: int) -> dict:
    return {
        "model": model,
        "prompt": f"request {i}: tell me about the sea",
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }


async def measure_capacity(
    url: str, model: str, concurrency: int, duration_s: float, max_tokens: int
) -> float:
    """Completed requests per second with `concurrency` clients in a closed loop."""
    done = 0
    stop_at = time.perf_counter() + duration_s
    async with aiohttp.ClientSession() as session:

        async def client(k: int) -> None:
            nonlocal done
            i = 0
            while time.perf_counter() < stop_at:
                out = Outcome()
                await _one(session, url, _body(model, max_tokens, k * 10_000 + i), out, 120)
                done += out.completed
                i += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(client(k) for k in range(concurrency)))
        return done / (time.perf_counter() - t0)


async def offer(
    url: str,
    model: str,
    rate: float,
    duration_s: float,
    max_tokens: int,
    seed: int = 0,
    timeout_s: float = 120.0,
) -> Outcome:
    """Poisson arrivals at `rate` per second for `duration_s`; waits for every answer."""
    rng = random.Random(seed)
    out = Outcome()
    tasks = []
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as session:
        t = time.perf_counter()
        end = t + duration_s
        i = 0
        while True:
            t += rng.expovariate(rate)
            if t >= end:
                break
            await asyncio.sleep(max(0.0, t - time.perf_counter()))
            body = _body(model, max_tokens, i)
            tasks.append(asyncio.create_task(_one(session, url, body, out, timeout_s)))
            i += 1
        out.offered = i
        await asyncio.gather(*tasks)
    return out


class RssSampler:
    """Peak resident memory of a process (and its children), sampled every `interval_s`."""

    def __init__(self, pid: int, interval_s: float = 0.05) -> None:
        import psutil

        self.proc = psutil.Process(pid)
        self.interval_s = interval_s
        self.baseline = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> int:
        return self.proc.memory_info().rss

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.peak = max(self.peak, self._rss())
            except Exception:  # the process went away
                return

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
