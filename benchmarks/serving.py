"""Serving benchmarks on the default model: `tideserve serve`, colocated against disaggregated.

    python benchmarks/serving.py latency      # low load: TTFT and TPOT, one request at a time
    python benchmarks/serving.py throughput   # 32 concurrent streams, 128-token prompts -> 128

latency     N sequential streaming requests (128-token prompt, 64 output tokens) per mode;
            medians of TTFT and TPOT, and disaggregated TTFT as a ratio of colocated. The
            cores are split between the workers (1 thread each for 1P+1D on 2 cores, 2 for
            the colocated worker), so on a small CPU the disaggregated prefill has half the
            compute; --all-cores gives every worker all the cores instead (they then contend).
            --per-device gives both modes two workers of one core each (colocated --decode 2,
            1 thread per worker; disaggregated 1P+1D): the one-process-per-GPU layout, in
            which disaggregation's TTFT cost is the KV hand-off, not half the compute.
            benchmarks/kv_streaming_overhead.py isolates what the KV streaming itself costs.
throughput  32 concurrent streaming clients, each a distinct 128-token prompt and exactly 128
            output tokens (ignore_eos), greedy; output tok/s and TTFT p50/p90 per mode. The peer
            on this machine, llama.cpp's llama-server with 32 slots, gives ~266 output tok/s
            (p50 TTFT ~2.6 s) in bf16 and ~189 (~4.1 s) in f32 (shared/PEERS.md).
            --peer-server PATH --peer-model GGUF adds llama.cpp's llama-server (32 slots, all
            cores, continuous batching) as a third mode in the same rounds, with the same client
            and prompts: the machine drifts, so the peer is measured beside us, not quoted. Its
            KV cache is f32 for --dtype float32 (equal precision; its default is f16 for every
            model), f16 otherwise.
Modes run one after the other, alternating (A B A B) with --rounds. Each server gets the
machine's cores split between its workers. Each row also carries `cpu_s`: the CPU seconds
each of the server's processes (router, workers; llama-server's one) spent during the load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import time
import urllib.request
from pathlib import Path

import aiohttp
import psutil

from tideserve.bench.client import stream_completion, summarize
from tideserve.engine.default_model import DEFAULT_MODEL_NAME, prepare_default_model
from tideserve.launcher import ServeProcess

HERE = Path(__file__).resolve().parent


def Serve(mode: str, dtype: str, extra: list[str]) -> ServeProcess:
    return ServeProcess("--mode", mode, "--dtype", dtype, *extra, capture=False)


class LlamaServer:
    """llama.cpp's llama-server on a free loopback port, for the same-run peer comparison."""

    # NOTE: llama-server keeps its KV cache in f16 whatever the weights' type. For a float32
    # run that would be half the KV bytes ours reads, so it gets an f32 cache (equal precision
    # end to end); a bfloat16 run keeps its default f16 cache (the same 2 bytes, its fast path).
    KV_TYPES = {"float32": "f32", "bfloat16": "f16", "float16": "f16"}

    def __init__(
        self, binary: str, gguf: str, slots: int, ctx_per_slot: int, dtype: str = "bfloat16"
    ) -> None:
        kv = self.KV_TYPES.get(dtype, "f16")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [
            binary, "-m", gguf, "--host", "127.0.0.1", "--port", str(self.port),
            "-np", str(slots), "-c", str(slots * ctx_per_slot), "-t", str(os.cpu_count() or 1),
            "-cb", "--no-webui", "--log-disable", "-ctk", kv, "-ctv", kv,
        ]  # fmt: skip

    def __enter__(self) -> LlamaServer:
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.proc.returncode}")
            time.sleep(0.5)
        self.proc.kill()
        raise TimeoutError("llama-server not ready in 120 s")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def prompts(n: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 49000) for _ in range(length)] for _ in range(n)]


async def run_load(url: str, batch: list[list[int]], max_tokens: int, concurrency: int) -> dict:
    sem = asyncio.Semaphore(concurrency)
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn) as session:

        async def one(p):
            async with sem:
                return await stream_completion(session, url, DEFAULT_MODEL_NAME, p, max_tokens)

        t0 = time.perf_counter()
        timings = await asyncio.gather(*(one(p) for p in batch))
        return summarize(list(timings), time.perf_counter() - t0)


def cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) so far of a server's processes, by part: `router`,
    `workers`, or `server` for a single process (llama-server); what the load costs each."""
    out: dict[str, float] = {}
    root = psutil.Process(pid)
    for p in [root, *root.children(recursive=True)]:
        try:
            cmd, t = " ".join(p.cmdline()), p.cpu_times()
        except psutil.Error:
            continue
        part = "server"
        if " router " in cmd:
            part = "router"
        elif " decode " in cmd or " prefill " in cmd:
            part = "workers"
        out[part] = out.get(part, 0.0) + t.user + t.system
    return out


def bench(kind: str, args) -> list[dict]:
    rows = []
    extra = ["--max-num-batched-tokens", str(args.max_batched)]
    if kind == "latency" and args.all_cores:
        extra += ["--num-threads", str(os.cpu_count() or 1)]
    if args.per_device:
        extra += ["--num-threads", "1"]
    modes = ["colocated", "disaggregated"]
    if kind == "throughput" and args.peer_server:
        modes.append("llama-server")
    modes = [m for m in modes if m in (args.modes or modes)]
    for r in range(args.rounds):
        for mode in modes:
            workers = ["--decode", "2"] if args.per_device and mode == "colocated" else []
            if mode == "llama-server":
                server = LlamaServer(
                    args.peer_server, args.peer_model, 32, 128 + 128 + 16, args.dtype
                )
            else:
                server = Serve(mode, args.dtype, extra + workers)
            with server as srv:
                warm = prompts(2, 128, seed=999)
                asyncio.run(run_load(srv.url, warm, 8, 2))
                cpu0 = cpu_seconds(srv.proc.pid)
                if kind == "latency":
                    res = asyncio.run(run_load(srv.url, prompts(args.n, 128, r), 64, 1))
                else:
                    res = asyncio.run(run_load(srv.url, prompts(32, 128, 100 + r), 128, 32))
                cpu1 = cpu_seconds(srv.proc.pid)
            res["cpu_s"] = {k: round(cpu1[k] - cpu0.get(k, 0.0), 2) for k in cpu1}
            res |= {"mode": mode, "round": r, "dtype": args.dtype, "kind": kind}
            res["setup"] = "per-device" if args.per_device else "split"
            rows.append(res)
            print(json.dumps(res), flush=True)
    return rows


def report(kind: str, rows: list[dict]) -> None:
    def med(mode: str, key: str) -> float:
        vals = sorted(r[key] for r in rows if r["mode"] == mode)
        return vals[len(vals) // 2]

    print("\n| mode | output tok/s | TTFT p50 | TTFT p90 | TPOT p50 | errors |")
    print("|---|---:|---:|---:|---:|---:|")
    for mode in dict.fromkeys(r["mode"] for r in rows):
        errs = sum(r["errors"] for r in rows if r["mode"] == mode)
        ttft50, ttft90 = med(mode, "ttft_p50_s") * 1e3, med(mode, "ttft_p90_s") * 1e3
        tpot = med(mode, "tpot_p50_s") * 1e3
        tok_s = med(mode, "output_tok_s")
        print(
            f"| {mode} | {tok_s:.1f} | {ttft50:.0f} ms | {ttft90:.0f} ms | {tpot:.1f} ms | {errs} |"
        )
    print("\nCPU seconds during the load, by process (medians):")
    for mode in dict.fromkeys(r["mode"] for r in rows):
        mine = [r["cpu_s"] for r in rows if r["mode"] == mode]
        parts = sorted({k for c in mine for k in c})
        med = {p: statistics.median(c.get(p, 0.0) for c in mine) for p in parts}
        shown = ", ".join(f"{p} {v:.2f}" for p, v in med.items())
        print(f"  {mode}: {shown}")
    if any(r["mode"] == "llama-server" for r in rows):
        for mode in [
            m for m in ("colocated", "disaggregated") if any(r["mode"] == m for r in rows)
        ]:
            ratio = med(mode, "output_tok_s") / med("llama-server", "output_tok_s")
            print(f"\n{mode} output tok/s / llama-server's (same run, medians): {ratio:.2f}")
    if kind == "latency" and {"colocated", "disaggregated"} <= {r["mode"] for r in rows}:
        ratio = med("disaggregated", "ttft_p50_s") / med("colocated", "ttft_p50_s")
        print(f"\ndisaggregated TTFT / colocated TTFT (p50): {ratio:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("kind", choices=["latency", "throughput"])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--n", type=int, default=10, help="requests per mode (latency)")
    ap.add_argument("--max-batched", type=int, default=1024, help="--max-num-batched-tokens")
    ap.add_argument("--all-cores", action="store_true", help="latency: all cores to every worker")
    ap.add_argument("--per-device", action="store_true", help="two 1-thread workers in both modes")
    ap.add_argument("--peer-server", help="throughput: a llama-server binary to run beside us")
    ap.add_argument("--peer-model", help="the GGUF it serves (same weights and precision)")
    ap.add_argument(
        "--modes", nargs="+", choices=["colocated", "disaggregated", "llama-server"],
        help="run only these modes (default: all that apply)",
    )  # fmt: skip
    args = ap.parse_args()
    prepare_default_model()
    rows = bench(args.kind, args)
    report(args.kind, rows)
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / f"serving-{args.kind}-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(
        json.dumps(rows, indent=2)
    )


if __name__ == "__main__":
    main()
