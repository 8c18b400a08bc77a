"""GPU engine benchmark: tideserve against HF transformers `generate` on one CUDA device.

    python benchmarks/gpu_engine.py                          # default model + Llama-3-8B shape
    python benchmarks/gpu_engine.py --models default --batches 1 16
    python benchmarks/gpu_engine.py --no-cuda-graphs         # the eager engine, for comparison

Parts, per model (the embedded default, and a Llama-3-8B-shaped model with random weights:
`--load-format dummy` over a written config.json, bf16):
  throughput  output tokens / wall second at batch 1, 16 and 64 (prompt --prompt-len random
              ids -> --output-len tokens, EOS ignored): tideserve takes the batch at once;
              HF `generate` (same dtype, same weights for the default model, its own random
              init for the 8B shape) runs it as one left-padded batch, in the same run.
              HF is skipped, with a note, when transformers is not installed.
  roofline    8B shape only: the median decode step at batch 1 against weight bytes / HBM
              bandwidth, the least a step can take when it reads every weight once. The
              bandwidth is measured here: a device-to-device copy of --copy-gib GiB counts
              2 x bytes (read + write) per copy.
Exits with a message, doing nothing, without CUDA. Results print as a table and, with --json,
land in that file.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_act": "silu",
}


def write_8b_config(root: Path) -> Path:
    path = root / "llama3-8b-shape"
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(LLAMA3_8B))
    return path


def prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, min(vocab, 30000), (batch, length), generator=g).tolist()


# -- tideserve ---------------------------------------------------------------------------------


def make_engine(model: str | None, dummy: bool, args):
    from tideserve.config import EngineConfig
    from tideserve.engine.engine import LLMEngine

    cfg = EngineConfig(
        model=model,
        dtype="bfloat16",
        device="cuda",
        load_format="dummy" if dummy else "safetensors",
        max_num_seqs=max(args.batches),
        max_num_batched_tokens=max(2048, args.prompt_len),
        max_model_len=args.prompt_len + args.output_len + 16,
        gpu_memory_utilization=args.gpu_memory_fraction,
        cuda_graphs=args.cuda_graphs,
    )
    return LLMEngine.from_config(cfg)


def engine_throughput(engine, batch: int, args) -> tuple[float, list[float]]:
    """(output tokens/s over the whole batch, every decode-only step's seconds)."""
    from tideserve.engine.sequence import SamplingParams

    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts(batch, args.prompt_len, engine.model_config.vocab_size)):
        engine.add_request(f"b{batch}-{i}", p, params)
    steps, tokens = [], 0
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    while engine.has_unfinished():
        s0 = time.perf_counter()
        outs = engine.step()
        torch.cuda.synchronize()
        n = sum(len(o.new_token_ids) for o in outs)
        if engine.last_step[0] == 0:  # no prompt tokens in this step: a pure decode step
            steps.append(time.perf_counter() - s0)
        tokens += n
    return tokens / (time.perf_counter() - t0), steps


def weight_bytes(engine) -> int:
    model = engine.runner.model
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:  # tied embeddings count once
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


# -- HF ----------------------------------------------------------------------------------------


def hf_model(model: str | None, dummy: bool):
    try:
        import transformers
    except ImportError:
        return None
    if dummy:
        cfg = transformers.LlamaConfig(**LLAMA3_8B)
        with torch.device("cuda"):
            m = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    else:
        m = transformers.AutoModelForCausalLM.from_pretrained(model, torch_dtype=torch.bfloat16)
        m = m.to("cuda")
    return m.eval()


@torch.inference_mode()
def hf_throughput(m, batch: int, args) -> float:
    ids = torch.tensor(prompts(batch, args.prompt_len, m.config.vocab_size), device="cuda")
    kw = dict(
        max_new_tokens=args.output_len,
        min_new_tokens=args.output_len,
        do_sample=False,
        pad_token_id=0,
        attention_mask=torch.ones_like(ids),
    )
    m.generate(ids[:, :8], **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = m.generate(ids, **kw)
    torch.cuda.synchronize()
    return (out.shape[1] - ids.shape[1]) * batch / (time.perf_counter() - t0)


# -- roofline ----------------------------------------------------------------------------------


def hbm_bandwidth(gib: float) -> float:
    """Bytes/s of a device-to-device copy (read + write both count), best of 10."""
    n = int(gib * (1 << 30))
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n / best


# -- main --------------------------------------------------------------------------------------


def run_model(name: str, args, tmp: Path) -> list[dict]:
    dummy = name == "llama3-8b-shape"
    path = str(write_8b_config(tmp)) if dummy else None
    rows = []
    engine = make_engine(path, dummy, args)
    for b in args.batches:
        tok_s, steps = engine_throughput(engine, b, args)
        rows.append(dict(model=name, system="tideserve", batch=b, tok_s=tok_s,
                         step_ms=1e3 * statistics.median(steps) if steps else None))  # fmt: skip
    if dummy:
        _, steps = engine_throughput(engine, 1, args)
        bw = hbm_bandwidth(args.copy_gib)
        wb = weight_bytes(engine)
        step_s = statistics.median(steps)
        rows.append(dict(model=name, system="roofline", batch=1, weight_gb=wb / 1e9,
                         hbm_gbps=bw / 1e9, bound_ms=1e3 * wb / bw, step_ms=1e3 * step_s,
                         of_bound=(wb / bw) / step_s))  # fmt: skip
    path_for_hf = str(engine.model_path) if not dummy else None
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    m = hf_model(path_for_hf, dummy) if not args.no_hf else None
    if m is None:
        rows.append(dict(model=name, system="hf", note="skipped: transformers not installed"
                         if not args.no_hf else "skipped: --no-hf"))  # fmt: skip
        return rows
    for b in args.batches:
        rows.append(dict(model=name, system="hf", batch=b, tok_s=hf_throughput(m, b, args)))
    del m
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def print_rows(rows: list[dict]) -> None:
    for r in rows:
        if r["system"] == "roofline":
            print(f"{r['model']:<16} decode step at batch 1: {r['step_ms']:.2f} ms; weights "
                  f"{r['weight_gb']:.2f} GB / HBM {r['hbm_gbps']:.0f} GB/s = {r['bound_ms']:.2f} "
                  f"ms bound ({100 * r['of_bound']:.0f}% of it)")  # fmt: skip
        elif "note" in r:
            print(f"{r['model']:<16} {r['system']:<10} {r['note']}")
        else:
            step = f"  decode step {r['step_ms']:.2f} ms" if r.get("step_ms") else ""
            print(f"{r['model']:<16} {r['system']:<10} batch {r['batch']:>3}: "
                  f"{r['tok_s']:>9.1f} output tok/s{step}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["default", "llama3-8b-shape"],
                    choices=["default", "llama3-8b-shape"])  # fmt: skip
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument(
        "--gpu-memory-fraction",
        type=float,
        default=0.45,
        help="the engine's share (HF loads its copy after the engine is freed)",
    )
    ap.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--no-hf", action="store_true", help="skip the HF comparison")
    ap.add_argument("--copy-gib", type=float, default=1.0)
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit(
            "gpu_engine.py needs a CUDA device (torch.cuda.is_available() is False with torch "
            f"{torch.__version__}); nothing was measured. Run it on a GPU machine with a CUDA "
            "build of torch."
        )
    print(
        f"torch {torch.__version__}, {torch.cuda.get_device_name()}, prompt {args.prompt_len}"
        f" -> {args.output_len} tokens, CUDA graphs {args.cuda_graphs}"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            rows += run_model(name, args, Path(tmp))
    print_rows(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
