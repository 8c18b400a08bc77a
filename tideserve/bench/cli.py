"""`tideserve bench`: replay a trace against any OpenAI-compatible endpoint; compare runs.

    tideserve bench --endpoint URL (--trace NAME|FILE | --synthetic poisson|gamma --rate R
        --duration S) [--time-scale X] [--rate-scale X] [--max-input-tokens N]
        [--max-output-tokens N] [--slo-ttft-ms T] [--slo-tpot-ms T] [--goodput]
        [--max-requests N] [--seed S] [--model NAME] --out DIR
    tideserve bench compare DIR1 DIR2 ... [--out DIR]

Trace short names: azure-conv, azure-code, mooncake-conv, mooncake-synthetic. A run writes
DIR/summary.json (schema: tideserve/bench/SCHEMA.md), DIR/requests.jsonl and PNG plots, and
prints a summary table. An error (unreachable endpoint, bad trace) is one line and exit code 2.
Only argparse is imported until the command runs, so `tideserve --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``bench`` (and ``bench compare``) on the ``tideserve`` subcommand parsers."""
    p = subparsers.add_parser(
        "bench",
        help="trace-replay load generator for any OpenAI-compatible endpoint",
        usage="tideserve bench --endpoint URL (--trace NAME|FILE | --synthetic poisson|gamma "
        "--rate R --duration S) [options] --out DIR\n"
        "       tideserve bench compare DIR [DIR ...] [--out DIR]",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--endpoint", help="base URL, e.g. http://127.0.0.1:8000")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--trace", help="trace file (Azure, BurstGPT, Mooncake, generic) or name")
    src.add_argument("--synthetic", choices=["poisson", "gamma"], help="synthetic arrivals")
    p.add_argument("--rate", type=float, help="synthetic: requests per second")
    p.add_argument("--duration", type=float, help="synthetic: seconds of arrivals")
    p.add_argument("--gamma-shape", type=float, default=0.5, help="synthetic gamma: shape")
    p.add_argument("--input-tokens", type=int, default=256, help="synthetic: prompt tokens")
    p.add_argument("--output-tokens", type=int, default=64, help="synthetic: output tokens")
    p.add_argument("--time-scale", type=float, default=1.0, help="multiply arrival times by X")
    p.add_argument("--rate-scale", type=float, default=1.0, help="multiply the rate, keep span")
    p.add_argument("--input-scale", type=float, default=1.0, help="multiply prompt lengths")
    p.add_argument("--output-scale", type=float, default=1.0, help="multiply output lengths")
    p.add_argument("--max-input-tokens", type=int, help="clip prompt lengths")
    p.add_argument("--max-output-tokens", type=int, help="clip output lengths")
    p.add_argument("--max-requests", type=int, help="send only the first N requests")
    p.add_argument("--slo-ttft-ms", type=float, help="TTFT target (ms)")
    p.add_argument("--slo-tpot-ms", type=float, help="TPOT target (ms)")
    p.add_argument("--goodput", action="store_true", help="search the rate with >=90%% in SLO")
    p.add_argument("--goodput-probes", type=int, default=8, help="runs the search may spend")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", help="model name to send (default: from GET /v1/models)")
    p.add_argument(
        "--tokenizer",
        default="auto",
        help="model folder with tokenizer.json, 'none' for token-id prompts, or 'auto'",
    )
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--out", type=Path, help="output folder")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_bench)

    sub = p.add_subparsers(dest="bench_command")
    cmp = sub.add_parser("compare", help="compare runs side by side and overlay their CDFs")
    cmp.add_argument("runs", nargs="+", type=Path, help="run folders (each with summary.json)")
    cmp.add_argument("--out", type=Path, default=None, help="plots folder (default: first run)")
    cmp.set_defaults(func=cmd_compare)
    return p


def _error(message: str) -> int:
    print(f"tideserve bench: error: {message}", file=sys.stderr)
    return 2


def cmd_bench(args: argparse.Namespace) -> int:
    if args.endpoint is None or args.out is None:
        return _error("--endpoint URL and --out DIR are required (see tideserve bench --help)")
    import aiohttp

    from tideserve.bench.benchmark import BenchError, BenchOptions, run_benchmark
    from tideserve.bench.metrics import Slo
    from tideserve.bench.report import format_summary
    from tideserve.bench.runner import run_async
    from tideserve.bench.transforms import TraceShape

    try:
        opts = BenchOptions(
            endpoint=args.endpoint.rstrip("/").removesuffix("/v1"),
            out_dir=args.out,
            trace=args.trace,
            synthetic=args.synthetic,
            rate=args.rate,
            duration_s=args.duration,
            gamma_shape=args.gamma_shape,
            input_tokens=args.input_tokens,
            output_tokens=args.output_tokens,
            shape=TraceShape(
                time_scale=args.time_scale,
                rate_scale=args.rate_scale,
                input_scale=args.input_scale,
                output_scale=args.output_scale,
                max_input_tokens=args.max_input_tokens,
                max_output_tokens=args.max_output_tokens,
                max_requests=args.max_requests,
            ),
            slo=Slo(args.slo_ttft_ms, args.slo_tpot_ms),
            goodput=args.goodput,
            goodput_probes=args.goodput_probes,
            seed=args.seed,
            model=args.model,
            tokenizer=args.tokenizer,
            timeout_s=args.request_timeout,
            show_progress=not args.quiet,
            plots=not args.no_plots,
        )
        summary = run_async(run_benchmark(opts))
    except (BenchError, ValueError, OSError, aiohttp.ClientError) as e:
        return _error(str(e))
    print(format_summary(summary))
    _plot_run(opts.out_dir, opts.plots)
    print(f"results: {opts.out_dir}")
    return 0


def _plot_run(out_dir: Path, plots: bool) -> None:
    from tideserve.bench.plots import PlotsUnavailable, plot_run
    from tideserve.bench.report import load_run

    if not plots:
        return
    try:
        plot_run(out_dir, *load_run(out_dir))
    except PlotsUnavailable as e:
        print(f"note: {e}", file=sys.stderr)


def cmd_compare(args: argparse.Namespace) -> int:
    from tideserve.bench.plots import PlotsUnavailable, plot_compare
    from tideserve.bench.report import format_compare, load_run

    try:
        runs = [(str(d), *load_run(d)) for d in args.runs]
    except (ValueError, OSError) as e:
        return _error(str(e))
    print(format_compare([name for name, _, _ in runs], [s for _, s, _ in runs]))
    out = args.out or args.runs[0]
    try:
        paths = plot_compare(out, runs)
        print("plots: " + ", ".join(str(p) for p in paths))
    except PlotsUnavailable as e:
        print(f"note: {e}", file=sys.stderr)
    return 0
