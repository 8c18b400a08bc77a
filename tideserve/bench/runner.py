"""Open-loop replay of a trace against an OpenAI-compatible endpoint.

Lifecycle of one run (``replay``):

1. One ``RequestRecord`` per trace request, its ``scheduled_s`` the trace's arrival time.
2. The dispatcher walks the trace in order: it builds the next request's body (prompt of the
   exact token count, ``max_tokens`` = ``min_tokens`` = the output length, ``ignore_eos``),
   sleeps until the request's time, and starts a task for it. It never waits for an earlier
   request: arrivals are open loop, and the connection pool is unbounded so none queues here.
3. Each task stamps its send time, streams the response (``client.stream_request``) and fills
   its record: first and last token times, inter-token gaps, counts, status or error.
4. Beside it, ``WorkerMeter`` samples the server's worker count and ``Progress`` draws a bar.
5. When every task has ended (or ``stop_after_misses`` requests have missed the SLO, for a
   goodput probe whose verdict is already known), the records come back in a ``RunResult``.
   Requests never started stay unsent; those cut off by the stop are marked cancelled.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

import aiohttp
import msgspec

from tideserve.bench.client import stream_request
from tideserve.bench.cost import WorkerMeter
from tideserve.bench.metrics import RequestRecord, Slo
from tideserve.bench.progress import Progress
from tideserve.bench.prompts import PromptMaker
from tideserve.bench.traces import TraceRequest

_START_DELAY_S = 0.05  # between setting up and the first scheduled send


def run_async(coro):
    """``asyncio.run`` on uvloop where it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


@dataclass(frozen=True)
class RunConfig:
    """How to talk to the endpoint under test."""

    endpoint: str  # base URL, e.g. http://127.0.0.1:8000
    model: str  # the "model" field of every request
    timeout_s: float = 600.0  # per request, end to end
    seed: int = 0  # prompts are a function of (seed, request index)
    show_progress: bool = True  # draw a progress bar on stderr
    label: str = "bench"  # the progress bar's label
    meter_workers: bool = True  # poll /cluster for worker-seconds


@dataclass
class RunResult:
    records: list[RequestRecord]
    wall_s: float  # from the run's start to the last request's end
    worker_seconds: float | None = None  # None: the server did not tell
    worker_samples: list[tuple[float, int]] = field(default_factory=list)
    stopped_early: bool = False  # a goodput probe stopped once it had missed its target


async def replay(
    trace: list[TraceRequest],
    prompts: PromptMaker,
    cfg: RunConfig,
    slo: Slo | None = None,
    stop_after_misses: int | None = None,
) -> RunResult:
    """Send every request of ``trace`` at its time; see the module docstring."""
    records = [
        RequestRecord(i, r.arrival_s, r.input_tokens, r.output_tokens, 0)
        for i, r in enumerate(trace)
    ]
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
    async with aiohttp.ClientSession(connector=connector) as session:
        run = _Run(session, records, trace, prompts, cfg, slo, stop_after_misses)
        return await run.go()


class _Run:
    def __init__(self, session, records, trace, prompts, cfg, slo, stop_after_misses) -> None:
        self.session = session
        self.records = records
        self.trace = trace
        self.prompts = prompts
        self.cfg = cfg
        self.url = cfg.endpoint.rstrip("/") + "/v1/completions"
        self.slo = slo or Slo()
        self.stop_after_misses = stop_after_misses
        self.num_misses = 0
        self.stop = asyncio.Event()  # a goodput probe's verdict is known: stop sending
        self.finished = asyncio.Event()  # every task has ended, or stop
        self.num_open = 0  # tasks created and not ended
        self.is_dispatched = False  # every task that will start has started
        span = trace[-1].arrival_s if trace else 0.0
        self.progress = Progress(len(trace), span, cfg.label)
        self.meter = WorkerMeter(session, cfg.endpoint)
        self.t0 = 0.0

    async def go(self) -> RunResult:
        self.t0 = time.perf_counter() + _START_DELAY_S
        side = []
        if self.cfg.meter_workers:
            side.append(asyncio.create_task(self.meter.run(self.t0)))
        if self.cfg.show_progress:
            side.append(asyncio.create_task(self.progress.run()))
        try:
            tasks = await self._dispatch()
            await self._wait(tasks)
        finally:
            for t in side:
                t.cancel()
            await asyncio.gather(*side, return_exceptions=True)
        wall_s = time.perf_counter() - self.t0
        if self.cfg.show_progress:
            self.progress.close()
        return RunResult(
            self.records,
            wall_s,
            self.meter.worker_seconds(wall_s),
            list(self.meter.samples),
            self.stop.is_set(),
        )

    async def _dispatch(self) -> list[asyncio.Task]:
        tasks = []
        for rec, req in zip(self.records, self.trace):
            body = self._body(rec, req)
            delay = self.t0 + rec.scheduled_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if self.stop.is_set():
                break
            self.num_open += 1
            tasks.append(asyncio.create_task(self._send(rec, body)))
        return tasks

    async def _wait(self, tasks: list[asyncio.Task]) -> None:
        """Until every task has ended, or the stop: then cancel those still streaming."""
        self.is_dispatched = True
        if self.num_open == 0:
            self.finished.set()
        await self.finished.wait()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _body(self, rec: RequestRecord, req: TraceRequest) -> bytes:
        rng = random.Random(self.cfg.seed * 1_000_003 + rec.index)
        prompt, rec.prompt_tokens_sent = self.prompts.make(req.input_tokens, rng)
        return msgspec.json.encode(
            {
                "model": self.cfg.model,
                "prompt": prompt,
                "max_tokens": req.output_tokens,
                "min_tokens": req.output_tokens,
                "ignore_eos": True,
                "temperature": 0.0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        )

    async def _send(self, rec: RequestRecord, body: bytes) -> None:
        try:
            await self._stream(rec, body)
        finally:
            self.num_open -= 1
            if self.num_open == 0 and self.is_dispatched:
                self.finished.set()

    async def _stream(self, rec: RequestRecord, body: bytes) -> None:
        t0 = self.t0
        rec.send_s = time.perf_counter() - t0
        self.progress.num_sent += 1
        try:
            res = await stream_request(self.session, self.url, body, self.cfg.timeout_s)
        except asyncio.CancelledError:
            rec.error = "cancelled: the goodput probe had already missed its SLO target"
            rec.is_cancelled = True
            rec.end_s = time.perf_counter() - t0
            raise
        rec.status, rec.error, rec.end_s = res.status, res.error, res.end_s - t0
        rec.num_output_tokens = res.num_output_tokens
        rec.server_prompt_tokens, rec.finish_reason = res.prompt_tokens, res.finish_reason
        times = res.token_times_s
        if times:
            rec.first_token_s, rec.last_token_s = times[0] - t0, times[-1] - t0
            rec.itl_ms = [(b - a) * 1e3 for a, b in zip(times, times[1:])]
        self._on_done(rec)

    def _on_done(self, rec: RequestRecord) -> None:
        self.progress.num_done += 1
        if not rec.is_ok:
            self.progress.num_failed += 1
        if self.stop_after_misses is not None and not rec.meets(self.slo):
            self.num_misses += 1
            if self.num_misses > self.stop_after_misses:
                self.stop.set()
                self.finished.set()
