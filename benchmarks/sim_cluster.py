"""The cluster experiments of docs/results.md, in the simulator (Llama-3-8B on H100-80G).

    python benchmarks/sim_cluster.py policies [--traces azure-conv,azure-code] [--rate-scale 4]
        [--duration 3600]
    python benchmarks/sim_cluster.py ecoserve [--sizes 8,16,32] [--per-instance 600] [--probes 7]
    python benchmarks/sim_cluster.py plot [--out docs/img] [--timelines TRACE:POLICY/MODE,...]

Every worker is one H100-80G serving Llama-3-8B (the roofline profile of tideserve/sim/perf.py,
bf16, tp 1), $2.49 per GPU-hour, with one scheduler config (max_num_seqs 256, 2048-token steps,
max_model_len 8192) and one SLO throughout: TTFT <= 1 s, TPOT <= 50 ms.

policies  Each trace (a whole hour; `--rate-scale` multiplies its rate, keeping its shape: at
          the default x4, 22 req/s of conversation or 10 req/s of code) through:
          - static peak provisioning: the fewest workers (colocated: N; disaggregated: D, and
            P = ceil(D x the trace's prefill:decode GPU demand ratio)) that keep >= 99% SLO
            attainment over the hour, found by bisection;
          - `utilization`, `coordinated` and `slo`, each colocated and disaggregated, starting
            from half the static peak pool (--start-full: all of it; partial: the colocated
            one), bounds 1..64 per pool,
            decisions every 5 s over a 30 s window, 10 s actuator delay (+ the ~28 s
            start-up of the profile);
          - partial (PaDG) with `mitosis`.
          Reports SLO attainment, GPU-hours, requests within the SLO per GPU-hour, and the
          saving against static peak provisioning.
ecoserve  P90 goodput (bench's search_goodput: the highest rate with >= 90% attainment) of a
          fixed pool of 8, 16 and 32 instances: colocated, disaggregated (P:D split as the
          segment's prefill:decode GPU demand, ~1.3: 5:3 at 8 instances) and partial
          (macro instances of up to 4), on the Azure conversation trace (its first
          `--per-instance` x instances requests, so a probe at the goodput lasts
          ~30 s; the search compresses their arrivals from `--start-per-instance` x
          instances times the trace's rate, doubling or halving, then bisecting).
plot      From sim_cluster_policies.json: SLO attainment against GPU-hours of every
          combination, per trace (OUT/sim_policies.png); and the timeline (load, latency
          percentiles, workers by role) of the runs named by --timelines, run again
          (OUT/sim_timeline_<trace>_<policy>_<mode>.png).
Results: benchmarks/results/sim_cluster_<experiment>.json, and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

from tideserve.bench.metrics import Slo
from tideserve.bench.transforms import TraceShape
from tideserve.engine.scheduler import SchedulerConfig
from tideserve.policy.autoscale import Bounds
from tideserve.sim.config import ROLES_OF_MODE, AutoscaleConfig, SimConfig, WorkerType
from tideserve.sim.perf import PerfModel, attention_pairs, roofline
from tideserve.sim.run import build_trace, goodput, simulate

RESULTS = Path(__file__).resolve().parent / "results"
SLO = Slo(1000.0, 50.0)
SCHEDULER = SchedulerConfig(256, 2048, 8192)
COST_PER_GPU_HOUR = 2.49
TARGET = 0.99  # the attainment the question asks for


def worker() -> WorkerType:
    return WorkerType(roofline("H100-80G", "llama-3-8b"), 1, COST_PER_GPU_HOUR)


def cluster(mode: str, pool: dict[str, int], autoscale: AutoscaleConfig | None = None):
    wt = worker()
    return SimConfig(
        mode=mode,
        workers={r: wt for r in ROLES_OF_MODE[mode]},
        pool=pool,
        scheduler=SCHEDULER,
        slo=SLO,
        autoscale=autoscale,
        record_itl=False,
    )


def decode_tps(perf: PerfModel, tpot_s: float, context: float) -> float:
    """Decode tokens/s of one worker at the TPOT SLO: the largest batch whose step fits."""
    best = 0.0
    for b in range(1, SCHEDULER.max_num_seqs + 1):
        step = perf.step_s(0, b, int(b * context))
        if step > tpot_s:
            break
        best = b / step
    return best


def prefill_tps(perf: PerfModel, prompt: int) -> float:
    """Prompt tokens/s of one prefill worker on prompts of `prompt` tokens, in full chunks."""
    chunk = SCHEDULER.max_num_batched_tokens
    done, secs = 0, 0.0
    while done < prompt:
        n = min(chunk, prompt - done)
        secs += perf.step_s(n, 0, done + n, attention_pairs(done, n))
        done += n
    return prompt / secs


def pd_demand(trace) -> float:
    """Prefill GPU-seconds per decode GPU-second the trace asks for (performance model)."""
    perf = worker().perf
    mean_in = sum(r.input_tokens for r in trace) / len(trace)
    mean_out = sum(r.output_tokens for r in trace) / len(trace)
    d_tps = decode_tps(perf, SLO.tpot_ms / 1e3, mean_in + mean_out / 2)
    return (mean_in / prefill_tps(perf, int(mean_in))) / (mean_out / d_tps)


def run(cfg: SimConfig, trace) -> dict:
    s, c = simulate(cfg, trace)
    ok = s["slo_attainment"] * s["num_requests"]
    gpu_h = s["gpu_seconds"] / 3600
    peak = max((n for _, n in s["worker_samples"]), default=0)
    return {
        "slo_attainment": round(s["slo_attainment"], 4),
        "gpu_hours": round(gpu_h, 2),
        "cost_usd": round(s["cost_usd"], 2),
        "good_requests_per_gpu_hour": round(ok / gpu_h) if gpu_h else None,
        "peak_workers": peak,
        "ttft_ms_p90": round(s["ttft_ms"]["p90"] or 0, 1),
        "tpot_ms_p90": round(s["tpot_ms"]["p90"] or 0, 1),
        "num_scaling_actions": len(s["scaling_actions"]),
        "wall_s": round(s["sim"]["wall_s"], 1),
    }


def smallest(ok, lo: int, hi: int) -> int:
    """The smallest n in [lo, hi] with ok(n), ok monotone (hi when none)."""
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid + 1, hi)
    return lo


def static_peak(mode: str, trace, pd_ratio: float, log: list) -> tuple[dict, dict]:
    """The fewest workers that keep >= TARGET attainment over the whole trace (disaggregated:
    P = ceil(D x pd_ratio), the demand ratio of the trace, searching D)."""
    runs: dict[int, dict] = {}

    def pool_of(n: int) -> dict[str, int]:
        if mode == "colocated":
            return {"colocated": n}
        return {"prefill": max(1, math.ceil(n * pd_ratio)), "decode": n}

    def meets(n: int) -> bool:
        r = runs[n] = run(cluster(mode, pool_of(n)), trace)
        log.append({"mode": mode, "pool": pool_of(n), **r})
        print(f"  static {pool_of(n)}: {r['slo_attainment']:.4f} ({r['wall_s']} s)", flush=True)
        return r["slo_attainment"] >= TARGET

    n = smallest(meets, 1, 48)
    pool = pool_of(n)
    r = runs[n] if n in runs else run(cluster(mode, pool), trace)
    return pool, r


START_FULL = False  # --start-full: autoscaled runs start from the static pool, not half of it


def _start(static_pool: dict[str, int]) -> dict[str, int]:
    """An autoscaled run starts from half the static peak pool (or all of it, --start-full),
    and the policy takes it from there."""
    return dict(static_pool) if START_FULL else {k: max(1, v // 2) for k, v in static_pool.items()}


def _autoscale(mode: str, policy: str, opts: dict) -> AutoscaleConfig:
    bounds = Bounds(
        min_prefill=1 if mode == "disaggregated" else 0, max_prefill=64,
        min_decode=1 if mode == "disaggregated" else 0, max_decode=64,
        min_colocated=1 if mode == "colocated" else 0, max_colocated=64,
        min_partial=1 if mode == "partial" else 0, max_partial=64,
    )  # fmt: skip
    return AutoscaleConfig(policy, 5.0, 30.0, 10.0, bounds, opts)


def autoscaled(mode: str, policy: str, start: dict[str, int], trace, opts: dict) -> dict:
    return run(cluster(mode, start, _autoscale(mode, policy, opts)), trace)


def policies(args) -> dict:
    out: dict = {"slo": dataclasses.asdict(SLO), "rate_scale": args.rate_scale, "traces": {}}
    perf = worker().perf
    for name in args.traces.split(","):
        t0 = time.perf_counter()
        trace, source = build_trace(name, TraceShape(rate_scale=args.rate_scale), args.duration)
        mean_in = sum(r.input_tokens for r in trace) / len(trace)
        mean_out = sum(r.output_tokens for r in trace) / len(trace)
        d_tps = decode_tps(perf, SLO.tpot_ms / 1e3, mean_in + mean_out / 2)
        p_tps = prefill_tps(perf, int(mean_in))
        coord = {"decode_tps_per_worker": round(d_tps), "prefill_tps_per_worker": round(p_tps)}
        pd_ratio = pd_demand(trace)  # prefill / decode GPU demand
        print(f"{name}: {len(trace)} requests; coordinated {coord}", flush=True)
        rows, log = {}, []
        starts = {}
        for mode in ("colocated", "disaggregated"):
            if args.static_from:  # the searches of an earlier run (same trace, rate and SLO)
                old = json.loads(args.static_from.read_text())["traces"][name]
                rows[f"static/{mode}"] = old["rows"][f"static/{mode}"]
                log = old["static_search"]
            else:
                pool, r = static_peak(mode, trace, pd_ratio, log)
                rows[f"static/{mode}"] = {"pool": pool, **r}
            starts[mode] = _start(rows[f"static/{mode}"]["pool"])
        old_rows = json.loads(args.merge.read_text())["traces"][name]["rows"] if args.merge else {}
        only = set(filter(None, (args.only or "").split(",")))
        starts["partial"] = {"partial": starts["colocated"]["colocated"]}
        combos = [(p, m) for p in ("utilization", "coordinated", "slo")
                  for m in ("colocated", "disaggregated")] + [("mitosis", "partial")]  # fmt: skip
        for policy, mode in combos:
            key = f"{policy}/{mode}"
            if only and key not in only:
                rows[key] = old_rows[key]  # kept from --merge
                continue
            opts = coord if policy == "coordinated" else {}
            rows[key] = autoscaled(mode, policy, starts[mode], trace, opts)
            print(f"  {key}: {rows[key]}", flush=True)
        out["traces"][name] = {
            "source": source,
            "num_requests": len(trace),
            "coordinated_options": coord,
            "pd_demand_ratio": round(pd_ratio, 3),
            "rows": rows,
            "static_search": log,
            "wall_s": round(time.perf_counter() - t0, 1),
        }
    return out


def ecoserve(args) -> dict:
    out: dict = {"slo": dataclasses.asdict(SLO), "sizes": {}}
    for n in (int(x) for x in args.sizes.split(",")):
        t0 = time.perf_counter()
        trace, _ = build_trace("azure-conv", TraceShape(max_requests=args.per_instance * n))
        p = max(1, min(n - 1, round(n * pd_demand(trace) / (1 + pd_demand(trace)))))
        pools = {
            "colocated": ("colocated", {"colocated": n}),
            "disaggregated": ("disaggregated", {"prefill": p, "decode": n - p}),
            "partial": ("partial", {"partial": n}),
        }
        row = {}
        old = json.loads(args.merge.read_text())["sizes"].get(str(n), {}) if args.merge else {}
        for label, (mode, pool) in pools.items():
            if args.modes and label not in args.modes.split(","):
                row[label] = old[label]  # kept from --merge
                continue
            g = goodput(cluster(mode, pool), trace, args.probes, start=args.start_per_instance * n)
            row[label] = {
                "pool": pool,
                "goodput_rps": round(g["goodput_rps"], 2),
                "goodput_rps_per_gpu": round(g["goodput_rps_per_gpu"], 3),
                "probes": g["probes"],
            }
            print(f"{n} instances, {label}: {g['goodput_rps']:.2f} req/s", flush=True)
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        out["sizes"][str(n)] = row
    return out


def plot(args) -> None:
    from tideserve.bench.plots import _pyplot
    from tideserve.bench.report import load_run, write_run
    from tideserve.sim.run import plot_timeline

    res = json.loads((RESULTS / "sim_cluster_policies.json").read_text())
    args.out.mkdir(parents=True, exist_ok=True)
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(res["traces"]), figsize=(6 * len(res["traces"]), 4.5))
    for ax, (name, t) in zip([axes] if len(res["traces"]) == 1 else axes, res["traces"].items()):
        for key, r in t["rows"].items():
            marker = "s" if key.startswith("static") else "^" if "partial" in key else "o"
            ax.scatter(r["gpu_hours"], 100 * r["slo_attainment"], marker=marker)
            ax.annotate(key, (r["gpu_hours"], 100 * r["slo_attainment"]), fontsize=7)
        ax.axhline(100 * TARGET, color="grey", linestyle=":", linewidth=0.8)
        ax.set_title(f"{name}, x{res['rate_scale']} rate, 1 h")
        ax.set_xlabel("GPU-hours (H100-80G)")
        ax.set_ylabel("SLO attainment (%)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out / "sim_policies.png", dpi=100)
    plt.close(fig)
    for spec in filter(None, args.timelines.split(",")):
        name, combo = spec.split(":")
        policy, mode = combo.split("/")
        trace, _ = build_trace(name, TraceShape(rate_scale=res["rate_scale"]), 3600.0)
        t = res["traces"][name]
        if policy == "static":
            cfg = cluster(mode, t["rows"][combo]["pool"])
        else:
            base = t["rows"]["static/colocated" if mode == "partial" else f"static/{mode}"]
            start = _start(base["pool"])
            if mode == "partial":
                start = {"partial": start["colocated"]}
            opts = t["coordinated_options"] if policy == "coordinated" else {}
            cfg = cluster(mode, start, _autoscale(mode, policy, opts))
        summary, c = simulate(cfg, trace)
        run_dir = RESULTS / "sim_cluster_runs" / f"{name}_{policy}_{mode}"
        write_run(run_dir, summary, c.records)
        path = args.out / f"sim_timeline_{name}_{policy}_{mode}.png"
        plot_timeline(path, *load_run(run_dir))
        print(f"{path}: attainment {summary['slo_attainment']:.4f}", flush=True)


def table(kind: str, res: dict) -> str:
    lines = []
    if kind == "policies":
        for name, t in res["traces"].items():
            static = {
                m: t["rows"][f"static/{m}"]["gpu_hours"] for m in ("colocated", "disaggregated")
            }
            best_static = min(static.values())
            lines += [f"\n{name} ({t['num_requests']} requests, x{res['rate_scale']} rate)\n"]
            lines += [
                "| policy / mode | SLO attainment | GPU-hours | GPU-h saved vs best static "
                "| good req per GPU-h | peak workers |"
            ]
            lines += ["|---|---:|---:|---:|---:|---:|"]
            for key, r in t["rows"].items():
                pool = f" {r['pool']}" if "pool" in r else ""
                save = 1 - r["gpu_hours"] / best_static
                lines.append(
                    f"| {key}{pool} | {r['slo_attainment']:.2%} | {r['gpu_hours']:.1f} | "
                    f"{save:+.0%} | {r['good_requests_per_gpu_hour']} | {r['peak_workers']} |"
                )
    else:
        lines += [
            "| instances | colocated | disaggregated | partial "
            "| partial / colocated | partial / disaggregated |"
        ]
        lines += ["|---:|---:|---:|---:|---:|---:|"]
        for n, row in res["sizes"].items():
            c, d, p = (
                row[k]["goodput_rps_per_gpu"] for k in ("colocated", "disaggregated", "partial")
            )
            lines.append(f"| {n} | {c:.3f} | {d:.3f} | {p:.3f} | {p / c:.2f}x | {p / d:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="kind", required=True)
    p = sub.add_parser("policies")
    p.add_argument("--traces", default="azure-conv,azure-code")
    p.add_argument("--rate-scale", type=float, default=4.0)
    p.add_argument("--duration", type=float, default=3600.0)
    p.add_argument("--static-from", type=Path, help="reuse the static searches of this JSON")
    p.add_argument("--start-full", action="store_true", help="start from the static pool")
    p.add_argument("--only", help="run only these combinations (e.g. mitosis/partial) ...")
    p.add_argument("--merge", type=Path, help="... and take the others from this JSON")
    e = sub.add_parser("ecoserve")
    e.add_argument("--sizes", default="8,16,32")
    e.add_argument("--per-instance", type=int, default=600)
    e.add_argument("--probes", type=int, default=7)
    e.add_argument("--start-per-instance", type=float, default=2.0)
    e.add_argument("--modes", help="run only these modes (e.g. partial) ...")
    e.add_argument("--merge", type=Path, help="... and take the others from this JSON")
    pl = sub.add_parser("plot")
    pl.add_argument("--out", type=Path, default=RESULTS.parent.parent / "docs" / "img")
    pl.add_argument(
        "--timelines",
        default="azure-conv:static/colocated,azure-conv:slo/colocated,azure-conv:mitosis/partial",
    )
    args = ap.parse_args()
    global START_FULL
    START_FULL = getattr(args, "start_full", False)
    if args.kind == "plot":
        plot(args)
        return
    t0 = time.perf_counter()
    res = policies(args) if args.kind == "policies" else ecoserve(args)
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"sim_cluster_{args.kind}.json").write_text(json.dumps(res, indent=2) + "\n")
    print(table(args.kind, res))
    print(f"\nwall time {res['wall_s']} s")


if __name__ == "__main__":
    main()
