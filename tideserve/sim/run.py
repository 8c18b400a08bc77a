"""One `tideserve sim` run, or a sweep of them, from a trace and a cluster config to files.

Lifecycle (``simulate``): the trace (bench's loaders and transforms) and the `SimConfig` go
into a `Cluster`, which runs to the last request's end -> ``summarize_run`` (bench's) folds
its `RequestRecord`s into the summary, plus the simulator's cost keys (worker_seconds,
gpu_seconds, cost_usd), worker counts by role over time and the autoscaler's actions ->
``write_run`` (bench's) leaves summary.json and requests.jsonl; ``plot_timeline`` draws the
load, latency percentiles and workers by role. ``sweep`` searches the P90 goodput (bench's
``search_goodput``) for each worker count it is given and reports goodput per GPU.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

from tideserve.bench.goodput import TARGET_ATTAINMENT, search_goodput
from tideserve.bench.metrics import summarize_run
from tideserve.bench.traces import TraceRequest, load_trace, resolve_trace
from tideserve.bench.transforms import TraceShape, scale_time
from tideserve.sim.cluster import Cluster
from tideserve.sim.config import SimConfig


def build_trace(
    trace: str, shape: TraceShape | None = None, duration_s: float | None = None, seed: int = 0
) -> tuple[list[TraceRequest], str]:
    """The requests of ``trace`` (a file or short name), reshaped, cut to ``duration_s``."""
    path = resolve_trace(trace)
    reqs = load_trace(path)
    if duration_s is not None:
        reqs = [r for r in reqs if r.arrival_s < duration_s]
    reqs = (shape or TraceShape()).apply(reqs, seed)
    if not reqs:
        raise ValueError(f"no requests left in {path} after the transforms")
    return reqs, str(path)


def simulate(
    cfg: SimConfig, trace: list[TraceRequest], policy=None, **policies
) -> tuple[dict, Cluster]:
    """Runs the trace through the cluster; the summary dict and the finished cluster."""
    t0 = time.perf_counter()
    cluster = Cluster(cfg, trace, policy=policy, **policies)
    records = cluster.run()
    wall = time.perf_counter() - t0
    summary = summarize_run(records, cfg.slo, cluster.worker_seconds())
    summary["gpu_seconds"] = cluster.gpu_seconds()
    summary["cost_usd"] = cluster.cost_usd()
    summary["worker_samples"] = [[round(t, 3), sum(n.values())] for t, n in cluster.samples]
    summary["workers_by_role"] = [
        [round(t, 3), {r: c for r, c in n.items() if c or r in cfg.roles}]
        for t, n in cluster.samples
    ]
    summary["scaling_actions"] = [[round(t, 3), why] for t, why in cluster.actions]
    summary["sim"] = {
        "mode": cfg.mode,
        "wall_s": wall,
        "num_events": cluster.loop.num_events,
        "simulated_requests_per_s": len(trace) / wall if wall > 0 else None,
        "num_preemptions": sum(w.scheduler.num_preemptions for w in cluster.workers.values()),
        "worker_types": {
            role: {
                "perf": wt.perf.name,
                "source": wt.perf.source,
                "gpus": wt.gpus,
                "cost_per_gpu_hour": wt.cost_per_gpu_hour,
                "num_kv_blocks": wt.perf.num_kv_blocks,
            }
            for role, wt in cfg.workers.items()
        },
        "autoscale": cfg.autoscale.policy if cfg.autoscale else None,
        "seed": cfg.seed,
    }
    return summary, cluster


def with_pool(cfg: SimConfig, pool: dict[str, int]) -> SimConfig:
    return dataclasses.replace(cfg, pool={**cfg.pool, **pool})


def parse_pool(text: str, cfg: SimConfig) -> dict[str, int]:
    """ "4" (colocated / partial) or "2:4" (prefill:decode) -> role counts."""
    parts = [int(x) for x in text.split(":")]
    roles = cfg.roles
    if len(parts) != len(roles):
        want = ":".join(roles)
        raise ValueError(f"worker count {text!r} for mode {cfg.mode} must read {want}")
    return dict(zip(roles, parts))


def goodput(
    cfg: SimConfig, trace: list[TraceRequest], max_probes: int = 8, start: float = 1.0
) -> dict:
    """P90 goodput of the cluster on ``trace`` (rates scaled by a multiplier, the search from
    ``start``), per GPU too."""
    if not cfg.slo.is_set:
        raise ValueError("a sweep needs an SLO: [slo] ttft_ms and/or tpot_ms")
    span = trace[-1].arrival_s - trace[0].arrival_s
    if span <= 0:
        raise ValueError("a sweep needs a trace whose arrivals span some time")
    base_rps = len(trace) / span
    runs: dict[float, dict] = {}

    async def probe(m: float) -> float:
        summary, _ = simulate(cfg, scale_time(trace, 1 / m))
        runs[m] = summary
        return summary["slo_attainment"]

    found = asyncio.run(search_goodput(probe, max_probes, start=start))
    gpus = sum(cfg.workers[r].gpus * n for r, n in cfg.pool.items() if r in cfg.workers)
    rps = found.goodput_rps(base_rps)
    return {
        "pool": dict(cfg.pool),
        "gpus": gpus,
        "goodput_rps": rps,
        "goodput_rps_per_gpu": rps / gpus if gpus else None,
        "target_attainment": TARGET_ATTAINMENT,
        "base_rps": base_rps,
        "probes": [
            {
                "multiplier": p.multiplier,
                "offered_rps": runs[p.multiplier]["offered_rps"],
                "slo_attainment": p.attainment,
                "ttft_ms_p90": runs[p.multiplier]["ttft_ms"]["p90"],
                "tpot_ms_p90": runs[p.multiplier]["tpot_ms"]["p90"],
            }
            for p in found.probes
        ],
    }


def sweep(
    cfg: SimConfig, trace: list[TraceRequest], pools: list[str], max_probes: int = 8
) -> list[dict]:
    """Goodput of each worker count in ``pools`` (the config's own when empty)."""
    counts = [parse_pool(p, cfg) for p in pools] or [dict(cfg.pool)]
    return [
        goodput(dataclasses.replace(with_pool(cfg, c), autoscale=None), trace, max_probes)
        for c in counts
    ]


# -- the timeline plot --------------------------------------------------------------------------


def plot_timeline(path: Path, summary: dict, rows: list[dict], bins: int = 60) -> Path:
    """Offered and completed load, TTFT/TPOT p50 and p90, and workers by role over time."""
    from tideserve.bench.client import percentile
    from tideserve.bench.plots import _pyplot

    plt = _pyplot()
    end = max([r["scheduled_s"] for r in rows] + [r["end_s"] or 0 for r in rows] + [1.0])
    width = end / bins
    edges = [i * width for i in range(bins)]
    fig, (rate_ax, lat_ax, work_ax) = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    offered, done = [0] * bins, [0] * bins
    ttft: list[list[float]] = [[] for _ in range(bins)]
    tpot: list[list[float]] = [[] for _ in range(bins)]
    for r in rows:
        offered[min(int(r["scheduled_s"] / width), bins - 1)] += 1
        if r.get("ok"):
            k = min(int(r["end_s"] / width), bins - 1)
            done[k] += 1
            j = min(int(r["send_s"] / width), bins - 1)
            ttft[j].append(r["ttft_ms"])
            if r.get("tpot_ms") is not None:
                tpot[j].append(r["tpot_ms"])
    rate_ax.step(edges, [c / width for c in offered], where="post", label="offered")
    rate_ax.step(edges, [c / width for c in done], where="post", label="completed")
    rate_ax.set_ylabel("requests/s")
    rate_ax.legend()
    for series, name in ((ttft, "TTFT"), (tpot, "TPOT")):
        for q, style in ((50, "-"), (90, "--")):
            ys = [percentile(v, q) if v else float("nan") for v in series]
            lat_ax.plot(edges, ys, style, label=f"{name} p{q}")
    slo = summary.get("slo") or {}
    for key in ("ttft_ms", "tpot_ms"):
        if slo.get(key) is not None:
            lat_ax.axhline(slo[key], color="grey", linewidth=0.8, linestyle=":")
    lat_ax.set_yscale("log")
    lat_ax.set_ylabel("latency (ms), by send time")
    lat_ax.legend(ncol=2, fontsize="small")
    samples = summary.get("workers_by_role") or []
    roles = sorted({r for _, n in samples for r in n})
    for role in roles:
        xs = [t for t, _ in samples] + [end]
        ys = [n.get(role, 0) for _, n in samples]
        work_ax.step(xs, ys + ys[-1:], where="post", label=role)
    work_ax.set_ylabel("workers")
    work_ax.set_xlabel("simulated time (s)")
    work_ax.legend()
    for ax in (rate_ax, lat_ax, work_ax):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
