"""The step API every worker drives: add requests, step, abort, collect outputs; plus hooks to
export and import one sequence's KV layer by layer (disaggregation and migration build on them).

    engine = LLMEngine.from_config(EngineConfig())
    engine.add_request("r1", prompt_ids, SamplingParams(max_tokens=8))
    while engine.has_unfinished():
        for out in engine.step(): ...   # one RequestOutput per sequence that got a token

KV export: add the request with `hold_kv=True` (e.g. max_tokens=1 on a prefill worker); when it
finishes its blocks stay put; `export_kv_layer` copies a layer out; `release` frees the blocks.
KV import: `begin_import` reserves blocks, `import_kv_layer` fills each layer, `finish_import`
joins the running batch; `abort` at any point frees the blocks.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tideserve.config import EngineConfig, GiB
from tideserve.engine.block_pool import BlockPool
from tideserve.engine.kv_cache import KVCache, cuda_kv_budget, num_blocks_for_budget
from tideserve.engine.loader import load_model, resolve_dtype
from tideserve.engine.model_config import ModelConfig
from tideserve.engine.runner import ModelRunner
from tideserve.engine.scheduler import Scheduler, SchedulerConfig
from tideserve.engine.sequence import SamplingParams, Sequence, SequenceStatus

log = logging.getLogger(__name__)
KVLayerHook = Callable[[str, int, "torch.Tensor"], None]


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]  # sampled this step
    token_ids: list[int]  # every output token so far
    finished: bool
    finish_reason: str | None  # "stop", "length", "abort"
    new_logprobs: list[dict[int, float]] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)  # every output token's so far
    num_prompt_tokens: int = 0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


def resolve_model_path(model: str | None) -> Path:
    if model is None:
        from tideserve.engine.default_model import prepare_default_model

        return prepare_default_model()
    path = Path(model).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"model {model!r} is not a local folder; pass an HF model folder "
            "(config.json + *.safetensors), or omit it for the embedded default"
        )
    return path


class LLMEngine:
    def __init__(
        self,
        config: EngineConfig,
        model_config: ModelConfig,
        path: Path,
        scheduler: Scheduler,
        runner: ModelRunner,
        eos_token_ids: frozenset[int],
    ) -> None:
        self.config = config
        self.model_config = model_config
        self.model_path = path
        self.scheduler = scheduler
        self.runner = runner
        self.eos_token_ids = eos_token_ids
        self.max_model_len = scheduler.config.max_model_len
        self.seqs: dict[str, Sequence] = {}
        self.last_step = (0, 0)  # (prompt tokens, decodes) of the last step

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLMEngine:
        threads = config.num_threads or int(os.environ.get("TIDESERVE_NUM_THREADS", "0")) or None
        if threads:
            torch.set_num_threads(threads)
        if config.load_format == "dummy" and config.model is None:
            raise ValueError("--load-format dummy needs --model: a folder with a config.json")
        path = resolve_model_path(config.model)
        mcfg = ModelConfig.from_dir(path)
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, mcfg, device)
        max_len = config.max_model_len or mcfg.max_context
        if max_len > mcfg.max_position_embeddings:
            raise ValueError(
                f"max_model_len {max_len} exceeds the model's {mcfg.max_position_embeddings}"
            )
        model = load_model(path, mcfg, dtype, device, max_len, config.load_format)
        budget = config.kv_cache_bytes
        if budget is None:
            budget = (
                cuda_kv_budget(config.gpu_memory_utilization, device)
                if device.type == "cuda"
                else GiB
            )
        num_blocks = num_blocks_for_budget(mcfg, config.block_size, dtype, budget)
        max_len = min(max_len, num_blocks * config.block_size)
        kv = KVCache(mcfg, num_blocks, config.block_size, dtype, device)
        sched_cfg = SchedulerConfig(
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=max_len,
            enable_chunked_prefill=config.enable_chunked_prefill,
        )
        scheduler = Scheduler(sched_cfg, BlockPool(num_blocks, config.block_size))
        log.info(
            "engine: %s on %s/%s, %d KV blocks x %d tokens, max_model_len %d",
            path.name,
            device,
            dtype,
            num_blocks,
            config.block_size,
            max_len,
        )
        eos = frozenset(mcfg.eos_token_ids) | _extra_eos(path)
        runner = ModelRunner(model, kv, device)
        if device.type == "cuda" and config.cuda_graphs:
            from tideserve.engine.cuda_graphs import DecodeGraphs

            runner.graphs = DecodeGraphs(model, kv, device, config.max_num_seqs, max_len)
            runner.graphs.capture_all()
        return cls(config, mcfg, path, scheduler, runner, eos)

    # -- requests ----------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        priority: int = 0,
        hold_kv: bool = False,
    ) -> None:
        seq = self._new_sequence(request_id, prompt_token_ids, params, priority, hold_kv)
        self.seqs[request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        """Stops a request wherever it is and frees its blocks; False if unknown."""
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return False
        if not seq.is_finished:
            self.scheduler.abort(seq)
        self.scheduler.release(seq)
        self.runner.sampler.forget(request_id)
        return True

    def release(self, request_id: str) -> None:
        """Frees the blocks a finished `hold_kv` request kept for export."""
        seq = self.seqs.pop(request_id, None)
        if seq is not None:
            self.scheduler.release(seq)
            self.runner.sampler.forget(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    @property
    def num_free_blocks(self) -> int:
        return self.scheduler.pool.num_free

    @property
    def num_total_blocks(self) -> int:
        return self.scheduler.pool.num_blocks

    # -- one step ----------------------------------------------------------------------------

    def step(
        self,
        on_kv_layer: KVLayerHook | None = None,
        on_layer: Callable[[int], None] | None = None,
        phase: str = "",
        token_budget: int | None = None,
    ) -> list[RequestOutput]:
        """One model step. With `on_kv_layer`, each `hold_kv` request whose prefill completes in
        this step has every layer's KV handed to the hook as soon as that layer is computed
        (`hook(request_id, layer, kv[2, kvh, T, hd])`), so a transfer overlaps the compute.
        `on_layer(i)` runs after every layer: a worker keeps its heartbeat going from there
        through a long prefill step. `phase` and `token_budget`: see `Scheduler.schedule`;
        `last_step` then says what ran: (prompt tokens, decodes)."""
        plan = self.scheduler.schedule(phase=phase, token_budget=token_budget)
        self.last_step = (sum(it.num_tokens for it in plan.prefills), len(plan.decodes))
        if plan.is_empty:
            return []
        rows, result = self.runner.run(plan, self._layer_hook(plan, on_kv_layer, on_layer))
        sampled = {it.seq.request_id: t for it, t in zip(rows, result.token_ids)}
        logprobs = {
            it.seq.request_id: lp for it, lp in zip(rows, result.logprobs) if lp is not None
        }
        self.scheduler.update(plan, sampled, logprobs, self.eos_token_ids)
        outputs = []
        for it in rows:
            seq = it.seq
            outputs.append(
                RequestOutput(
                    request_id=seq.request_id,
                    new_token_ids=[sampled[seq.request_id]],
                    token_ids=seq.output_token_ids,
                    finished=seq.is_finished,
                    finish_reason=seq.status.value if seq.is_finished else None,
                    new_logprobs=[logprobs[seq.request_id]] if seq.request_id in logprobs else [],
                    logprobs=seq.output_logprobs,
                    num_prompt_tokens=seq.num_prompt_tokens,
                )
            )
            if seq.is_finished and not seq.hold_kv:
                self.seqs.pop(seq.request_id, None)
                self.runner.sampler.forget(seq.request_id)
        return outputs

    # -- KV export / import -----------------------------------------------------------------

    def _layer_hook(self, plan, on_kv_layer, on_layer) -> Callable[[int], None] | None:
        kv = self.runner.kv
        exports = []
        if on_kv_layer is not None:
            exports = [
                (it.seq.request_id, kv.slots(it.seq.block_table, it.start + it.num_tokens))
                for it in plan.scheduled
                if it.sample and it.seq.hold_kv and it.seq.num_output_tokens == 0
            ]
        if not exports and on_layer is None:
            return None

        def hook(layer: int) -> None:
            for rid, slots in exports:
                on_kv_layer(rid, layer, kv.export_layer(layer, slots))
            if on_layer is not None:
                on_layer(layer)

        return hook

    def kv_num_tokens(self, request_id: str) -> int:
        """Tokens of the request whose KV is in the cache (what an export carries)."""
        return self._seq(request_id).num_computed_tokens

    def export_kv_layer(
        self, request_id: str, layer: int, start: int = 0, end: int | None = None
    ) -> torch.Tensor:
        """[2, kvh, end - start, hd] copy of one layer of the request's computed KV, positions
        start..end-1 (default: all computed)."""
        seq = self._seq(request_id)
        end = seq.num_computed_tokens if end is None else end
        if not 0 <= start <= end <= seq.num_computed_tokens:
            raise ValueError(f"KV range {start}..{end} outside 0..{seq.num_computed_tokens}")
        slots = self.runner.kv.slots(seq.block_table, end)[start:]
        return self.runner.kv.export_layer(layer, slots)

    # -- live migration: the source pauses, the destination imports in stages --------------

    def pause(self, request_id: str) -> None:
        """Takes a running request out of the batch, keeping its KV (a migration's last
        stage); `resume` puts it back, `abort` frees it once the destination has it."""
        seq = self._seq(request_id)
        if seq.status is not SequenceStatus.RUNNING or seq.is_prefill:
            raise ValueError(f"request {request_id!r} is not decoding ({seq.status.value})")
        self.scheduler.pause(seq)

    def resume(self, request_id: str) -> None:
        seq = self._seq(request_id)
        if seq.status is SequenceStatus.PAUSED:
            self.scheduler.resume(seq)

    def extend_import(
        self, request_id: str, output_token_ids: list[int], num_kv_tokens: int
    ) -> bool:
        """A later migration stage: the tokens generated meanwhile and room for KV up to
        `num_kv_tokens`; False (nothing changed) when the pool has no room."""
        seq = self._seq(request_id)
        if seq.status is not SequenceStatus.IMPORTING:
            raise ValueError(f"request {request_id!r} is not importing KV")
        outputs = self._check_ids(output_token_ids, "output token ids")
        if outputs[: len(seq.output_token_ids)] != seq.output_token_ids:
            raise ValueError(f"request {request_id!r}: the stage's tokens do not extend ours")
        if not seq.num_computed_tokens <= num_kv_tokens < len(seq.prompt_token_ids) + len(outputs):
            raise ValueError(f"num_kv_tokens {num_kv_tokens} out of range")
        if not self.scheduler.pool.grow_table(seq.block_table, num_kv_tokens):
            return False
        seq.output_token_ids = outputs
        seq.num_computed_tokens = num_kv_tokens
        return True

    def begin_import(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        output_token_ids: list[int],
        num_kv_tokens: int,
        params: SamplingParams,
        priority: int = 0,
    ) -> bool:
        """Reserves blocks for `num_kv_tokens` of incoming KV; False when the pool has no room.

        `output_token_ids` are the tokens generated so far (migration); a prefill hand-off
        passes none here and its first token to `finish_import`.
        """
        seq = self._new_sequence(request_id, prompt_token_ids, params, priority, False)
        seq.output_token_ids = self._check_ids(output_token_ids, "output token ids")
        if not 0 < num_kv_tokens <= seq.num_tokens:
            raise ValueError(
                f"num_kv_tokens {num_kv_tokens} out of range for {seq.num_tokens} tokens"
            )
        if not self.scheduler.pool.grow_table(seq.block_table, num_kv_tokens):
            return False
        seq.num_computed_tokens = num_kv_tokens
        seq.status = SequenceStatus.IMPORTING
        self.scheduler.importing[request_id] = seq
        self.seqs[request_id] = seq
        return True

    def import_kv_layer(
        self, request_id: str, layer: int, kv: torch.Tensor, start: int = 0
    ) -> None:
        """Writes KV for positions start..start+T-1 (T = kv.shape[2]) of the request."""
        seq = self._seq(request_id)
        if seq.status is not SequenceStatus.IMPORTING:
            raise ValueError(f"request {request_id!r} is not importing KV")
        if start == 0 and kv.shape[2] != seq.num_computed_tokens:
            raise ValueError(
                f"KV layer covers {kv.shape[2]} tokens, the import {seq.num_computed_tokens}"
            )
        end = start + kv.shape[2]
        if not 0 <= start <= end <= seq.num_computed_tokens:
            raise ValueError(f"KV range {start}..{end} outside 0..{seq.num_computed_tokens}")
        slots = self.runner.kv.slots(seq.block_table, end)[start:]
        self.runner.kv.import_layer(layer, slots, kv)

    def finish_import(self, request_id: str, output_token_ids: list[int] = ()) -> None:
        """All layers are in: append the tokens sampled meanwhile and join the running batch."""
        seq = self._seq(request_id)
        if seq.status is not SequenceStatus.IMPORTING:
            raise ValueError(f"request {request_id!r} is not importing KV")
        seq.output_token_ids.extend(self._check_ids(output_token_ids, "output token ids"))
        if seq.num_computed_tokens >= seq.num_tokens:
            self.abort(request_id)
            raise ValueError(f"request {request_id!r}: KV covers every token, nothing to decode")
        self.scheduler.add_running(seq)

    # -- helpers -----------------------------------------------------------------------------

    def _seq(self, request_id: str) -> Sequence:
        seq = self.seqs.get(request_id)
        if seq is None:
            raise KeyError(f"unknown request {request_id!r}")
        return seq

    def _new_sequence(self, request_id, prompt_token_ids, params, priority, hold_kv) -> Sequence:
        if request_id in self.seqs:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        ids = self._check_ids(prompt_token_ids, "prompt token ids")
        if not ids:
            raise ValueError("prompt is empty: give at least one token")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens but the context length is {self.max_model_len}: "
                "it leaves no room for output; shorten the prompt"
            )
        return Sequence(request_id, ids, params, priority=priority, hold_kv=hold_kv)

    def _check_ids(self, ids, what: str) -> list[int]:
        """`ids` as a list; ValueError unless each is a token id of this model (the embedding
        lookup of any other would fail the whole step)."""
        ids, vocab = list(ids), self.model_config.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in ids):
            raise ValueError(f"{what} must be integers in [0, {vocab})")
        return ids


def _extra_eos(path: Path) -> frozenset[int]:
    """End-of-sequence ids beyond config.json's: the tokenizer's (which already include
    generation_config.json's), or generation_config.json's alone for a folder without one."""
    if (path / "tokenizer.json").is_file():
        from tideserve.engine.tokenizer import Tokenizer

        return Tokenizer.from_dir(path).eos_token_ids
    gen = path / "generation_config.json"
    if not gen.is_file():
        return frozenset()
    eos = json.loads(gen.read_text()).get("eos_token_id")
    if eos is None:
        return frozenset()
    return frozenset(eos if isinstance(eos, list) else [eos])
