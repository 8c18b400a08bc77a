"""Simulator speed: how fast `tideserve sim` replays a trace on a simulated cluster.

    python benchmarks/sim_speed.py [--trace azure-conv] [--workers 16] [--mode colocated]
        [--duration 3600] [--repeat-hours 1] [--step-by-step] [--profile FILE.prof]

The trace (the full one-hour Azure conversation trace by default, from /work/shared/traces or
bench's sample) runs on N Llama-3-8B workers on H100-80G (roofline profile), fixed pool.
`--repeat-hours K` lays K copies of the hour end to end (a day is 24) to measure a long run at
the same rate. `--step-by-step` turns the fast decode runs off (one event and one live
`schedule()`/`update()` per engine step; the results are the same). Prints requests, workers,
simulated span, wall seconds, events and events/s; with `--profile` writes a cProfile dump of
the run. Results: benchmarks/results/sim_speed.json (appended).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

from tideserve.bench.metrics import Slo
from tideserve.bench.traces import TraceRequest
from tideserve.engine.scheduler import SchedulerConfig
from tideserve.sim.config import ROLES_OF_MODE, SimConfig, WorkerType
from tideserve.sim.perf import roofline
from tideserve.sim.run import build_trace, simulate

RESULTS = Path(__file__).resolve().parent / "results"


def repeat(trace: list[TraceRequest], times: int) -> list[TraceRequest]:
    """`times` copies of the trace end to end (same rate, `times` x the span)."""
    span = trace[-1].arrival_s - trace[0].arrival_s + 1.0
    return [
        dataclasses.replace(r, arrival_s=r.arrival_s + k * span)
        for k in range(times)
        for r in trace
    ]


def cluster(mode: str, workers: int) -> SimConfig:
    wt = WorkerType(roofline("H100-80G", "llama-3-8b"), 1, 2.49)
    roles = ROLES_OF_MODE[mode]
    if mode == "disaggregated":
        pool = {"prefill": workers // 4, "decode": workers - workers // 4}
    else:
        pool = {roles[0]: workers}
    return SimConfig(
        mode=mode,
        workers={r: wt for r in roles},
        pool=pool,
        scheduler=SchedulerConfig(256, 2048, 8192),
        slo=Slo(2000.0, 100.0),
        record_itl=False,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", default="azure-conv")
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--mode", default="colocated", choices=list(ROLES_OF_MODE))
    ap.add_argument("--duration", type=float, default=3600.0)
    ap.add_argument("--repeat-hours", type=int, default=1)
    ap.add_argument("--step-by-step", action="store_true", help="no fast decode runs")
    ap.add_argument("--profile", type=Path, help="write a cProfile dump here")
    args = ap.parse_args()
    trace, source = build_trace(args.trace, duration_s=args.duration)
    trace = repeat(trace, args.repeat_hours)
    cfg = dataclasses.replace(cluster(args.mode, args.workers), fast_decode=not args.step_by_step)
    t0 = time.perf_counter()
    if args.profile:
        import cProfile

        prof = cProfile.Profile()
        summary, c = prof.runcall(simulate, cfg, trace)
        prof.dump_stats(args.profile)
    else:
        summary, c = simulate(cfg, trace)
    wall = time.perf_counter() - t0
    sim = summary["sim"]
    row = {
        "trace": source,
        "mode": args.mode,
        "fast_decode": not args.step_by_step,
        "requests": len(trace),
        "workers": args.workers,
        "simulated_s": c.end_s,
        "wall_s": round(wall, 2),
        "events": sim["num_events"],
        "events_per_s": round(sim["num_events"] / wall),
        "requests_per_s": round(len(trace) / wall),
        "slo_attainment": summary["slo_attainment"],
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
    }
    for k, v in row.items():
        print(f"{k:>16}: {v}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "sim_speed.json"
    rows = json.loads(out.read_text()) if out.exists() else []
    rows.append(row)
    out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
