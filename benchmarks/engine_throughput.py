"""Engine throughput: tideserve against HF transformers `generate`, same weights and dtype, one run.

    python benchmarks/engine_throughput.py                 # bf16 and fp32, everything
    python benchmarks/engine_throughput.py --dtypes bfloat16 --hf-batch-sizes 16

Parts, each measured for tideserve and HF back to back (A B A B where repeated):
  mixed      64 requests with prompt/output lengths from the Azure 2023 conversation trace
             (prompt / 4, output / 2, clamped to [8, 1024] and [4, 256]); tideserve takes them all
             at once (continuous batching), HF runs static left-padded batches of each size in
             --hf-batch-sizes and we keep its best. Useful output tokens / wall second.
  batch1     decode tokens/s for one sequence, prompt 128 -> 128 output tokens.
  batchN     tideserve decode tokens/s at batch 16 and 32 (prompt 128 -> 128), and prefill tok/s.
  anatomy    share of a decode step spent outside the model's forward pass.
  rss        peak RSS of a fresh process that loads the default model and generates.
Prompts are random token ids (seeded); EOS is ignored so every request makes its full length.
Results print as a table and land in benchmarks/results/engine_throughput-<time>.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from tideserve import LLM, SamplingParams
from tideserve.engine.default_model import prepare_default_model

HERE = Path(__file__).resolve().parent
TRACE = HERE.parents[1] / "shared" / "traces" / "azure2023" / "AzureLLMInferenceTrace_conv.csv"
SAMPLE = HERE / "data" / "azure_conv_2023_head2000.csv"


def trace_lengths(n: int, seed: int = 0) -> list[tuple[int, int]]:
    path = TRACE if TRACE.is_file() else SAMPLE
    with path.open() as f:
        rows = [(int(r["ContextTokens"]), int(r["GeneratedTokens"])) for r in csv.DictReader(f)]
    rng = random.Random(seed)
    picked = rng.sample(rows, n)
    return [(min(max(p // 4, 8), 1024), min(max(o // 2, 4), 256)) for p, o in picked]


def random_prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(100, 49000) for _ in range(n)]


# -- tideserve ---------------------------------------------------------------------------------


def ts_mixed(llm: LLM, work: list[tuple[list[int], int]]) -> float:
    params = [SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True) for _, o in work]
    t0 = time.perf_counter()
    outs = llm.generate([p for p, _ in work], params)
    dt = time.perf_counter() - t0
    assert [len(o.token_ids) for o in outs] == [o for _, o in work]
    return sum(o for _, o in work) / dt


def ts_decode(llm: LLM, batch: int, prompt_len: int = 128, out_len: int = 128) -> dict:
    """Prefill tok/s and decode tok/s for `batch` sequences, plus the step anatomy."""
    engine, rng = llm.engine, random.Random(batch)
    params = SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"b{batch}-{i}", random_prompt(rng, prompt_len), params)
    fwd_times: list[float] = []
    forward = engine.runner.forward_logits

    def timed_forward(step, layer_hook=None):
        t = time.perf_counter()
        out = forward(step, layer_hook)
        fwd_times.append(time.perf_counter() - t)
        return out

    engine.runner.forward_logits = timed_forward
    try:
        t0 = time.perf_counter()
        while any(s.is_prefill or not s.num_computed_tokens for s in engine.seqs.values()):
            engine.step()
        t1 = time.perf_counter()
        fwd_times.clear()
        step_times, tokens = [], 0
        while engine.has_unfinished():
            ts = time.perf_counter()
            tokens += len(engine.step())
            step_times.append(time.perf_counter() - ts)
        t2 = time.perf_counter()
    finally:
        engine.runner.forward_logits = forward
    outside = 1 - sum(fwd_times) / sum(step_times)
    return {
        "prefill_tok_s": batch * prompt_len / (t1 - t0),
        "decode_tok_s": tokens / (t2 - t1),
        "step_ms_median": 1e3 * statistics.median(step_times),
        "share_outside_forward": outside,
    }


# -- HF transformers ---------------------------------------------------------------------------


def hf_generate(model, prompts: list[list[int]], new_tokens: int, pad_id: int) -> None:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding, as HF wants for generation
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    with torch.inference_mode():
        model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
        )


def hf_mixed(model, work, batch_size: int, pad_id: int) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(work), batch_size):
        chunk = work[i : i + batch_size]
        hf_generate(model, [p for p, _ in chunk], max(o for _, o in chunk), pad_id)
    return sum(o for _, o in work) / (time.perf_counter() - t0)


def hf_decode_batch1(model, pad_id: int, prompt_len: int = 128, out_len: int = 128) -> float:
    prompt = random_prompt(random.Random(1), prompt_len)
    t0 = time.perf_counter()
    hf_generate(model, [prompt], 1, pad_id)
    t1 = time.perf_counter()
    hf_generate(model, [prompt], out_len, pad_id)
    t2 = time.perf_counter()
    return (out_len - 1) / ((t2 - t1) - (t1 - t0))


# -- peak RSS ----------------------------------------------------------------------------------

# NOTE: VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's RSS at fork time.
RSS_SCRIPT = """
import torch
torch.set_num_threads({threads})
from tideserve import LLM, SamplingParams
llm = LLM(dtype="{dtype}", kv_cache_bytes={kv_bytes})
llm.generate([[100 + i for i in range(128)]] * 16, SamplingParams(max_tokens=128, ignore_eos=True))
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(int(hwm.split()[1]) * 1024)
"""


def peak_rss(dtype: str, threads: int, kv_bytes: int) -> int:
    code = RSS_SCRIPT.format(dtype=dtype, threads=threads, kv_bytes=kv_bytes)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


# -- main --------------------------------------------------------------------------------------


def run_dtype(dtype: str, args, model_dir: Path) -> dict:
    from transformers import AutoModelForCausalLM

    torch_dtype = getattr(torch, dtype)
    print(f"\n== {dtype} ==", flush=True)
    llm = LLM(model=str(model_dir), dtype=dtype, max_num_batched_tokens=2048, max_num_seqs=64)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).eval()
    pad = 2
    rng = random.Random(0)
    work = [(random_prompt(rng, p), o) for p, o in trace_lengths(args.num_requests)]
    res: dict = {"dtype": dtype}

    ts_mixed(llm, work[:4])  # warm-up
    res["mixed_tideserve_tok_s"] = ts_mixed(llm, work)
    print(f"mixed: tideserve {res['mixed_tideserve_tok_s']:.1f} out tok/s", flush=True)
    res["mixed_hf_tok_s"] = {}
    for bs in args.hf_batch_sizes:
        res["mixed_hf_tok_s"][bs] = hf_mixed(hf, work, bs, pad)
        print(f"mixed: HF static batch {bs}: {res['mixed_hf_tok_s'][bs]:.1f} out tok/s", flush=True)
    best = max(res["mixed_hf_tok_s"].values())
    res["mixed_speedup_vs_hf_best"] = res["mixed_tideserve_tok_s"] / best

    ts1, hf1 = [], []
    for _ in range(args.rounds):  # A B A B
        ts1.append(ts_decode(llm, 1)["decode_tok_s"])
        hf1.append(hf_decode_batch1(hf, pad))
    res["batch1_tideserve_tok_s"] = statistics.median(ts1)
    res["batch1_hf_tok_s"] = statistics.median(hf1)
    print(
        f"batch 1 decode: tideserve {res['batch1_tideserve_tok_s']:.1f} tok/s, "
        f"HF {res['batch1_hf_tok_s']:.1f} tok/s",
        flush=True,
    )
    res["batch1_anatomy"] = ts_decode(llm, 1)
    for b in (16, 32):
        res[f"batch{b}"] = ts_decode(llm, b)
        r = res[f"batch{b}"]
        print(
            f"batch {b}: decode {r['decode_tok_s']:.1f} tok/s, prefill {r['prefill_tok_s']:.0f} "
            f"tok/s, {100 * r['share_outside_forward']:.1f}% of a step outside forward",
            flush=True,
        )
    del hf
    res["peak_rss_bytes"] = peak_rss(dtype, args.threads, 256 << 20)
    print(f"peak RSS (engine process, 256 MiB KV budget): {res['peak_rss_bytes'] / 2**20:.0f} MiB")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument(
        "--hf-batch-sizes", default="8,16,32,64", type=lambda s: [int(x) for x in s.split(",")]
    )
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2, help="A B rounds for the batch-1 figures")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = prepare_default_model()
    results = {
        "machine": {
            "threads": args.threads,
            "torch": torch.__version__,
            "cpu_count": torch.get_num_threads(),
        },
        "runs": [run_dtype(d, args, model_dir) for d in args.dtypes.split(",")],
    }
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    out = out_dir / f"engine_throughput-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(results, indent=2))
    print(
        "\n| dtype | mixed tideserve | mixed HF best (bs) | ratio | batch-1 tideserve | batch-1 HF "
        "| decode b16 | decode b32 | outside fwd b1/b32 | peak RSS |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results["runs"]:
        bs, best = max(r["mixed_hf_tok_s"].items(), key=lambda kv: kv[1])
        print(
            f"| {r['dtype']} | {r['mixed_tideserve_tok_s']:.0f} | {best:.0f} ({bs}) | "
            f"{r['mixed_speedup_vs_hf_best']:.2f}x | {r['batch1_tideserve_tok_s']:.1f} | "
            f"{r['batch1_hf_tok_s']:.1f} | {r['batch16']['decode_tok_s']:.0f} | "
            f"{r['batch32']['decode_tok_s']:.0f} | "
            f"{100 * r['batch1_anatomy']['share_outside_forward']:.0f}% / "
            f"{100 * r['batch32']['share_outside_forward']:.0f}% | "
            f"{r['peak_rss_bytes'] / 2**20:.0f} MiB |"
        )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
