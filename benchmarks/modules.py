"""Module-level elasticity on the default model (CPU, 1 thread per worker), in one process.

    nice -n 10 python benchmarks/modules.py                  # all three parts, small sizes
    python benchmarks/modules.py --parts scaleup --repeats 5

Parts:
  scaleup   time to add capacity: load a replica of N middle layers (only those weights, plus
            its KV cache) against building a whole new engine (all weights + KV). Median of
            --repeats, after one warm-up load.
  throughput  a fixed load (--requests prompts of --prompt-len tokens, --max-tokens out, all at
            once): one engine; one engine + a replica of its back half (share 0.5 of the batch),
            the replica's share computed on a second thread; two full engines, one thread each,
            each taking half the requests. Output tokens / wall second and memory (weights + KV).
            "Worker" here = a Python thread with one intra-op thread: the in-process stand-in for
            a worker process (the GIL is released inside the torch kernels).
  pressure  a small KV pool per engine and a burst of long prompts split over two engines; p99
            TTFT with parameter dropping off, and on (both pools >= the high watermark with a
            queue: drop into one two-stage pipeline whose freed weight bytes enlarge the pool;
            restore below the low watermark with no queue). Time is simulated: the two engines
            are two workers, so a round costs the slower one's measured step. The dropped
            pipeline's step is charged two ways: stages one after the other (no micro-batch
            overlap: a bound that favours "off"), and fully overlapped (the slower stage's
            time plus the step's non-model work: what micro-batching approaches).
  served    the same three on real processes (`tideserve serve --mode colocated --layer-stages 2
            --num-threads 1`, the router's POST /admin/workers/{id}/modules), opt-in:
            `--parts served`. scaleup: POST replicate of the back stage [L/2, L) onto the other
            worker until /cluster shows it attached (the hot worker lists it, the host reports
            its kv_bytes), against launching a whole `tideserve decode --role colocated`
            process until /cluster lists it ready; median of --repeats. throughput: a fixed
            load (--served-requests streams of --served-prompt-len tokens, --served-max-tokens
            out, greedy) on one worker (--decode 1); on one worker whose stage [L/2, L) is
            replicated onto a second at share 0.5 (the second is drained: all requests go to
            the first); on two full workers. Output tok/s, the workers' RSS (psutil) and KV
            figures from /cluster. pressure: two workers with a small KV pool
            (--served-pressure-kv-mib), a burst of --served-burst prompts of
            --served-long-prompt tokens; p50/p99 TTFT with dropping off, and on (the drop is
            issued, and has landed, before the burst).
Results print as a table and land in benchmarks/results/modules-<time>.json (the served part:
modules-served-<time>.json).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import urllib.error  # noqa: E402
import urllib.request  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from tideserve.config import EngineConfig  # noqa: E402
from tideserve.engine.default_model import prepare_default_model  # noqa: E402
from tideserve.engine.elastic import (  # noqa: E402
    StageFactory,
    build_elastic_engine,
    drop_layers,
    kv_bytes,
    restore_layers,
    weight_bytes,
)
from tideserve.engine.engine import LLMEngine  # noqa: E402
from tideserve.engine.sequence import SamplingParams  # noqa: E402
from tideserve.policy.modules import DropWatermarks, PairUsage, Watermarks  # noqa: E402

HERE = Path(__file__).resolve().parent
MiB = 1 << 20


def one_thread() -> None:
    torch.set_num_threads(1)


def config(path, kv_bytes_: int, **kw) -> EngineConfig:
    return EngineConfig(model=str(path), kv_cache_bytes=kv_bytes_, num_threads=1, **kw)


def prompts(n: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 40000) for _ in range(length)] for _ in range(n)]


# -- scale-up latency ------------------------------------------------------------------------


def scaleup(path, args) -> dict:
    cfg = config(path, args.kv_mib * MiB)
    f = StageFactory.from_config(cfg)
    out = {}
    f.stage(f.range(1, 2), 16)  # warm-up: the first load pays for imports and page cache
    for n in args.layers:
        r = f.range(1, 1 + n)  # a middle range: decoder layers only, as CoCoServe replicates
        nb = f.num_blocks(r, args.kv_mib * MiB)
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            stage = f.stage(r, nb)
            times.append(time.perf_counter() - t)
        out[f"replicate_{n}_layers"] = dict(
            median_s=statistics.median(times), weight_mib=weight_bytes(stage.model) / MiB
        )
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        engine = LLMEngine.from_config(cfg)
        times.append(time.perf_counter() - t)
    w = weight_bytes(engine.runner.model) / MiB
    out["whole_engine"] = dict(median_s=statistics.median(times), weight_mib=w)
    return out


# -- throughput at a fixed load --------------------------------------------------------------


def drive(engine, ps, params, first: int = 0) -> int:
    for i, p in enumerate(ps):
        engine.add_request(f"r{first + i}", p, params)
    n = 0
    while engine.has_unfinished():
        n += sum(len(o.new_token_ids) for o in engine.step())
    return n


def memory(*engines, replicas=()) -> float:
    total = 0
    for e in engines:
        r = e.runner
        stages = getattr(r, "stages", None)
        if stages is None:
            total += weight_bytes(r.model) + kv_bytes(r.kv)
        else:
            total += sum(weight_bytes(s.model) + kv_bytes(s.kv) for s in stages)
    total += sum(weight_bytes(s.model) + kv_bytes(s.kv) for s in replicas)
    return total / MiB


def throughput(path, args) -> dict:
    ps = prompts(args.requests, args.prompt_len, seed=1)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    cfg = config(path, args.kv_mib * MiB)
    out = {}

    one = LLMEngine.from_config(cfg)
    drive(one, ps[:2], SamplingParams(max_tokens=2))  # warm-up
    t = time.perf_counter()
    n = drive(one, ps, params)
    out["one_engine"] = dict(tok_s=n / (time.perf_counter() - t), mem_mib=memory(one))
    del one

    L = StageFactory.from_config(cfg).cfg.num_layers
    h = L // 2
    # each half-model stage gets half the budget: the same number of blocks as one engine
    half_cfg = config(path, args.kv_mib * MiB // 2)
    el = build_elastic_engine(half_cfg, [(0, h), (h, L)], parallel=True)
    el.runner._pool.submit(one_thread).result()
    rep = el.runner.replicate(1, [], share=0.5)
    drive(el, ps[:2], SamplingParams(max_tokens=2))
    t = time.perf_counter()
    n = drive(el, ps, params)
    dt = time.perf_counter() - t
    out[f"one_engine_plus_replica_of_{L - h}_layers"] = dict(
        tok_s=n / dt, mem_mib=memory(el, replicas=[rep.stage]), replica_rows=rep.num_rows
    )
    del el, rep

    a, b = LLMEngine.from_config(cfg), LLMEngine.from_config(cfg)
    for e in (a, b):
        drive(e, ps[:2], SamplingParams(max_tokens=2))
    half = len(ps) // 2
    counts = [0, 0]

    def work(k, e, part, first):
        one_thread()
        counts[k] = drive(e, part, params, first)

    threads = [threading.Thread(target=work, args=(0, a, ps[:half], 0)),
               threading.Thread(target=work, args=(1, b, ps[half:], half))]  # fmt: skip
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    out["two_engines"] = dict(tok_s=sum(counts) / (time.perf_counter() - t), mem_mib=memory(a, b))
    return out


# -- memory pressure -------------------------------------------------------------------------


def usage(e) -> float:
    return 1 - e.num_free_blocks / e.num_total_blocks


def time_stages(runner) -> None:
    """Wraps each stage's forward to add up its busy seconds in `stage.busy_s`."""
    for stage in runner.stages:
        stage.busy_s = 0.0

        def timed(*a, _fwd=stage.forward, _stage=stage, **kw):
            t = time.perf_counter()
            y = _fwd(*a, **kw)
            _stage.busy_s += time.perf_counter() - t
            return y

        stage.forward = timed


def timed_step(e, now: float, first: dict, overlap: bool = False) -> float:
    """Runs a step; its simulated cost. `overlap`: a pipeline's stages on two workers with
    micro-batches overlapping fully, so the step costs its slowest stage plus the rest."""
    stages = e.runner.stages if overlap else []
    busy = [s.busy_s for s in stages]
    t = time.perf_counter()
    outs = e.step()
    dt = time.perf_counter() - t
    if stages:
        spent = [s.busy_s - b for s, b in zip(stages, busy)]
        dt = dt - sum(spent) + max(spent)
    for o in outs:
        first.setdefault(o.request_id, now + dt)
    return dt


def pressure(path, args, dropping: bool, overlap: bool = False) -> dict:
    budget = args.pressure_kv_mib * MiB
    cfg = config(path, budget)
    a, b = (build_elastic_engine(cfg) for _ in range(2))
    ps = prompts(args.burst, args.long_prompt, seed=2)
    params = SamplingParams(max_tokens=args.pressure_tokens, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(ps):
        (a if i % 2 == 0 else b).add_request(f"r{i}", p, params)
    marks = DropWatermarks(Watermarks(high=0.8, low=0.5, restore_window_s=0, min_dwell_s=0))
    now, first, merged, record = 0.0, {}, None, None
    num_drops, dropped_blocks = 0, None
    while True:
        if merged is None:
            if not (a.has_unfinished() or b.has_unfinished()):
                break
            now += max(timed_step(a, now, first), timed_step(b, now, first))
            queued = len(a.scheduler.waiting) + len(b.scheduler.waiting)
            pair = PairUsage((usage(a), usage(b)), queued, max(usage(a), usage(b)))
            if dropping and marks.step(now, pair) == "drop":
                t = time.perf_counter()
                merged, record = drop_layers(a, b, budget)
                now += time.perf_counter() - t
                num_drops += 1
                dropped_blocks = merged.num_total_blocks
                time_stages(merged.runner)
        else:
            if not merged.has_unfinished():
                break
            now += timed_step(merged, now, first, overlap)
            used = merged.num_total_blocks - merged.num_free_blocks
            restore_usage = used / (2 * a.num_total_blocks)
            pair = PairUsage((usage(merged),) * 2, len(merged.scheduler.waiting), restore_usage)
            if marks.step(now, pair) == "restore":
                t = time.perf_counter()
                a, b, _ = restore_layers(merged, record)
                now += time.perf_counter() - t
                merged = None
    ttft = sorted(first.values())
    p = lambda q: ttft[min(len(ttft) - 1, int(q * len(ttft)))]
    return dict(p50_ttft_s=p(0.5), p99_ttft_s=p(0.99), makespan_s=now, drops=num_drops,
                blocks_per_engine=a.num_total_blocks,
                blocks_when_dropped=dropped_blocks)  # fmt: skip


# -- served: the same questions on real processes ------------------------------------------


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _workers(url: str) -> dict[str, dict]:
    return {w["id"]: w for w in _get(url + "/cluster")["workers"]}


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _until(url: str, check, timeout_s: float = 300.0, every_s: float = 0.05) -> dict[str, dict]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ws = _workers(url)
        if check(ws):
            return ws
        time.sleep(every_s)
    raise TimeoutError(f"/cluster never showed it; last: {_workers(url)}")


def _serve(path, decode: int, kv_mib: int):
    from tideserve.launcher import ServeProcess

    srv = ServeProcess(
        "--model", str(path), "--mode", "colocated", "--decode", str(decode),
        "--num-threads", "1", "--layer-stages", "2", "--kv-cache-bytes", str(kv_mib * MiB),
    ).start()  # fmt: skip
    try:
        _until(
            srv.url,
            lambda ws: (
                len(ws) == decode
                and all(w["state"] == "ready" and w["layers"] for w in ws.values())
            ),
        )
    except BaseException:
        srv.stop()
        raise
    return srv


def _rss_mib(ws: dict[str, dict]) -> dict[str, float]:
    import psutil

    out = {}
    for wid, w in ws.items():
        try:
            out[wid] = psutil.Process(w["pid"]).memory_info().rss / MiB
        except (psutil.NoSuchProcess, TypeError):
            out[wid] = float("nan")
    return out


def _mem(url: str) -> dict:
    ws = _workers(url)
    rss = _rss_mib(ws)
    return dict(
        rss_mib=rss,
        rss_total_mib=sum(rss.values()),
        kv_blocks_total={wid: w["kv_blocks_total"] for wid, w in ws.items()},
        layers={wid: w["layers"] for wid, w in ws.items()},
        replicas={wid: w["replicas"] for wid, w in ws.items() if w["replicas"]},
    )


async def _load(url: str, batch, max_tokens: int, concurrency: int) -> dict:
    import aiohttp

    from tideserve.bench.client import stream_completion, summarize
    from tideserve.engine.default_model import DEFAULT_MODEL_NAME

    sem = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as s:

        async def one(p):
            async with sem:
                return await stream_completion(s, url, DEFAULT_MODEL_NAME, p, max_tokens)

        t0 = time.perf_counter()
        timings = await asyncio.gather(*(one(p) for p in batch))
        res = summarize(list(timings), time.perf_counter() - t0)
    from tideserve.bench.client import percentile

    ttfts = [t.ttft_s for t in timings if t.error is None]
    res["ttft_p99_s"] = percentile(ttfts, 99)
    return res


def load(url: str, batch, max_tokens: int, concurrency: int) -> dict:
    return asyncio.run(_load(url, batch, max_tokens, concurrency))


def served_scaleup(path, args) -> dict:
    srv = _serve(path, 2, args.served_kv_mib)
    try:
        url = srv.url
        ws = _workers(url)
        a, b = sorted(ws)
        L = ws[a]["layers"][-1][1]
        back = [L // 2, L]
        admin = f"{url}/admin/workers/{a}/modules"
        rep = []
        for _ in range(args.repeats):
            body = {"action": "replicate", "layers": back, "share": 0.5, "target": b}
            t = time.perf_counter()
            status, got = _post(admin, body)
            assert status == 200, got
            _until(
                url, lambda ws: ws[a]["replicas"] and any(r["kv_bytes"] for r in ws[b]["replicas"])
            )
            rep.append(time.perf_counter() - t)
            kv = [r["kv_bytes"] for r in _workers(url)[b]["replicas"]][0]
            status, got = _post(admin, {"action": "unreplicate", "layers": back, "target": b})
            assert status == 200, got
            _until(url, lambda ws: not ws[a]["replicas"] and not ws[b]["replicas"])
        import psutil

        cmd = psutil.Process(ws[a]["pid"]).cmdline()
        i = cmd.index("--worker-id") + 1
        new, load_s = [], []
        for k in range(args.repeats):
            wid = f"colocated-new{k}"
            t = time.perf_counter()
            p = subprocess.Popen(
                [*cmd[:i], wid, *cmd[i + 1 :]],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                got = _until(
                    url, lambda ws, w=wid: w in ws and ws[w]["state"] == "ready" and ws[w]["layers"]
                )
                new.append(time.perf_counter() - t)
                load_s.append(got[wid].get("engine_load_s"))
            finally:
                p.send_signal(signal.SIGINT)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            _until(url, lambda ws, w=wid: w not in ws, timeout_s=30)
        return dict(
            replicate_layers=back,
            replicate_s=rep,
            replicate_median_s=statistics.median(rep),
            replica_kv_bytes=kv,
            new_worker_s=new,
            new_worker_median_s=statistics.median(new),
            new_worker_engine_load_s=load_s,
            kv_mib_per_worker=args.served_kv_mib,
        )
    finally:
        srv.stop()


def served_throughput(path, args) -> dict:
    batch = prompts(args.served_requests, args.served_prompt_len, seed=1)
    warm = prompts(2, args.served_prompt_len, seed=999)
    n, mt = args.served_requests, args.served_max_tokens
    out = {}
    for name in ("one_worker", "one_worker_plus_replica", "two_workers"):
        srv = _serve(path, 1 if name == "one_worker" else 2, args.served_kv_mib)
        try:
            url = srv.url
            if name == "one_worker_plus_replica":
                ws = _workers(url)
                a, b = sorted(ws)
                L = ws[a]["layers"][-1][1]
                body = {"action": "replicate", "layers": [L // 2, L], "share": 0.5, "target": b}
                status, got = _post(f"{url}/admin/workers/{a}/modules", body)
                assert status == 200, got
                _until(
                    url,
                    lambda ws, a=a, b=b: (
                        ws[a]["replicas"] and any(r["kv_bytes"] for r in ws[b]["replicas"])
                    ),
                )
                status, got = _post(f"{url}/admin/workers/{b}/drain", {})
                assert status == 200, got  # B only hosts the replica: every request goes to A
            load(url, warm, 8, 2)
            res = load(url, batch, mt, n)
            res |= _mem(url)
            out[name] = res
            brief = {k: res[k] for k in ("output_tok_s", "errors", "rss_total_mib")}
            print(name, json.dumps(brief), flush=True)
        finally:
            srv.stop()
    return out


def served_pressure(path, args) -> dict:
    batch = prompts(args.served_burst, args.served_long_prompt, seed=7)
    warm = prompts(2, 32, seed=998)
    out = {}
    for dropping in (False, True):
        srv = _serve(path, 2, args.served_pressure_kv_mib)
        try:
            url = srv.url
            load(url, warm, 4, 2)
            before = _workers(url)
            if dropping:
                a, b = sorted(before)
                status, got = _post(
                    f"{url}/admin/workers/{a}/modules", {"action": "drop", "target": b}
                )
                assert status == 200, got
                _until(
                    url,
                    lambda ws, a=a, b=b: all(
                        len(ws[w]["layers"]) == 1 and len(ws[w]["replicas"]) == 2 for w in (a, b)
                    ),
                )  # kv_blocks_total stays the Hello's (the pool before the drop)
            res = load(url, batch, args.served_pressure_tokens, len(batch))
            res |= _mem(url)
            res["kv_blocks_total_before_drop"] = {
                w: v["kv_blocks_total"] for w, v in before.items()
            }
            out["dropping_on" if dropping else "dropping_off"] = res
            print("dropping", dropping, json.dumps({k: res[k] for k in
                  ("ttft_p50_s", "ttft_p99_s", "output_tok_s", "errors")}), flush=True)  # fmt: skip
        finally:
            srv.stop()
    return out


def served(path, args) -> dict:
    res = {"args": vars(args), "cpus": os.cpu_count(), "loadavg_before": os.getloadavg()}
    res["argv"] = sys.argv
    for part, fn in (("scaleup", served_scaleup), ("throughput", served_throughput),
                     ("pressure", served_pressure)):  # fmt: skip
        if part in args.served_parts:
            try:
                res[part] = fn(path, args)
            except Exception as e:  # keep the other parts' figures
                res[f"{part}_error"] = repr(e)
                print(f"{part} failed: {e!r}", flush=True)
    res["loadavg_after"] = os.getloadavg()
    return res


def served_table(res: dict) -> None:
    if "scaleup" in res:
        s = res["scaleup"]
        print("\n| add capacity | median | runs |\n|---|---:|---|")
        print(
            f"| replicate layers {s['replicate_layers']} onto the other worker | "
            f"{s['replicate_median_s']:.2f} s | {', '.join(f'{x:.2f}' for x in s['replicate_s'])} |"
        )
        print(f"| start a whole worker process | {s['new_worker_median_s']:.2f} s | "
              f"{', '.join(f'{x:.2f}' for x in s['new_worker_s'])} |")  # fmt: skip
    if "throughput" in res:
        print(
            "\n| setup | output tok/s | TTFT p50 | TPOT p50 | worker RSS (MiB) | KV blocks "
            "| errors |"
        )
        print("|---|---:|---:|---:|---:|---|---:|")
        for name, r in res["throughput"].items():
            print(f"| {name} | {r['output_tok_s']:.1f} | {r['ttft_p50_s'] * 1e3:.0f} ms | "
                  f"{r['tpot_p50_s'] * 1e3:.0f} ms | {r['rss_total_mib']:.0f} "
                  f"({', '.join(f'{v:.0f}' for v in r['rss_mib'].values())}) | "
                  f"{list(r['kv_blocks_total'].values())} | {r['errors']} |")  # fmt: skip
    if "pressure" in res:
        print("\n| dropping | TTFT p50 | TTFT p99 | output tok/s | KV blocks | errors |")
        print("|---|---:|---:|---:|---|---:|")
        for name, r in res["pressure"].items():
            print(f"| {name} | {r['ttft_p50_s'] * 1e3:.0f} ms | {r['ttft_p99_s'] * 1e3:.0f} ms | "
                  f"{r['output_tok_s']:.1f} | {list(r['kv_blocks_total'].values())} | "
                  f"{r['errors']} |")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+", default=["scaleup", "throughput", "pressure"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 8, 15])
    ap.add_argument("--kv-mib", type=int, default=64)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--pressure-kv-mib", type=int, default=8)
    ap.add_argument("--burst", type=int, default=12)
    ap.add_argument("--long-prompt", type=int, default=256)
    ap.add_argument("--pressure-tokens", type=int, default=48)
    ap.add_argument("--served-parts", nargs="+", default=["scaleup", "throughput", "pressure"])
    ap.add_argument("--served-kv-mib", type=int, default=256, help="per worker")
    ap.add_argument("--served-requests", type=int, default=16)
    ap.add_argument("--served-prompt-len", type=int, default=128)
    ap.add_argument("--served-max-tokens", type=int, default=64)
    ap.add_argument("--served-pressure-kv-mib", type=int, default=48, help="per worker")
    ap.add_argument("--served-burst", type=int, default=16)
    ap.add_argument("--served-long-prompt", type=int, default=1024)
    ap.add_argument("--served-pressure-tokens", type=int, default=32)
    args = ap.parse_args()
    one_thread()
    path = prepare_default_model()
    if "served" in args.parts:
        res = served(path, args)
        served_table(res)
        out = HERE / "results" / f"modules-served-{time.strftime('%Y%m%d-%H%M%S')}.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(res, indent=1))
        print(f"wrote {out}")
        if set(args.parts) == {"served"}:
            return
    res = {"args": vars(args), "loadavg_before": os.getloadavg()}
    if "scaleup" in args.parts:
        res["scaleup"] = scaleup(path, args)
        print(json.dumps(res["scaleup"], indent=1), flush=True)
    if "throughput" in args.parts:
        res["throughput"] = throughput(path, args)
        print(json.dumps(res["throughput"], indent=1), flush=True)
    if "pressure" in args.parts:
        res["pressure"] = {
            "dropping_off": pressure(path, args, dropping=False),
            "dropping_on_stages_sequential": pressure(path, args, dropping=True),
            "dropping_on_stages_overlapped": pressure(path, args, dropping=True, overlap=True),
        }
        print(json.dumps(res["pressure"], indent=1), flush=True)
    out = HERE / "results" / f"modules-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
