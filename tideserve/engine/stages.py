"""Layer-sharded execution: a stage owns a contiguous layer range [start, end) of the model,
only those layers' weights (read from the same checkpoint) and only their KV cache; the
embedding lives on the first stage, the final norm and lm_head on the last.

A pipeline runs one scheduler step through the stages in order, each from the hidden states
the one before it produced:

    plan = scheduler.schedule()
    h = stage0.forward(plan)        # token ids -> [T, hidden]
    h = stage1.forward(plan, h)     # [T, hidden] -> ... the last stage samples
    scheduler.update(plan, sampled)

Every stage reads the same block tables (one scheduler, one block pool), so a pipeline's pool
has as many blocks as its smallest stage; each stage's cache holds its own layers of them.
`PipelineRunner` has `ModelRunner`'s interface, so an `LLMEngine` drives a pipeline unchanged
(`build_pipeline_engine`). A stage in another process plugs in as a stage with the same
`forward` (tideserve/roles/stage.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch
from torch import nn

from tideserve.config import EngineConfig, GiB
from tideserve.engine.attention import AttentionBatch
from tideserve.engine.block_pool import BlockPool
from tideserve.engine.kv_cache import KVCache, cuda_kv_budget, num_blocks_for_budget
from tideserve.engine.linear import pack_linears
from tideserve.engine.loader import _dummy_state, _read_state, resolve_dtype
from tideserve.engine.model import DecoderLayer, LlamaModel, RMSNorm, Rotary
from tideserve.engine.model_config import ModelConfig
from tideserve.engine.runner import ModelRunner
from tideserve.engine.sampler import Sampler, SampleResult
from tideserve.engine.scheduler import ScheduledSeq, Scheduler, SchedulerConfig, SchedulerOutput


@dataclass(frozen=True)
class LayerRange:
    start: int  # first layer this stage owns
    end: int  # one past its last
    num_layers: int  # the whole model's

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end <= self.num_layers:
            raise ValueError(
                f"layer range [{self.start}, {self.end}) is not inside the model's "
                f"{self.num_layers} layers"
            )

    @property
    def is_first(self) -> bool:
        return self.start == 0

    @property
    def is_last(self) -> bool:
        return self.end == self.num_layers

    @property
    def size(self) -> int:
        return self.end - self.start

    @classmethod
    def split(cls, num_layers: int, num_stages: int) -> list[LayerRange]:
        """`num_stages` contiguous ranges, as even as the layer count allows."""
        if not 1 <= num_stages <= num_layers:
            raise ValueError(f"cannot split {num_layers} layers into {num_stages} stages")
        cuts = [num_layers * k // num_stages for k in range(num_stages + 1)]
        return [cls(a, b, num_layers) for a, b in zip(cuts, cuts[1:])]


class StageModel(nn.Module):
    """The layers [start, end) of a `LlamaModel`, with HF checkpoint names (`model.layers.N.`
    keeps the model-wide N), plus the embedding when first and norm + lm_head when last."""

    def __init__(self, cfg: ModelConfig, max_positions: int, layers: LayerRange) -> None:
        super().__init__()
        self.config, self.layer_range = cfg, layers
        self.model = nn.Module()
        if layers.is_first:
            self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.model.layers = nn.ModuleDict(
            {str(i): DecoderLayer(cfg) for i in range(layers.start, layers.end)}
        )
        if layers.is_last:
            self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = Rotary(cfg, max_positions)

    def tie_weights(self) -> None:
        r = self.layer_range
        if self.config.tie_word_embeddings and r.is_first and r.is_last:
            self.lm_head.weight = self.model.embed_tokens.weight

    def fuse(self) -> None:
        for layer in self.model.layers.values():
            layer.self_attn.fuse()
            layer.mlp.fuse()
        pack_linears(self)

    @torch.inference_mode()
    def forward(
        self,
        x: torch.Tensor,  # first stage: token ids [T]; else hidden states [T, hidden]
        positions: torch.Tensor,  # [T]
        kv_cache: torch.Tensor,  # [size, 2, kvh, S, hd]: this stage's layers only
        batch: AttentionBatch,
        logits_indices: torch.Tensor,  # [N] rows of the batch that sample
        layer_hook=None,  # called with the model-wide layer index after each layer
    ) -> torch.Tensor:  # last stage: [N, vocab] logits (model dtype); else [T, hidden]
        if self.layer_range.is_first:
            x = self.model.embed_tokens(x)  # [T, hidden]
        batch.cos, batch.sin = self.rotary.tables(positions, x.dtype)
        for j, layer in enumerate(self.model.layers.values()):
            x = layer(x, kv_cache[j], batch)
            if layer_hook is not None:
                layer_hook(self.layer_range.start + j)
        if not self.layer_range.is_last:
            return x
        x = self.model.norm(x[logits_indices])  # [N, hidden]
        return self.lm_head(x)  # the sampler widens only the rows that need it


def load_stage(
    path,
    cfg: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    max_positions: int,
    layers: LayerRange,
    load_format: str = "safetensors",
) -> StageModel:
    """A `StageModel` with only its own weights read from the checkpoint at `path`."""
    with torch.device("meta"):
        model = StageModel(cfg, max_positions, layers)
    expected = {n for n, _ in model.named_parameters()}
    # NOTE: tied embeddings: a last stage that is not first reads lm_head from the embedding
    lm_from_embed = cfg.tie_word_embeddings and layers.is_last
    if lm_from_embed:
        expected.discard("lm_head.weight")
    wanted = expected | ({"model.embed_tokens.weight"} if lm_from_embed else set())
    if load_format == "dummy":
        with torch.device("meta"):
            full = LlamaModel(cfg, max_positions)
        state = {k: v for k, v in _dummy_state(full, dtype, device).items() if k in wanted}
    elif load_format in ("safetensors", "auto"):
        state = _read_state(path, dtype, device, names=wanted)
    else:
        raise ValueError(f"unknown load format {load_format!r}; choose safetensors or dummy")
    if lm_from_embed and not layers.is_first:
        state["lm_head.weight"] = state.pop("model.embed_tokens.weight")
        expected.add("lm_head.weight")
    missing = sorted(expected - state.keys())
    if missing:
        raise ValueError(
            f"checkpoint at {str(path)!r} lacks {len(missing)} weights of layers "
            f"[{layers.start}, {layers.end}), e.g. {missing[:3]}"
        )
    model.load_state_dict(state, strict=False, assign=True)
    model.rotary = Rotary(cfg, max_positions).to(device)
    model.tie_weights()
    model.fuse()
    return model.eval()


class Stage:
    """One layer range in this process: its model, its KV cache, and a `ModelRunner` that turns
    a scheduler step into the range's inputs (the same metadata code as the unsplit engine)."""

    def __init__(self, model: StageModel, kv: KVCache, device: torch.device) -> None:
        self.layers = model.layer_range
        self.model = model
        self.kv = kv
        self.runner = ModelRunner(model, kv, device)  # type: ignore[arg-type]

    @property
    def sampler(self) -> Sampler:
        return self.runner.sampler

    def forward(
        self, plan: SchedulerOutput, hidden: torch.Tensor | None = None, layer_hook=None
    ) -> torch.Tensor:
        """The range's output for one step: [T, hidden] hidden states, or on the last stage
        [N, vocab] logits of the rows that sample. `hidden`: the previous stage's output."""
        with_ids = self.layers.is_first and hidden is None  # a remote first stage: ids sent in
        ids, positions, batch, logits_idx = self.runner.prepare(plan, with_ids)
        x = ids if with_ids else hidden
        return self.model(x, positions, self.kv.tensor, batch, logits_idx, layer_hook)

    def sample(self, plan: SchedulerOutput, logits: torch.Tensor):
        """(rows that sample, their tokens): the last stage's end of a step."""
        rows = sampling_rows(plan)
        if not rows:
            return [], SampleResult([], [])
        params = [it.seq.params for it in rows]
        return rows, self.sampler(logits, params, [it.seq.request_id for it in rows])


def sampling_rows(plan: SchedulerOutput) -> list[ScheduledSeq]:
    """The scheduled items that sample, in batch order (after `prepare` sorted the decodes)."""
    return [it for it in plan.decodes + plan.prefills if it.sample]


def stage_kv_blocks(config: EngineConfig, cfg: ModelConfig, layers: LayerRange, dtype, device):
    """How many KV blocks the stage's budget holds for its own layers (fewer layers: more)."""
    budget = config.kv_cache_bytes
    if budget is None:
        budget = (
            cuda_kv_budget(config.gpu_memory_utilization, device) if device.type == "cuda" else GiB
        )
    return num_blocks_for_budget(stage_config(cfg, layers), config.block_size, dtype, budget)


def stage_config(cfg: ModelConfig, layers: LayerRange) -> ModelConfig:
    """The model config as the stage's KV cache sees it: only its layers."""
    return dataclasses.replace(cfg, num_layers=layers.size)


def build_stage(
    config: EngineConfig,
    cfg: ModelConfig,
    path,
    layers: LayerRange,
    num_blocks: int,
    device: torch.device,
    max_positions: int,
) -> Stage:
    dtype = resolve_dtype(config.dtype, cfg, device)
    model = load_stage(path, cfg, dtype, device, max_positions, layers, config.load_format)
    kv = KVCache(stage_config(cfg, layers), num_blocks, config.block_size, dtype, device)
    return Stage(model, kv, device)


class PipelineRunner:
    """`ModelRunner`'s interface over stages run one after the other in this process."""

    def __init__(self, stages: Seq[Stage]) -> None:
        if not stages or not stages[-1].layers.is_last or not stages[0].layers.is_first:
            raise ValueError("a pipeline needs stages from the first layer to the last")
        for a, b in zip(stages, stages[1:]):
            if a.layers.end != b.layers.start:
                raise ValueError(f"stages {a.layers} and {b.layers} are not contiguous")
        self.stages = list(stages)
        self.kv = stages[0].kv  # NOTE: KV export (disaggregation, migration) needs all layers
        self.sampler = stages[-1].sampler

    def run(
        self, step: SchedulerOutput, layer_hook=None
    ) -> tuple[list[ScheduledSeq], SampleResult]:
        h = None
        for stage in self.stages:
            h = stage.forward(step, h, layer_hook)
        return self.stages[-1].sample(step, h)


def build_pipeline_engine(config: EngineConfig, num_stages: int = 2):
    """An `LLMEngine` whose model runs as `num_stages` layer ranges in this process, each with
    only its own weights and KV cache: what a split across workers computes, minus the wire.
    The block pool has as many blocks as the smallest stage's budget holds."""
    from tideserve.engine.engine import LLMEngine, _extra_eos, resolve_device, resolve_model_path

    path = resolve_model_path(config.model)
    cfg = ModelConfig.from_dir(path)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, cfg, device)
    max_len = config.max_model_len or cfg.max_context
    ranges = LayerRange.split(cfg.num_layers, num_stages)
    num_blocks = min(stage_kv_blocks(config, cfg, r, dtype, device) for r in ranges)
    stages = [build_stage(config, cfg, path, r, num_blocks, device, max_len) for r in ranges]
    sched_cfg = SchedulerConfig(
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
        max_model_len=min(max_len, num_blocks * config.block_size),
        enable_chunked_prefill=config.enable_chunked_prefill,
    )
    scheduler = Scheduler(sched_cfg, BlockPool(num_blocks, config.block_size))
    eos = frozenset(cfg.eos_token_ids) | _extra_eos(path)
    return LLMEngine(config, cfg, path, scheduler, PipelineRunner(stages), eos)
