"""Live migration of running requests (Llumnix) on this machine, default model, 1 thread each.

    python benchmarks/migration.py pause [--reps 3] [--lengths 256,512,1024,2048,4096]
    python benchmarks/migration.py drain [--requests 8]
    python benchmarks/migration.py balance [--duration 40] [--rate 1.5]

pause    The pause a migration costs the migrated request, against the KV it carries. Two
         colocated DecodeWorkers in this process (as in tests/unit/test_migration.py), each
         running its real worker loop in its own thread with 1 torch thread (2 cores), real
         kv_transfer over loopback tcp and shm; the benchmark talks to them through an
         in-process link that stamps every TokenChunk as the worker emits it. One request is
         prefilled to each length, decodes 8 tokens, then moves back and forth --reps times
         per transport. Per point (medians): the source-side pause (MigrationDone.pause_s:
         pause -> the destination's commit ack), the client-visible gap (the source's last
         token -> the destination's first; an ordinary token gap is one decode step, the ITL
         column), the longest token gap from the migration's start until 4 tokens after it
         (it also holds the source's export of the unpaused first stage), and the stages
         sent. For contrast, a stop-the-world move at the same length: the whole KV in one
         paused stage (final_tokens set huge), its pause and gap.
drain    Scale-in by migration vs by waiting. `tideserve serve --mode colocated --decode 2
         --threads 1`; --requests long-output requests (the first ones of the Azure
         conversation trace sample with 256..384 output tokens, prompts clipped to 256 tokens,
         token-id prompts, ignore_eos) are sent at once; when both workers hold requests and
         every request has streamed 16 tokens, the busier worker is drained, and /cluster is
         polled until its `requests` is 0. Once with {"migrate": false} (the baseline: its
         requests finish there), once, on a fresh identical server, with {"migrate": true}.
         Reports time to empty, the ratio, the batch's makespan, and that every request
         completed with all its tokens.
balance  Interactive tail latency with --migration off vs on (two fresh servers, one run).
         The skew is one that admission routing (the colocated worker with the most free KV)
         cannot see: one long-context request (a --context-tokens prompt) is sent first and
         lands on one worker, holding much KV in a batch of one; then a burst of --burst
         batch-class requests with short prompts and long outputs, which go to the other
         worker, where KV is free (the first request's queued prefill counts against its
         worker at once): that worker now decodes a batch of --burst with little KV. Then
         Poisson arrivals of short interactive requests (--rate per second for --duration s,
         128-token prompts, 32 output tokens): routed by free KV, they join the busy batch.
         With migration on, the router's rebalancer (free blocks per running request) moves
         batch-class requests to the idle-compute worker. Reports the interactive requests'
         TTFT and TPOT p50/p90/p99, the burst's TPOT, and the migrations the router made.

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
            params = Params(max_tokens=4 * args.reps * 20 + 64, temperature=0.0, ignore_eos=True)
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
        with _serve() as srv:
            r = asyncio.run(_drain_run(srv.url, migrate, shapes))
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


# -- main --------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["pause", "drain", "balance"])
    ap.add_argument("--reps", type=int, default=5, help="pause: live migrations per point")
    ap.add_argument("--requests", type=int, default=8, help="drain: long-output requests")
    ap.add_argument(
        "--lengths",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[256, 512, 1024, 2048, 4096],
        help="pause: prompt lengths (tokens of KV)",
    )
    args = ap.parse_args()
    result = {"pause": pause, "drain": drain}[args.mode](args)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"migration_{args.mode}.json").write_text(json.dumps(result, indent=2))
    print({"pause": _pause_table, "drain": _drain_table}[args.mode](result))


if __name__ == "__main__":
    main()
