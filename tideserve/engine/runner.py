"""Turns a scheduled step into tensors, runs the model on them, and samples.

One `run(step)` call: build the flattened batch (tokens, positions, cache slots, attention
metadata) with numpy on the host, one copy to the device, one forward pass, one sampling call.
No per-token Python loop: per-sequence work is a handful of numpy slices.
"""

from __future__ import annotations

import numpy as np
import torch

from tideserve.engine import cpu_kernels
from tideserve.engine.attention import AttentionBatch, DecodeGroup, PrefillChunk
from tideserve.engine.kv_cache import KVCache
from tideserve.engine.model import LlamaModel
from tideserve.engine.sampler import Sampler, SampleResult
from tideserve.engine.scheduler import ScheduledSeq, SchedulerOutput


class ModelRunner:
    def __init__(
        self, model: LlamaModel, kv: KVCache, device: torch.device, use_cpu_kernels: bool = True
    ) -> None:
        self.model = model
        self.kv = kv
        self.device = device
        self.kernel = cpu_kernels.load() if device.type == "cpu" and use_cpu_kernels else None
        self.ops = self.kernel  # the fused norm/rotary/SiLU ops live in the same module
        self.sampler = Sampler(self.kernel.argmax_rows if self.kernel is not None else None)
        self._arange = np.arange(kv.block_size, dtype=np.int64)
        self.graphs = None  # cuda_graphs.DecodeGraphs on CUDA (the engine sets it up)

    def run(
        self, step: SchedulerOutput, layer_hook=None
    ) -> tuple[list[ScheduledSeq], SampleResult]:
        """Runs one step; returns the sampling rows (scheduled items that sample) and tokens.
        `layer_hook(i)`, if given, runs right after layer i of the forward pass."""
        logits = self.forward_logits(step, layer_hook)
        rows = [it for it in step.decodes + step.prefills if it.sample]
        if not rows:
            return [], SampleResult([], [])
        params = [it.seq.params for it in rows]
        ids = [it.seq.request_id for it in rows]
        return rows, self.sampler(logits, params, ids)

    def forward_logits(self, step: SchedulerOutput, layer_hook=None) -> torch.Tensor:
        """[N, V] logits (model dtype) of the scheduled items that sample, in batch order
        (decodes are put in context-length order first, for the decode groups)."""
        if self.graphs is not None and layer_hook is None:
            logits = self.graphs.run(step)  # None: not a decode-only step a graph fits
            if logits is not None:
                return logits
        input_ids, positions, batch, logits_idx = self.prepare(step)
        return self.model(input_ids, positions, self.kv.tensor, batch, logits_idx, layer_hook)

    def prepare(self, step: SchedulerOutput, with_ids: bool = True):
        """The step's device inputs: token ids [T] (None unless `with_ids`: a later pipeline
        stage starts from hidden states), positions [T], attention metadata, and the rows that
        sample [N]. Sorts the decodes by context length first (the decode groups need it)."""
        step.decodes.sort(key=lambda d: d.start)
        input_ids, positions, slot_mapping, logits_idx = [], [], [], []
        offset = 0
        for item in step.decodes + step.prefills:
            seq = item.seq
            end = item.start + item.num_tokens
            if with_ids:
                input_ids.append(np.asarray(seq.token_slice(item.start, end), dtype=np.int64))
            positions.append(np.arange(item.start, end, dtype=np.int64))
            slot_mapping.append(self._slots(seq.block_table, item.start, end))
            offset += item.num_tokens
            if item.sample:
                logits_idx.append(offset - 1)
        batch = self._attention_batch(step, slot_mapping)
        to_dev = lambda arrs: torch.from_numpy(np.concatenate(arrs)).to(self.device)
        return (
            to_dev(input_ids) if with_ids else None,
            to_dev(positions),
            batch,
            torch.tensor(logits_idx, dtype=torch.long, device=self.device),
        )

    def _slots(self, block_table: list[int], start: int, end: int) -> np.ndarray:
        bs = self.kv.block_size
        blocks = np.asarray(block_table[: -(-end // bs)], dtype=np.int64)
        return (blocks[:, None] * bs + self._arange).reshape(-1)[start:end]

    def _kernel_rows(self, items: list[ScheduledSeq]) -> tuple[torch.Tensor, torch.Tensor]:
        """Block tables [T, nb] and context lengths [T] of every row of the batch, for the CPU
        kernel: a decode attends to its whole context, a prefill token (causally) to its own
        position and those before it. Each row thus gets the same arithmetic however the
        prompt was chunked and whatever else is in the batch."""
        bs = self.kv.block_size
        ends = [it.start + it.num_tokens for it in items]
        tables = np.zeros((sum(it.num_tokens for it in items), -(-max(ends) // bs)), np.int64)
        lens = np.empty(tables.shape[0], dtype=np.int64)
        row = 0
        for it, end in zip(items, ends):
            table = it.seq.block_table[: -(-end // bs)]
            tables[row : row + it.num_tokens, : len(table)] = table
            lens[row : row + it.num_tokens] = np.arange(it.start + 1, end + 1)
            row += it.num_tokens
        return torch.from_numpy(tables), torch.from_numpy(lens)

    def _decode_group(self, decodes: list[ScheduledSeq]) -> tuple[torch.Tensor, torch.Tensor]:
        bs = self.kv.block_size
        lens = [d.start + 1 for d in decodes]
        nb = -(-max(lens) // bs)
        blocks = np.zeros((len(lens), nb), dtype=np.int64)
        bias = np.full((1, len(lens), 1, nb * bs), -np.inf, dtype=np.float32)
        for b, (d, n) in enumerate(zip(decodes, lens)):
            table = d.seq.block_table[: -(-n // bs)]
            blocks[b, : len(table)] = table
            bias[0, b, :, :n] = 0.0
        dev = self.device
        return torch.from_numpy(blocks.reshape(-1)).to(dev), torch.from_numpy(bias).to(dev)

    def _attention_batch(
        self, step: SchedulerOutput, slot_mapping: list[np.ndarray]
    ) -> AttentionBatch:
        dev = self.device
        bs = self.kv.block_size
        batch = AttentionBatch(
            slot_mapping=torch.from_numpy(np.concatenate(slot_mapping)).to(dev),
            num_decodes=len(step.decodes),
            block_size=bs,
            decode_groups=[],
            prefills=[],
            ops=self.ops,
        )
        if self.kernel is not None:
            batch.kernel = self.kernel
            batch.row_tables, batch.row_lens = self._kernel_rows(step.decodes + step.prefills)
            return batch
        start = 0
        for members in _length_groups([d.start + 1 for d in step.decodes]):
            blocks, bias = self._decode_group([step.decodes[i] for i in members])
            batch.decode_groups.append(DecodeGroup(start, len(members), blocks, bias))
            start += len(members)
        q_start = len(step.decodes)
        for p in step.prefills:
            end = p.start + p.num_tokens
            ctx_blocks = torch.tensor(
                p.seq.block_table[: -(-end // bs)], dtype=torch.long, device=dev
            )
            mask = None
            if p.start:
                rows = np.arange(p.start, end)[:, None]
                mask = torch.from_numpy(np.arange(end)[None, :] <= rows).to(dev)
            batch.prefills.append(PrefillChunk(q_start, p.num_tokens, ctx_blocks, end, mask))
            q_start += p.num_tokens
        return batch


def _length_groups(lens: list[int], max_waste: float = 0.25, min_group: int = 4) -> list[list[int]]:
    """Splits indices of ascending `lens` into runs whose padding to the run's longest wastes at
    most `max_waste` of the attended positions (runs shorter than `min_group` merge on)."""
    groups: list[list[int]] = []
    cur: list[int] = []
    total = 0
    for i, n in enumerate(lens):
        if cur and len(cur) >= min_group and n * (len(cur) + 1) > (1 + max_waste) * (total + n):
            groups.append(cur)
            cur, total = [], 0
        cur.append(i)
        total += n
    if cur:
        groups.append(cur)
    return groups
