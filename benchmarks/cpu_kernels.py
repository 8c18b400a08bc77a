"""What each CPU kernel buys the engine: the serving benchmark's shape, kernels toggled in turn.

    python benchmarks/cpu_kernels.py                      # bf16, 32 x (128 -> 128), 3 rounds
    python benchmarks/cpu_kernels.py --dtype float32 --rounds 2 --output-len 64

One engine (default model, --threads torch threads), the same work per variant: 32 requests of
distinct random 128-token prompts, all added at once, greedy, ignore_eos. Variants, in
tideserve/engine/cpu_kernels.py's order:
  all        the default: attention kernel for every row, fused row-wise ops, row argmax
  no-ops     the fused norm / residual / rotary + KV write / SiLU ops off (torch ops instead)
  no-argmax  the sampler's row argmax off (float32 copy + torch argmax)
  torch      no compiled kernel at all: torch attention (SDPA for prefill), torch ops
Variants alternate within each round (A B C D A B C D ...), so the machine's drift hits them
alike. Reported per variant: the prefill steps' time (until every prompt is in), the median
decode step, the whole run's output tok/s (medians over rounds), and tok/s as a ratio to `all`.
Results also land in benchmarks/results/cpu_kernels-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from tideserve import LLM, SamplingParams
from tideserve.engine.default_model import prepare_default_model

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("all", "no-ops", "no-argmax", "torch")


def configure(engine, variant: str, kernel) -> None:
    runner = engine.runner
    runner.kernel = None if variant == "torch" else kernel
    runner.ops = None if variant in ("torch", "no-ops") else kernel
    use_argmax = variant not in ("torch", "no-argmax")
    runner.sampler.argmax_rows = kernel.argmax_rows if use_argmax else None


def run_once(engine, tag: str, num: int, prompt_len: int, output_len: int) -> dict:
    rng = random.Random(7)
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    for i in range(num):
        prompt = [rng.randrange(100, 49000) for _ in range(prompt_len)]
        engine.add_request(f"{tag}-{i}", prompt, params)
    steps, prefill_s = [], 0.0
    t0 = time.perf_counter()
    while engine.has_unfinished():
        waiting = bool(engine.scheduler.waiting) or any(
            s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running
        )
        t = time.perf_counter()
        engine.step()
        dt = time.perf_counter() - t
        if waiting:
            prefill_s += dt
        else:
            steps.append(dt)
    wall = time.perf_counter() - t0
    return {
        "prefill_s": prefill_s,
        "decode_step_ms": statistics.median(steps) * 1e3,
        "output_tok_s": num * output_len / wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engine = LLM(str(prepare_default_model()), dtype=args.dtype).engine
    kernel = engine.runner.kernel
    if kernel is None:
        raise SystemExit("the CPU kernels could not be built here: nothing to compare")
    for v in VARIANTS:  # warm-up: first-call costs (oneDNN, allocator) out of the rounds
        configure(engine, v, kernel)
        run_once(engine, f"warm-{v}", 4, args.prompt_len, 4)
    rows: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        for v in VARIANTS:
            configure(engine, v, kernel)
            res = run_once(engine, f"{v}-{r}", args.requests, args.prompt_len, args.output_len)
            rows[v].append(res)
            print(f"round {r} {v:9s} " + json.dumps({k: round(x, 3) for k, x in res.items()}))
    configure(engine, "all", kernel)
    med = {v: {k: statistics.median(x[k] for x in rows[v]) for k in rows[v][0]} for v in VARIANTS}
    print(f"\n{args.requests} x ({args.prompt_len} -> {args.output_len}), {args.dtype}, "
          f"{args.threads} threads, medians of {args.rounds} rounds\n")  # fmt: skip
    print("| variant | prefill s | decode step ms | output tok/s | vs all |")
    print("|---|---:|---:|---:|---:|")
    for v in VARIANTS:
        m = med[v]
        ratio = m["output_tok_s"] / med["all"]["output_tok_s"]
        print(
            f"| {v} | {m['prefill_s']:.2f} | {m['decode_step_ms']:.1f} | "
            f"{m['output_tok_s']:.1f} | {ratio:.2f} |"
        )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"cpu_kernels-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"args": vars(args), "rounds": rows, "medians": med}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
