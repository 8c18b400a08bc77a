"""Live migration of running requests (Llumnix) on this machine, default model, 1 thread each.

    python benchmarks/migration.py pause [--reps 5] [--lengths 256,512,1024,2048,4096]
    python benchmarks/migration.py drain [--requests 8]
    python benchmarks/migration.py balance [--rate 2] [--duration 30] [--burst-tokens 512]
        [--rounds 1]

pause    The pause a migration costs the migrated request, against the KV it carries. Two
         colocated DecodeWorkers in this process (as in tests/unit/test_migration.py), each
         running its real worker loop in its own thread with 1 torch thread (2 cores), real
         kv_transfer over loopback tcp and shm; the benchmark talks to them through an
         in-process link that stamps every TokenChunk as the worker emits it. One request is
         prefilled to each length (lengths past the model's max_model_len less 200 are
         skipped and listed), decodes 8 tokens, then moves back and forth --reps times per
         transport. Per point (medians): the source-side pause (MigrationDone.pause_s: pause
         -> the destination's commit ack), the client-visible gap (the source's last token ->
         the destination's first; an ordinary token gap is one decode step, the ITL column),
         the longest token gap from the migration's start until 4 tokens after it (it also
         holds the source's export of the unpaused first stage), and the stages sent. For
         contrast, a stop-the-world move at the same length: the whole KV in one paused stage
         (final_tokens set huge), its pause and gap. Only the migrated request runs, so a
         worker reads its KV socket between short steps: under load a stage waits for the
         step in progress on each side (see the drain mode's router-side pauses).
drain    Scale-in by migration vs by waiting. `tideserve serve --mode colocated --decode 2
         --threads 1`; --requests long-output requests (the first ones of the Azure
         conversation trace sample with 256..384 output tokens, prompts clipped to 256 tokens,
         token-id prompts, ignore_eos) are sent at once; when both workers hold requests and
         every request has streamed 16 tokens, the busier worker is drained, and /cluster is
         polled until its `requests` is 0. Once with {"migrate": false} (the baseline: its
         requests finish there), once, on a fresh identical server, with {"migrate": true}.
         Reports time to empty, the ratio, the batch's makespan, that every request completed
         with all its tokens, and the router's migration count and pauses.
balance  Interactive tail latency with --migration off vs on (two fresh servers, one run).
         The skew is one that admission routing (the colocated worker with the most free KV)
         cannot see: one long-context request (a --context-tokens prompt) is sent first, lands
         on one worker and is prefilled there: much KV, a batch of one. Then a burst of
         --burst batch-class requests (slo_class "batch", 16-token prompts, --burst-tokens
         outputs), which go to the other worker, where KV is free: a batch of --burst with
         little KV. Then Poisson arrivals of short interactive requests (--rate per second for
         --duration s, 64-token prompts, 32 output tokens): routed by free KV, they join the
         busy batch. With migration on, the router's rebalancer (free KV blocks per running
         request, once a second) moves batch-class requests to the other worker. Reports the
         interactive requests' TTFT and TPOT p50/p90/p99 (p99 of a few dozen is their max),
         the burst's TPOT, the router's migrations and the 1-minute load average before each
         server (other jobs share the 2 cores). --rounds N alternates off/on and on/off pairs
         and also pools the rounds.

Results: benchmarks/results/migration_<mode>.json. Compare within a run: the machine is shared.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import platform
import random
import statistics
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
_ms = 1e3


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _machine() -> dict:
    import torch

    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if "model name" in ln),
        platform.processor(),
    )
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__}


# -- pause: two in-process workers ---------------------------------------------------------------


class TimedLink:
    """A worker's link to the router, in-process: records what the worker sends, with the
    time; `put` hands it a message (woken at once through a PAIR socket)."""

    def __init__(self, ctx, name: str) -> None:
        import zmq

        self.sock = ctx.socket(zmq.PAIR)  # the worker loop polls it
        self.sock.bind(f"inproc://{name}")
        self.peer = ctx.socket(zmq.PAIR)  # the benchmark's end, used from its thread only
        self.peer.connect(f"inproc://{name}")
        self.token_times: dict[str, list[float]] = collections.defaultdict(list)  # id -> times
        self.outcomes: list = []  # MigrationDone / MigrationFailed, in order
        self.inbox: collections.deque = collections.deque()

    def send(self, msg) -> None:
        from tideserve.protocol import MigrationDone, MigrationFailed, TokenChunk

        if isinstance(msg, TokenChunk):
            self.token_times[msg.request_id].append(time.perf_counter())
        elif isinstance(msg, MigrationDone | MigrationFailed):
            self.outcomes.append(msg)

    def put(self, msg) -> None:
        self.inbox.append(msg)
        self.peer.send(b"")

    def recv_all(self) -> list:
        import zmq

        while self.sock.poll(0):
            self.sock.recv(zmq.NOBLOCK)
        out = []
        while self.inbox:
            out.append(self.inbox.popleft())
        return out


def _worker(ctx, model: str, wid: str, kv_bytes: int):
    """A colocated DecodeWorker whose real loop runs in a thread of this process."""
    from kv_transfer import make_receiver, make_sender
    from tideserve.config import EngineConfig
    from tideserve.engine.engine import LLMEngine
    from tideserve.roles.decode import DecodeWorker
    from tideserve.worker import WorkerConfig

    engine_cfg = EngineConfig(model=model, dtype="bfloat16", num_threads=1, kv_cache_bytes=kv_bytes)
    cfg = WorkerConfig(role="colocated", worker_id=wid, engine=engine_cfg)
    receiver = make_receiver("tcp", ctx)  # takes tcp frames and shm notices alike
    senders: dict = {}

    def make() -> dict:
        if not senders:
            for t in ("tcp", "shm"):
                senders[t] = make_sender(t, ctx, shm_prefix=f"tsbench{os.getpid()}{wid}_")
        return senders

    link = TimedLink(ctx, f"bench-{wid}")
    w = DecodeWorker(cfg, LLMEngine.from_config(engine_cfg), link, receiver, make)
    thread = threading.Thread(target=w.loop.run, name=wid, daemon=True)

    def close() -> None:
        w.loop.stopping = True
        thread.join(10)
        receiver.close()
        for s in senders.values():
            s.close()
        link.sock.close(0)
        link.peer.close(0)

    w.close = close
    thread.start()
    return w


def _token_times(w, rid: str) -> list[float]:
    return list(w.link.token_times[rid])


def _wait(cond, what: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not in {timeout_s:.0f} s")
        time.sleep(0.005)


def _migrate_once(src, dst, rid: str, prompt_len: int, transport: str, one_stage: bool) -> dict:
    from tideserve.protocol import MigrateRequest, MigrationDone

    def outcome():
        return src.link.outcomes[mark] if len(src.link.outcomes) > mark else None

    src.migration.final_tokens = 1 << 30 if one_stage else 32  # 1 << 30: stop the world
    mark = len(src.link.outcomes)
    n_src = len(_token_times(src, rid))
    kv_tokens = prompt_len + n_src + len(_token_times(dst, rid)) - 1  # the last token has none
    t_start = time.perf_counter()
    src.link.put(MigrateRequest(rid, dst.wid, dst.receiver.address, transport))
    _wait(lambda: outcome() is not None, "the migration")
    done = outcome()
    if not isinstance(done, MigrationDone):
        raise RuntimeError(f"migration {src.wid} -> {dst.wid} failed: {done}")
    n_dst = len(_token_times(dst, rid))
    _wait(lambda: len(_token_times(dst, rid)) >= n_dst + 8, "tokens after the migration")
    src_times = _token_times(src, rid)
    before = [t for t in src_times[:n_src] if t < t_start]
    last_src = src_times[-1]
    dst_after = [t for t in _token_times(dst, rid) if t > last_src]
    window = [before[-1], *[t for t in src_times if t >= t_start], *dst_after[:4]]
    gaps = [b - a for a, b in zip(window, window[1:])]
    itl = [b - a for a, b in zip(before[-5:], before[-4:])]  # this holding's last 4 gaps
    return {
        "kv_tokens": kv_tokens,
        "pause_ms": done.pause_s * _ms,
        "gap_ms": (dst_after[0] - last_src) * _ms,
        "max_gap_ms": max(gaps) * _ms,
        "stages": done.num_stages,
        "itl_ms": _median(itl) * _ms,
    }


def pause(args) -> dict:
    import zmq

    from tideserve.engine.default_model import prepare_default_model
    from tideserve.protocol import AbortRequest, GenerateRequest, Params

    model = str(prepare_default_model(progress=True))
    load = os.getloadavg()[0]
    ctx = zmq.Context()
    a = _worker(ctx, model, "src", 256 << 20)
    b = _worker(ctx, model, "dst", 256 << 20)
    max_len = a.engine.max_model_len
    lengths = [n for n in args.lengths if n + 200 < max_len]
    skipped = [n for n in args.lengths if n not in lengths]
    rows = []
    try:
        for n in lengths:
            rid = f"len{n}"
            prompt = [(7 * i) % 30000 + 100 for i in range(n)]
            budget = 8 + 2 * (args.reps + 1) * 40  # ample: a move and its 8 tokens take ~12
            params = Params(max_tokens=budget, temperature=0.0, ignore_eos=True)
            t0 = time.perf_counter()
            a.link.put(GenerateRequest(rid, prompt, params, 0))
            _wait(lambda r=rid: len(_token_times(a, r)) >= 8, "the prefill")
            prefill_s = time.perf_counter() - t0
            holder, other = a, b
            for transport in ("tcp", "shm"):
                for one_stage in [False] * args.reps + [True]:
                    r = _migrate_once(holder, other, rid, n, transport, one_stage)
                    rows.append({"prompt_tokens": n, "transport": transport,
                                 "one_stage": one_stage, **r})  # fmt: skip
                    holder, other = other, holder
            holder.link.put(AbortRequest(rid))
            print(f"{n:5d} tokens: prefill {prefill_s:.1f} s, {2 * (args.reps + 1)} migrations",
                  flush=True)  # fmt: skip
    finally:
        a.close()
        b.close()
        ctx.destroy(linger=0)
    points = []
    for n in lengths:
        for transport in ("tcp", "shm"):
            live = [r for r in rows if r["prompt_tokens"] == n and r["transport"] == transport]
            stw = [r for r in live if r["one_stage"]]
            live = [r for r in live if not r["one_stage"]]
            points.append({
                "kv_tokens": round(_median([r["kv_tokens"] for r in live])),
                "transport": transport,
                "pause_ms": round(_median([r["pause_ms"] for r in live]), 2),
                "gap_ms": round(_median([r["gap_ms"] for r in live]), 2),
                "max_gap_ms": round(_median([r["max_gap_ms"] for r in live]), 2),
                "stages": _median([r["stages"] for r in live]),
                "itl_ms": round(_median([r["itl_ms"] for r in live]), 2),
                "one_stage_pause_ms": round(_median([r["pause_ms"] for r in stw]), 2),
                "one_stage_gap_ms": round(_median([r["gap_ms"] for r in stw]), 2),
            })  # fmt: skip
    return {
        "model": "SmolLM2-135M-Instruct",
        "dtype": "bfloat16",
        "threads_per_engine": 1,
        "max_model_len": max_len,
        "lengths_skipped": skipped,
        "reps": args.reps,
        "machine": _machine(),
        "loadavg_1m_before": round(load, 2),
        "points": points,
        "runs": rows,
    }


def _pause_table(res: dict) -> str:
    head = (
        f"{'KV tokens':>9} {'transport':>9} {'stages':>6} {'pause ms':>9} {'gap ms':>8} "
        f"{'max gap':>8} {'ITL ms':>7} {'1-stage pause':>13} {'1-stage gap':>11}"
    )
    lines = [head]
    for p in res["points"]:
        lines.append(
            f"{p['kv_tokens']:>9} {p['transport']:>9} {p['stages']:>6} {p['pause_ms']:>9.1f} "
            f"{p['gap_ms']:>8.1f} {p['max_gap_ms']:>8.1f} {p['itl_ms']:>7.1f} "
            f"{p['one_stage_pause_ms']:>13.1f} {p['one_stage_gap_ms']:>11.1f}"
        )
    return "\n".join(lines)


# -- drain and balance: a real `tideserve serve` -------------------------------------------------


@contextlib.contextmanager
def _serve(*flags: str):
    """`tideserve serve` with 2 colocated workers, once both have joined (/health is ready
    at the first)."""
    import urllib.request

    from tideserve.launcher import ServeProcess

    srv = ServeProcess(
        "--mode", "colocated", "--decode", "2", "--threads", "1", "--dtype", "bfloat16",
        "--served-model-name", "m", *flags,
    )  # fmt: skip
    with srv:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with urllib.request.urlopen(srv.url + "/cluster", timeout=10) as r:
                ws = json.loads(r.read())["workers"]
            if len(ws) == 2 and all(w["state"] == "ready" for w in ws):
                break
            time.sleep(0.2)
        else:
            raise TimeoutError("the second worker never joined")
        yield srv


def _body(prompt: list[int], max_tokens: int, slo_class: str = "interactive") -> bytes:
    import msgspec

    return msgspec.json.encode({
        "model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
        "slo_class": slo_class,
    })  # fmt: skip


def _prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1000, 10000) for _ in range(n)]  # token ids every vocabulary has


async def _get_json(session, url: str) -> dict:
    async with session.get(url) as r:
        return await r.json()


async def _post_json(session, url: str, body: dict) -> dict:
    async with session.post(url, json=body) as r:
        return await r.json()


async def _until(cond, poll_s: float = 0.05, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not in {timeout_s:.0f} s")
        await asyncio.sleep(poll_s)


def _drain_requests(n: int) -> list[tuple[int, int]]:
    """(prompt tokens, output tokens) of the first `n` requests of the Azure conversation
    trace sample with 256..384 output tokens; prompts clipped to 256."""
    from tideserve.bench.traces import load_trace, resolve_trace

    trace = load_trace(resolve_trace("azure-conv"))
    picked = [(min(r.input_tokens, 256), r.output_tokens) for r in trace
              if 256 <= r.output_tokens <= 384]  # fmt: skip
    return picked[:n]


async def _drain_run(url: str, migrate: bool, shapes: list[tuple[int, int]]) -> dict:
    import aiohttp

    from tideserve.bench.client import stream_request

    rng = random.Random(0)
    async with aiohttp.ClientSession() as session:
        t0 = time.perf_counter()
        tasks = [
            asyncio.create_task(
                stream_request(session, url + "/v1/completions", _body(_prompt(rng, p), o))
            )
            for p, o in shapes
        ]

        async def started() -> bool:
            reqs = (await _get_json(session, url + "/admin/requests"))["requests"]
            ws = (await _get_json(session, url + "/cluster"))["workers"]
            return (
                len(reqs) == len(shapes)
                and all(r["tokens_out"] >= 16 for r in reqs)
                and all(w["requests"] > 0 for w in ws)
            )

        await _until(started)
        ws = (await _get_json(session, url + "/cluster"))["workers"]
        busy = max(ws, key=lambda w: (w["requests"], w["id"]))
        t_drain = time.perf_counter()
        await _post_json(session, url + f"/admin/workers/{busy['id']}/drain", {"migrate": migrate})

        async def empty() -> bool:
            ws = (await _get_json(session, url + "/cluster"))["workers"]
            return next(w for w in ws if w["id"] == busy["id"])["requests"] == 0

        await _until(empty, poll_s=0.02)
        t_empty = time.perf_counter()
        results = await asyncio.gather(*tasks)
        cluster = await _get_json(session, url + "/cluster")
    complete = [
        r for r, (_, o) in zip(results, shapes) if r.error is None and r.num_output_tokens == o
    ]
    return {
        "migrate": migrate,
        "drained_worker": busy["id"],
        "requests_on_it": busy["requests"],
        "time_to_empty_s": round(t_empty - t_drain, 2),
        "makespan_s": round(max(r.end_s for r in results) - t0, 2),
        "completed": len(complete),
        "sent": len(shapes),
        "errors": [r.error for r in results if r.error],
        "migrations": cluster["migrations"],
    }


def drain(args) -> dict:
    shapes = _drain_requests(args.requests)
    runs = []
    for migrate in (False, True):
        load = os.getloadavg()[0]
        with _serve() as srv:
            r = {
                "loadavg_1m_before": round(load, 2),
                **asyncio.run(_drain_run(srv.url, migrate, shapes)),
            }
        print(json.dumps({k: v for k, v in r.items() if k != "migrations"}), flush=True)
        runs.append(r)
    wait, move = runs
    return {
        "requests": [{"prompt_tokens": p, "output_tokens": o} for p, o in shapes],
        "machine": _machine(),
        "wait": wait,
        "migrate": move,
        "speedup_to_empty": round(wait["time_to_empty_s"] / move["time_to_empty_s"], 2),
    }


def _drain_table(res: dict) -> str:
    lines = [f"{'drain':>10} {'reqs on it':>10} {'to empty s':>10} {'makespan s':>10} "
             f"{'completed':>9} {'migrations':>10} {'pause p50/max ms':>16}"]  # fmt: skip
    for name in ("wait", "migrate"):
        r = res[name]
        m = r["migrations"]
        pause = (
            f"{m['pause_ms_p50']:.1f}/{m['pause_ms_max']:.1f}" if m["pause_ms_p50"] is not None
            else "-"
        )  # fmt: skip
        lines.append(
            f"{name:>10} {r['requests_on_it']:>10} {r['time_to_empty_s']:>10.2f} "
            f"{r['makespan_s']:>10.2f} {r['completed']:>4}/{r['sent']:<4} {m['done']:>10} "
            f"{pause:>16}"
        )
    lines.append(f"empties {res['speedup_to_empty']:.1f}x sooner with migration")
    return "\n".join(lines)


async def _balance_run(url: str, args) -> dict:
    import aiohttp

    from tideserve.bench.client import stream_request

    rng = random.Random(0)
    completions = url + "/v1/completions"
    async with aiohttp.ClientSession() as session:

        async def requests() -> list[dict]:
            return (await _get_json(session, url + "/admin/requests"))["requests"]

        async def all_streaming(n: int) -> bool:
            reqs = await requests()
            return len(reqs) == n and all(r["tokens_out"] >= 1 for r in reqs)

        # 1. one long-context request: much KV on its worker, a batch of one
        context = asyncio.create_task(
            stream_request(session, completions, _body(_prompt(rng, args.context_tokens), 4000))
        )
        await _until(lambda: all_streaming(1), timeout_s=600)
        # 2. the burst: short prompts, long outputs; routed where KV is free, the other worker
        burst_bodies = [
            _body(_prompt(rng, 16), args.burst_tokens, "batch") for _ in range(args.burst)
        ]
        burst = [asyncio.create_task(stream_request(session, completions, b)) for b in burst_bodies]
        await _until(lambda: all_streaming(1 + args.burst))
        placed = collections.Counter(r["worker"] for r in await requests())
        # 3. interactive requests, Poisson arrivals
        arrivals, t = [], rng.expovariate(args.rate)
        while t < args.duration:
            arrivals.append(t)
            t += rng.expovariate(args.rate)
        bodies = [_body(_prompt(rng, 64), 32) for _ in arrivals]
        t0 = time.perf_counter()

        async def one(at: float, body: bytes):
            await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
            sent = time.perf_counter()
            return sent, await stream_request(session, completions, body)

        inter = await asyncio.gather(*[one(at, b) for at, b in zip(arrivals, bodies)])
        bursts = await asyncio.gather(*burst)
        context.cancel()
        await asyncio.gather(context, return_exceptions=True)
        cluster = await _get_json(session, url + "/cluster")

    def tpot(r) -> float | None:
        n = r.num_output_tokens
        return (r.end_s - r.token_times_s[0]) / (n - 1) if r.error is None and n > 1 else None

    ok = [(sent, r) for sent, r in inter if r.error is None and r.num_output_tokens == 32]
    ttft = [(r.token_times_s[0] - sent) * _ms for sent, r in ok]
    tpots = [tpot(r) * _ms for _, r in ok]
    burst_tpot = [tpot(r) * _ms for r in bursts if tpot(r) is not None]

    return {
        "placed": dict(placed),
        "interactive_sent": len(inter),
        "interactive_completed": len(ok),
        "ttft_ms": _pcts(ttft),
        "tpot_ms": _pcts(tpots),
        "burst_completed": sum(r.error is None for r in bursts),
        "burst_tpot_ms": _pcts(burst_tpot),
        "burst_makespan_s": round(max(r.end_s for r in bursts) - t0, 1),
        "migrations": cluster["migrations"],
        "ttft_ms_all": [round(x, 1) for x in ttft],
        "tpot_ms_all": [round(x, 1) for x in tpots],
        "burst_tpot_ms_all": [round(x, 1) for x in burst_tpot],
    }


def _pcts(xs: list[float]) -> dict:
    from tideserve.bench.client import percentile

    return {f"p{q}": round(percentile(xs, q), 1) for q in (50, 90, 99)}


def balance(args) -> dict:
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    for i in range(args.rounds):  # off, on; then on, off; ...: a drift in the load cancels
        for flag in ("off", "on") if i % 2 == 0 else ("on", "off"):
            load = os.getloadavg()[0]
            with _serve("--migration", flag) as srv:
                r = asyncio.run(_balance_run(srv.url, args))
            r = {"round": i, "loadavg_1m_before": round(load, 2), **r}
            runs[flag].append(r)
            print(flag, json.dumps({k: v for k, v in r.items() if not k.endswith("_all")}),
                  flush=True)  # fmt: skip
    pooled = {
        flag: {
            "ttft_ms": _pcts([x for r in rs for x in r["ttft_ms_all"]]),
            "tpot_ms": _pcts([x for r in rs for x in r["tpot_ms_all"]]),
            "burst_tpot_ms": _pcts([x for r in rs for x in r["burst_tpot_ms_all"]]),
        }
        for flag, rs in runs.items()
    }
    return {
        "context_tokens": args.context_tokens,
        "burst": args.burst,
        "burst_tokens": args.burst_tokens,
        "rate_per_s": args.rate,
        "duration_s": args.duration,
        "interactive": {"prompt_tokens": 64, "output_tokens": 32},
        "rounds": args.rounds,
        "machine": _machine(),
        "pooled": pooled,
        "migration_off": runs["off"],
        "migration_on": runs["on"],
    }


def _balance_table(res: dict) -> str:
    lines = [f"{'migration':>9} {'round':>5} {'TTFT p50/p90/p99 ms':>21} "
             f"{'TPOT p50/p90/p99 ms':>21} {'done':>7} {'burst TPOT p50':>14} "
             f"{'migrations':>10} {'load':>5}"]  # fmt: skip

    def row(name, rnd, t, p, done, b, moved, load) -> str:
        return (
            f"{name:>9} {rnd:>5} {t['p50']:>7.0f}/{t['p90']:.0f}/{t['p99']:<7.0f} "
            f"{p['p50']:>7.1f}/{p['p90']:.1f}/{p['p99']:<7.1f} {done:>7} {b['p50']:>14.1f} "
            f"{moved:>10} {load:>5}"
        )

    for name in ("off", "on"):
        for r in res[f"migration_{name}"]:
            done = f"{r['interactive_completed']}/{r['interactive_sent']}"
            lines.append(row(name, r["round"], r["ttft_ms"], r["tpot_ms"], done,
                             r["burst_tpot_ms"], r["migrations"]["done"],
                             r["loadavg_1m_before"]))  # fmt: skip
    if res["rounds"] > 1:
        for name in ("off", "on"):
            pl = res["pooled"][name]
            lines.append(row(name, "all", pl["ttft_ms"], pl["tpot_ms"], "", pl["burst_tpot_ms"],
                             "", ""))  # fmt: skip
    return "\n".join(lines)


TABLES = {"pause": _pause_table, "drain": _drain_table, "balance": _balance_table}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["pause", "drain", "balance"])
    ap.add_argument("--reps", type=int, default=5, help="pause: live migrations per point")
    ap.add_argument("--requests", type=int, default=8, help="drain: long-output requests")
    ap.add_argument("--context-tokens", type=int, default=2048, help="balance: its prompt")
    ap.add_argument("--burst", type=int, default=8, help="balance: long-output requests")
    ap.add_argument("--burst-tokens", type=int, default=512, help="balance: their outputs")
    ap.add_argument("--rate", type=float, default=2.0, help="balance: interactive req/s")
    ap.add_argument("--duration", type=float, default=30.0, help="balance: seconds of them")
    ap.add_argument("--rounds", type=int, default=1, help="balance: off/on pairs (alternating)")
    ap.add_argument(
        "--lengths",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[256, 512, 1024, 2048, 4096],
        help="pause: prompt lengths (tokens of KV)",
    )
    args = ap.parse_args()
    result = {"pause": pause, "drain": drain, "balance": balance}[args.mode](args)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"migration_{args.mode}.json").write_text(json.dumps(result, indent=2))
    print(TABLES[args.mode](result))


if __name__ == "__main__":
    main()
