"""Overload behaviour of `tideserve serve` on the default model (or --model DIR).

    python benchmarks/overload.py [--factor 3] [--duration 20] [--max-inflight 8]

Measures capacity (completed requests/s with --max-inflight clients in a closed loop, 32-token
answers), then offers --factor times that as Poisson arrivals for --duration seconds and
reports: requests offered / completed whole / rejected (429/503) / lost, rejection latency
p50/p99 against the admitted requests' p50, and the router's resident memory (baseline and
peak, sampled every 50 ms). Writes benchmarks/results/overload.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

from tideserve.bench.overload import RssSampler, measure_capacity, offer
from tideserve.launcher import ServeProcess

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--mode", default="colocated")
    ap.add_argument("--factor", type=float, default=3.0)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--max-inflight", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    extra = ["--model", args.model] if args.model else []
    srv = ServeProcess(
        *extra, "--mode", args.mode, "--max-inflight", str(args.max_inflight), "--dtype",
        "bfloat16", "--served-model-name", "m",
    )  # fmt: skip
    with srv:
        router = next(p for p in srv.children if "router" in p.cmdline())
        cap = asyncio.run(measure_capacity(srv.url, "m", args.max_inflight, 10.0, args.max_tokens))
        print(f"capacity: {cap:.2f} req/s at {args.max_inflight} in flight", flush=True)
        with RssSampler(router.pid) as rss:
            out = asyncio.run(
                offer(srv.url, "m", args.factor * cap, args.duration, args.max_tokens)
            )
    result = {
        "capacity_req_s": round(cap, 3),
        "offered_rate_req_s": round(args.factor * cap, 3),
        "duration_s": args.duration,
        **out.summary(),
        "router_rss_baseline_mib": round(rss.baseline / 2**20, 1),
        "router_rss_peak_mib": round(rss.peak / 2**20, 1),
    }
    print(json.dumps(result, indent=2))
    dest = HERE / "results" / "overload.json"
    dest.parent.mkdir(exist_ok=True)
    dest.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
