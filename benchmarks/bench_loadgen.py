"""How fast one `tideserve bench` process can drive load, and how late it sends.

    python benchmarks/bench_loadgen.py                      # rates 100 250 500 750 1000 1500
    python benchmarks/bench_loadgen.py --rates 500 --duration 10

An instant fake streaming server (``tideserve.bench.fake_server``, its own process, no delays:
each response is ``--output-tokens`` SSE chunks in one write, then usage and [DONE]) is
driven by the bench's open-loop replay (the code path of `tideserve bench`, on uvloop) with
Poisson arrivals at each rate for ``--duration`` seconds. Per rate: the achieved send and
completion rates, failures, and the send lag (send time - scheduled time) p50/p99/max. The
highest rate with p99 lag under ``--max-lag-ms`` and no failure is the figure to quote (target:
>= 500 streaming req/s with p99 lag < 5 ms). The server shares the machine's cores with the
client, so the figure is a floor for the client alone.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from tideserve.bench.metrics import Slo, summarize_run
from tideserve.bench.prompts import PromptMaker
from tideserve.bench.runner import RunConfig, replay, run_async
from tideserve.bench.transforms import synthetic

HERE = Path(__file__).resolve().parent


def start_fake_server() -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tideserve.bench.fake_server"], stdout=subprocess.PIPE, text=True
    )
    line = proc.stdout.readline()
    if not line.startswith("READY "):
        proc.kill()
        raise RuntimeError(f"fake server did not start: {line!r}")
    return proc, line.split()[1]


def measure(url: str, rate: float, args) -> dict:
    trace = synthetic("poisson", rate, args.duration, args.prompt_tokens, args.output_tokens)
    cfg = RunConfig(url, "fake-model", timeout_s=30, show_progress=False, meter_workers=False)
    res = run_async(replay(trace, PromptMaker.token_ids(), cfg))
    s = summarize_run(res.records, Slo())
    sends = sorted(r.send_s for r in res.records if r.send_s is not None)
    lag = s["send_lag_ms"]
    return {
        "rate": rate,
        "requests": s["num_requests"],
        "failed": s["num_failed"],
        "send_rps": (len(sends) - 1) / (sends[-1] - sends[0]) if len(sends) > 1 else 0.0,
        "completed_rps": s["throughput_rps"],
        "lag_p50_ms": lag["p50"],
        "lag_p99_ms": lag["p99"],
        "lag_max_ms": lag["max"],
        "ttft_p50_ms": s["ttft_ms"]["p50"],
        "e2e_p99_ms": s["e2e_ms"]["p99"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rates", type=float, nargs="+", default=[100, 250, 500, 750, 1000, 1500])
    ap.add_argument("--duration", type=float, default=10.0, help="seconds of arrivals per rate")
    ap.add_argument("--output-tokens", type=int, default=16, help="SSE chunks per response")
    ap.add_argument("--prompt-tokens", type=int, default=32, help="token ids per prompt")
    ap.add_argument("--max-lag-ms", type=float, default=5.0, help="p99 send lag allowed")
    args = ap.parse_args()
    proc, url = start_fake_server()
    rows = []
    try:
        for rate in args.rates:
            row = measure(url, rate, args)
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        proc.terminate()
        proc.wait(10)
    print(
        "\n| offered req/s | sent req/s | completed req/s | failed | lag p50 | lag p99 | lag max |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['rate']:.0f} | {r['send_rps']:.0f} | {r['completed_rps']:.0f} | {r['failed']} "
            f"| {r['lag_p50_ms']:.2f} ms | {r['lag_p99_ms']:.2f} ms | {r['lag_max_ms']:.1f} ms |"
        )
    good = [r["rate"] for r in rows if r["failed"] == 0 and r["lag_p99_ms"] < args.max_lag_ms]
    best = max(good, default=None)
    print(f"\nhighest rate with p99 send lag < {args.max_lag_ms} ms and no failure: {best} req/s")
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / f"loadgen-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
