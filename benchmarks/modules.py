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
Results print as a table and land in benchmarks/results/modules-<time>.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
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
    args = ap.parse_args()
    one_thread()
    path = prepare_default_model()
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
