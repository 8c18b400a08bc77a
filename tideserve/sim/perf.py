"""The performance model of one worker type: how long a step, a KV transfer and a start-up take.

Lifecycle: a `PerfModel` comes from a profile file (`load_profile`: JSON written by
`tideserve profile`, which measures the real engine and fits `fit_step`), or from a named
hardware profile and a model's config.json (`roofline`, derived in docs/sim.md). The simulator
asks it one thing per engine step: `step_s(prefill_tokens, num_decodes, context_tokens)`.

The step time is linear in what the scheduler put into the step:

    step_s = base_s + prefill_token_s * P + decode_seq_s * D + context_token_s * C
             + prefill_pair_s * A

P: prompt tokens computed this step (chunks); D: decode sequences; C: KV tokens the step's
attention reads (the sum over scheduled sequences of their context after the step); A: the
(query, key) pairs of the prefill chunks' causal attention, n * start + n * (n + 1) / 2 for a
chunk of n tokens after `start` (the quadratic cost of a long prompt).
Torch-free; numpy only for the least-squares fit.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent / "models"
GB = 1e9


@dataclass(frozen=True)
class StepFit:
    """step_s = base_s + prefill_token_s * P + decode_seq_s * D + context_token_s * C
    + prefill_pair_s * A."""

    base_s: float  # fixed cost of a step (weights read once, launch overheads)
    prefill_token_s: float  # per prompt token computed
    decode_seq_s: float  # per decode sequence in the batch
    context_token_s: float  # per KV token read by attention
    prefill_pair_s: float = 0.0  # per (query, key) pair of a prefill chunk's attention

    def __post_init__(self) -> None:
        for f in fields(self):
            if not getattr(self, f.name) >= 0:
                raise ValueError(f"step fit {f.name} must be >= 0, got {getattr(self, f.name)}")


@dataclass(frozen=True)
class PerfModel:
    """One worker type, as the simulator sees it."""

    name: str  # e.g. "H100-80G/llama-3-8b/tp1" or "cpu-profile"
    step: StepFit
    block_size: int  # tokens per KV block
    num_kv_blocks: int  # KV blocks one worker holds
    max_model_len: int  # prompt + output tokens of one sequence at most
    kv_bytes_per_token: int  # KV of one token, all layers (what a FuDG transfer moves)
    startup_s: float  # process start to ready (weights load, warm-up)
    source: str = "roofline"  # "roofline" or "measured"
    fit: dict | None = None  # measured: how well the step model fits the steps (`fit_quality`)

    def step_s(
        self, prefill_tokens: int, num_decodes: int, context_tokens: int, attention_pairs: int = 0
    ) -> float:
        s = self.step
        return (
            s.base_s
            + s.prefill_token_s * prefill_tokens
            + s.decode_seq_s * num_decodes
            + s.context_token_s * context_tokens
            + s.prefill_pair_s * attention_pairs
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PerfModel:
        try:
            return cls(**{**d, "step": StepFit(**d["step"])})
        except (KeyError, TypeError) as e:
            raise ValueError(f"not a performance profile ({e})") from None


def kv_transfer_s(num_bytes: int, link_gbps: float, latency_s: float = 0.0) -> float:
    """Seconds to move `num_bytes` over a link of `link_gbps` gigabits per second."""
    return latency_s + num_bytes * 8 / (link_gbps * GB)


def save_profile(model: PerfModel, path: Path) -> None:
    path.write_text(json.dumps(model.to_dict(), indent=2) + "\n")


def load_profile(path: str | Path) -> PerfModel:
    path = Path(path)
    try:
        return PerfModel.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the performance profile: {e}") from None


# -- fitting measured steps -------------------------------------------------------------------


@dataclass(frozen=True)
class StepSample:
    """One measured engine step."""

    prefill_tokens: int
    num_decodes: int
    context_tokens: int
    seconds: float
    attention_pairs: int = 0  # of the prefill chunks (see the module docstring)


def attention_pairs(start: int, num_tokens: int) -> int:
    """(query, key) pairs of a causal prefill chunk of `num_tokens` after `start` tokens."""
    return num_tokens * start + num_tokens * (num_tokens + 1) // 2


def fit_step(samples: list[StepSample]) -> StepFit:
    """Non-negative least squares of the step model over measured steps, on relative errors
    (each step weighs 1 / its time, so a 30 ms decode step counts as much as a 3 s prefill);
    a coefficient the plain fit makes negative is dropped and the rest refitted."""
    import numpy as np

    if len(samples) < 4:
        raise ValueError(f"need at least 4 measured steps to fit, got {len(samples)}")
    if min(s.seconds for s in samples) <= 0:
        raise ValueError("measured step times must be > 0")
    x = np.array(
        [
            [1.0, s.prefill_tokens, s.num_decodes, s.context_tokens, s.attention_pairs]
            for s in samples
        ],
        dtype=float,
    )
    y = np.array([s.seconds for s in samples], dtype=float)
    x, y = x / y[:, None], np.ones_like(y)  # relative errors
    keep = [k for k in range(5) if x[:, k].any()]
    sol = np.zeros(0)
    while keep:
        sol, *_ = np.linalg.lstsq(x[:, keep], y, rcond=None)
        negative = {k for k, c in zip(keep, sol) if c < 0}
        if not negative:
            break
        keep = [k for k in keep if k not in negative]
    coef = np.zeros(5)
    coef[keep] = sol if keep else 0.0
    return StepFit(*(float(c) for c in coef))


def fit_quality(fit: StepFit, samples: list[StepSample]) -> dict:
    """R² of the fit over the measured steps, and its relative errors, all steps and by kind
    (prefill-only steps, decode-only steps)."""
    model = PerfModel("fit", fit, 1, 1, 1, 1, 0.0)

    def errors(rows: list[StepSample]) -> dict:
        rel = sorted(abs(model.step_s(*_shape(s)) - s.seconds) / s.seconds for s in rows)
        if not rel:
            return {"num_steps": 0}
        return {
            "num_steps": len(rel),
            "mean_rel_error": sum(rel) / len(rel),
            "max_rel_error": rel[-1],
        }

    ys = [s.seconds for s in samples]
    mean = sum(ys) / len(ys)
    ss_tot = sum((y - mean) ** 2 for y in ys)
    ss_res = sum((model.step_s(*_shape(s)) - s.seconds) ** 2 for s in samples)
    return {
        "r2": 1 - ss_res / ss_tot if ss_tot > 0 else 1.0,
        "all": errors(samples),
        "prefill": errors([s for s in samples if s.prefill_tokens and not s.num_decodes]),
        "decode": errors([s for s in samples if s.num_decodes and not s.prefill_tokens]),
    }


def _shape(s: StepSample) -> tuple[int, int, int, int]:
    return s.prefill_tokens, s.num_decodes, s.context_tokens, s.attention_pairs


# -- roofline -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hardware:
    """A GPU's datasheet numbers (dense bf16)."""

    name: str
    memory_bytes: float
    memory_bw: float  # bytes/s (HBM or GDDR)
    flops: float  # dense bf16 tensor FLOP/s
    interconnect_bw: float  # bytes/s between GPUs of one worker (tensor parallel all-reduce)


HARDWARE: dict[str, Hardware] = {
    "A100-80G": Hardware("A100-80G", 80e9, 2.039e12, 312e12, 300e9),  # NVLink3 600 GB/s bidir
    "H100-80G": Hardware("H100-80G", 80e9, 3.35e12, 989e12, 450e9),  # NVLink4 900 GB/s bidir
    "L20": Hardware("L20", 48e9, 864e9, 119.5e12, 32e9),  # no NVLink: PCIe 4.0 x16
}

# Efficiencies and overheads of the roofline (docs/sim.md says where they come from).
FLOP_EFFICIENCY = 0.6  # achieved / peak tensor FLOP/s on large GEMMs (prefill)
MEMORY_EFFICIENCY = 0.8  # achieved / peak memory bandwidth on streaming reads (decode)
STEP_OVERHEAD_S = 0.002  # scheduling, launches, sampling per step
GPU_MEMORY_UTILIZATION = 0.9  # weights + KV cache share of GPU memory
LOAD_BW = 2e9  # bytes/s weights load at start-up (local NVMe, safetensors)
STARTUP_FIXED_S = 20.0  # process, CUDA context, warm-up


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a Llama-family config.json that cost time and memory."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool = False

    @classmethod
    def from_config(cls, cfg: dict) -> ModelShape:
        return cls(
            cfg["hidden_size"],
            cfg["intermediate_size"],
            cfg["num_hidden_layers"],
            cfg["num_attention_heads"],
            cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
            cfg["vocab_size"],
            cfg.get("max_position_embeddings", 4096),
            cfg.get("tie_word_embeddings", False),
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_params(self) -> int:
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        attn = h * (h + 2 * kv) + h * h  # q, k, v, o
        mlp = 3 * h * self.intermediate_size  # gate, up, down
        layer = attn + mlp + 2 * h  # + two RMSNorms
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + embed + h

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes


def load_model_shape(name_or_dir: str) -> ModelShape:
    """A shipped model (llama-3-8b, llama-3-70b, qwen2-7b) or a folder with a config.json."""
    path = Path(name_or_dir)
    if not path.is_dir():
        path = MODELS_DIR / name_or_dir
    cfg = path / "config.json"
    if not cfg.is_file():
        shipped = ", ".join(sorted(p.name for p in MODELS_DIR.iterdir() if p.is_dir()))
        raise ValueError(f"no model {name_or_dir!r}: give a folder with config.json or {shipped}")
    return ModelShape.from_config(json.loads(cfg.read_text()))


def roofline(
    hardware: str,
    model: str,
    tp: int = 1,
    block_size: int = 16,
    max_model_len: int | None = None,
    dtype_bytes: int = 2,
) -> PerfModel:
    """A `PerfModel` for `model` on `tp` GPUs of `hardware` (derivation: docs/sim.md)."""
    if hardware not in HARDWARE:
        raise ValueError(f"unknown hardware {hardware!r}; choose one of {', '.join(HARDWARE)}")
    if tp < 1:
        raise ValueError(f"tp must be >= 1, got {tp}")
    hw, m = HARDWARE[hardware], load_model_shape(model)
    weights = m.num_params * dtype_bytes
    bw = hw.memory_bw * MEMORY_EFFICIENCY * tp
    flops = hw.flops * FLOP_EFFICIENCY * tp
    token_flops = 2 * m.num_params  # one multiply-add per weight per token
    # tensor parallel: two all-reduces of the hidden state per layer (ring: 2(tp-1)/tp of it)
    allreduce = 0.0
    if tp > 1:
        per_token = 2 * m.num_layers * m.hidden_size * dtype_bytes * 2 * (tp - 1) / tp
        allreduce = per_token / hw.interconnect_bw
    kv_token = m.kv_bytes_per_token(dtype_bytes)
    # attention: QK^T and PV, 4 * hidden FLOPs per layer per (query, key) pair; a decode reads
    # each context token's KV once (memory), a prefill chunk's reads are compute-bound
    step = StepFit(
        base_s=STEP_OVERHEAD_S + weights / bw,
        prefill_token_s=token_flops / flops + allreduce,
        decode_seq_s=token_flops / flops + allreduce,
        context_token_s=kv_token / bw,
        prefill_pair_s=4 * m.hidden_size * m.num_layers / flops,
    )
    kv_budget = hw.memory_bytes * tp * GPU_MEMORY_UTILIZATION - weights
    if kv_budget <= 0:
        raise ValueError(
            f"{model} ({weights / GB:.0f} GB of weights) does not fit on {tp} x {hardware}; "
            "raise tp"
        )
    num_blocks = int(kv_budget // (kv_token * block_size))
    max_len = min(max_model_len or m.max_position_embeddings, num_blocks * block_size)
    return PerfModel(
        name=f"{hardware}/{Path(model).name}/tp{tp}",
        step=step,
        block_size=block_size,
        num_kv_blocks=num_blocks,
        max_model_len=max_len,
        kv_bytes_per_token=kv_token,
        startup_s=STARTUP_FIXED_S + weights / (LOAD_BW * tp),
        source="roofline",
    )
