"""The CPU paged-attention decode kernel: its AVX-512 path against the generic loop, one run.

    python benchmarks/attention_kernel.py [--threads 1] [--batch 32] [--contexts 128,256,512]

Builds tideserve/engine/cpu_kernels.py's source twice: as the engine does (`-march=native`,
which takes the AVX-512 path for head_dim 64/128 where the CPU has it) and with
`-mno-avx512f` (the generic loop, auto-vectorized for AVX2). Both attend the same random
SmolLM2-shaped batch (9 query heads, 3 KV heads, head_dim 64, blocks of 16 scattered over the
cache), alternating A B A B; the best of --rounds is kept. Prints microseconds per sequence
per layer, the KV bytes each read as GB/s, and the speedup; writes
benchmarks/results/attention_kernel.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from torch.utils.cpp_extension import load_inline

from tideserve.engine import cpu_kernels

RESULTS = Path(__file__).resolve().parent / "results"


def build(name: str, extra: list[str]):
    return load_inline(
        name=name,
        cpp_sources=[cpu_kernels._SOURCE],
        functions=["paged_decode_attention"],
        extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffast-math", *extra],
        extra_ldflags=["-lmvec", "-fopenmp"],
        verbose=False,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--contexts", default="128,256,512")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print("building both variants (once per machine) ...", flush=True)
    kernels = {
        "avx512": build("tideserve_bench_attn_native", []),
        "generic": build("tideserve_bench_attn_generic", ["-mno-avx512f"]),
    }
    heads, kvh, hd, bs, num_blocks = 9, 3, 64, 16, 4096
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        gen = torch.Generator().manual_seed(0)
        cache = torch.randn(2, kvh, num_blocks * bs, hd, generator=gen).to(dtype)
        for ctx in (int(c) for c in args.contexts.split(",")):
            nb = -(-ctx // bs)
            tables = torch.randperm(num_blocks, generator=gen)[: args.batch * nb]
            tables = tables.view(args.batch, nb).contiguous()
            lens = torch.full((args.batch,), ctx, dtype=torch.int64)
            q = torch.randn(args.batch, heads, hd, generator=gen).to(dtype)
            best = {k: float("inf") for k in kernels}
            for _ in range(args.rounds):
                for name, mod in kernels.items():
                    mod.paged_decode_attention(q, cache, tables, lens, bs, hd**-0.5)
                    t0 = time.perf_counter()
                    for _ in range(args.iters):
                        mod.paged_decode_attention(q, cache, tables, lens, bs, hd**-0.5)
                    dt = (time.perf_counter() - t0) / args.iters / args.batch
                    best[name] = min(best[name], dt)
            kv_bytes = kvh * ctx * hd * 2 * cache.element_size()
            row = {
                "dtype": str(dtype).removeprefix("torch."),
                "context": ctx,
                **{f"{k}_us_per_seq": v * 1e6 for k, v in best.items()},
                **{f"{k}_kv_gb_s": kv_bytes / v / 1e9 for k, v in best.items()},
                "speedup": best["generic"] / best["avx512"],
            }
            rows.append(row)
            print(
                f"{row['dtype']:>8} ctx {ctx:4d}: avx512 {row['avx512_us_per_seq']:6.2f} us "
                f"({row['avx512_kv_gb_s']:.1f} GB/s)  generic {row['generic_us_per_seq']:6.2f} us "
                f"({row['generic_kv_gb_s']:.1f} GB/s)  x{row['speedup']:.2f}",
                flush=True,
            )
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads},
        "batch": args.batch,
        "rows": rows,
    }
    (RESULTS / "attention_kernel.json").write_text(json.dumps(out, indent=2))
    print(f"wrote {RESULTS / 'attention_kernel.json'}")


if __name__ == "__main__":
    main()
