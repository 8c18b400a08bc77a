"""Typed configuration. Each process gets one frozen dataclass, built from CLI flags, then
`TIDESERVE_*` environment variables, then an optional TOML file, then the defaults."""

from __future__ import annotations

from dataclasses import dataclass

GiB = 1 << 30


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # HF model folder; None = the embedded default (SmolLM2-135M-Instruct)
    dtype: str = "auto"  # auto (the checkpoint's), float32, bfloat16, float16
    device: str = "auto"  # auto (cuda if available), cpu, cuda, cuda:N
    load_format: str = "safetensors"  # safetensors, or dummy (random weights, benchmarks only)
    block_size: int = 16  # tokens per KV-cache block
    kv_cache_bytes: int | None = None  # KV budget; None = 1 GiB on CPU, a fraction of GPU memory
    gpu_memory_utilization: float = 0.9  # share of GPU memory for weights + KV cache
    cuda_graphs: bool = True  # CUDA: replay captured graphs for decode steps (False: eager)
    max_model_len: int | None = None  # context length; None = the model's
    max_num_seqs: int = 64  # sequences per step at most
    max_num_batched_tokens: int = 1024  # tokens per step at most (prefill chunks + decodes)
    enable_chunked_prefill: bool = True  # split long prompts across steps
    num_threads: int | None = None  # torch CPU threads for this process; None = torch's default
    layer_stages: int = 0  # >= 1: run the model as this many elastic layer stages (ModuleCommand)

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes <= 0:
            raise ValueError(f"kv_cache_bytes must be positive, got {self.kv_cache_bytes}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.layer_stages < 0:
            raise ValueError(f"layer_stages must be >= 0, got {self.layer_stages}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")
        if self.load_format not in ("safetensors", "auto", "dummy"):
            raise ValueError(f"load_format must be safetensors or dummy, got {self.load_format!r}")
