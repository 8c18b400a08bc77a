"""`tideserve sim` and `tideserve profile`: the cluster simulator and its calibration.

    tideserve sim --trace NAME|FILE --config C.toml --out DIR [--duration S] [--time-scale X]
        [--rate-scale X] [--max-requests N] [--seed S] [--sweep [--pools 1:2,2:4]] [--no-plots]
    tideserve profile --out PROFILE.json [--model DIR] [--quick] [--threads 1] [--dtype auto]

`sim` writes DIR/summary.json (bench's keys plus worker_seconds, gpu_seconds, cost_usd,
workers_by_role, scaling_actions, sim), DIR/requests.jsonl and DIR/timeline.png; with --sweep
it searches the P90 goodput of each worker count instead and writes DIR/sweep.json.
`profile` times the real engine on this machine and writes a profile a config can name
(`[workers.default] profile = "PROFILE.json"`). An error is one line and exit code 2.
Only argparse is imported until the command runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_parser(subparsers) -> None:
    """Register ``sim`` and ``profile`` on the ``tideserve`` subcommand parsers."""
    p = subparsers.add_parser(
        "sim",
        help="simulate a cluster on a trace with the live routing, batching and scaling code",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--trace", required=True, help="trace file or short name (see bench)")
    p.add_argument("--config", required=True, type=Path, help="cluster TOML")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--duration", type=float, help="only arrivals in the first S seconds")
    p.add_argument("--time-scale", type=float, default=1.0, help="multiply arrival times by X")
    p.add_argument("--rate-scale", type=float, default=1.0, help="multiply the rate, keep span")
    p.add_argument("--max-requests", type=int, help="only the first N requests")
    p.add_argument("--seed", type=int, help="override the config's seed")
    p.add_argument("--sweep", action="store_true", help="P90 goodput search per worker count")
    p.add_argument("--pools", help="sweep: worker counts, e.g. 2,4,8 or 1:2,2:4 (P:D)")
    p.add_argument("--probes", type=int, default=8, help="sweep: runs per goodput search")
    p.add_argument("--no-itl", action="store_true", help="do not keep inter-token gaps")
    p.add_argument("--no-plots", action="store_true", help="skip timeline.png")
    p.set_defaults(func=cmd_sim)

    prof = subparsers.add_parser(
        "profile", help="measure this machine's engine step times for the simulator"
    )
    prof.add_argument("--out", required=True, type=Path, help="profile JSON to write")
    prof.add_argument("--model", help="model folder (default: the embedded default model)")
    prof.add_argument("--quick", action="store_true", help="fewer, smaller shapes")
    prof.add_argument("--kv-cache-mb", type=int, default=512, help="KV budget of the engine")
    prof.add_argument("--threads", type=int, default=1, help="torch threads (as serve's workers)")
    prof.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    prof.set_defaults(func=cmd_profile)


def _error(message: str) -> int:
    print(f"tideserve sim: error: {message}", file=sys.stderr)
    return 2


def cmd_sim(args: argparse.Namespace) -> int:
    import dataclasses

    from tideserve.bench.report import format_summary, load_run, write_run
    from tideserve.bench.traces import TraceError
    from tideserve.bench.transforms import TraceShape
    from tideserve.sim.config import load_config
    from tideserve.sim.run import build_trace, plot_timeline, simulate, sweep

    try:
        cfg = load_config(args.config)
        if args.seed is not None:
            cfg = dataclasses.replace(cfg, seed=args.seed)
        if args.no_itl:
            cfg = dataclasses.replace(cfg, record_itl=False)
        shape = TraceShape(
            time_scale=args.time_scale,
            rate_scale=args.rate_scale,
            max_requests=args.max_requests,
        )
        trace, source = build_trace(args.trace, shape, args.duration, cfg.seed)
        args.out.mkdir(parents=True, exist_ok=True)
        if args.sweep:
            pools = [p for p in (args.pools or "").split(",") if p]
            rows = sweep(cfg, trace, pools, args.probes)
            (args.out / "sweep.json").write_text(json.dumps(rows, indent=2) + "\n")
            for r in rows:
                per = r["goodput_rps_per_gpu"]
                print(
                    f"pool {r['pool']}: {r['gpus']} GPUs, P90 goodput {r['goodput_rps']:.2f} "
                    f"req/s, {per:.3f} req/s per GPU"
                )
            print(f"results: {args.out / 'sweep.json'}")
            return 0
        summary, cluster = simulate(cfg, trace)
    except (TraceError, ValueError, OSError) as e:
        return _error(str(e))
    summary["config"] = {"trace": source, "cluster": str(args.config), "seed": cfg.seed}
    write_run(args.out, summary, cluster.records)
    print(format_summary(summary))
    sim = summary["sim"]
    print(
        f"cost: {summary['worker_seconds']:.0f} worker-s, {summary['gpu_seconds']:.0f} GPU-s, "
        f"${summary['cost_usd']:.2f}; simulated {len(trace)} requests in {sim['wall_s']:.1f} s "
        f"({sim['simulated_requests_per_s']:.0f} req/s)"
    )
    if not args.no_plots:
        from tideserve.bench.plots import PlotsUnavailable

        try:
            plot_timeline(args.out / "timeline.png", *load_run(args.out))
        except PlotsUnavailable as e:
            print(f"note: {e}", file=sys.stderr)
    print(f"results: {args.out}")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from tideserve.sim.perf import save_profile
    from tideserve.sim.profile import profile_engine

    try:
        model = profile_engine(
            args.model, args.quick, args.kv_cache_mb << 20, args.threads, args.dtype
        )
    except (ValueError, OSError) as e:
        return _error(str(e))
    save_profile(model, args.out)
    s = model.step
    print(
        f"step_s = {s.base_s:.4g} + {s.prefill_token_s:.3g} * prefill_tokens + "
        f"{s.decode_seq_s:.3g} * decodes + {s.context_token_s:.3g} * context_tokens + "
        f"{s.prefill_pair_s:.3g} * prefill_attention_pairs"
    )
    q = model.fit
    print(
        f"fit: R^2 {q['r2']:.4f}; mean relative error {q['all']['mean_rel_error']:.1%} "
        f"(prefill steps {q['prefill']['mean_rel_error']:.1%}, "
        f"decode steps {q['decode']['mean_rel_error']:.1%}) over {q['all']['num_steps']} steps"
    )
    print(f"profile: {args.out}")
    return 0
