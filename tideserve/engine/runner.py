"""Turns a scheduled step into tensors, runs the model on them, and samples.

One `run(step)` call: build the flattened batch (tokens, positions, cache slots, attention
metadata) with numpy on the host, one copy to the device, one forward pass, one sampling call.
No per-token Python loop: per-sequence work is a handful of numpy slices.
"""

from __future__ import annotations

import numpy as np
import torch

from tideserve.engine.attention import AttentionBatch, PrefillChunk
from tideserve.engine.kv_cache import KVCache
from tideserve.engine.model import LlamaModel
from tideserve.engine.sampler import Sampler, SampleResult
from tideserve.engine.scheduler import ScheduledSeq, SchedulerOutput


class ModelRunner:
    def __init__(self, model: LlamaModel, kv: KVCache, device: torch.device) -> None:
        self.model = model
        self.kv = kv
        self.device = device
        self.sampler = Sampler()
        self._arange = np.arange(kv.block_size, dtype=np.int64)

    def run(self, step: SchedulerOutput) -> tuple[list[ScheduledSeq], SampleResult]:
        """Runs one step; returns the sampling rows (scheduled items that sample) and tokens."""
        rows = [it for it in step.decodes + step.prefills if it.sample]
        logits = self.forward_logits(step)
        if not rows:
            return [], SampleResult([], [])
        params = [it.seq.params for it in rows]
        ids = [it.seq.request_id for it in rows]
        return rows, self.sampler(logits, params, ids)

    def forward_logits(self, step: SchedulerOutput) -> torch.Tensor:
        """[N, V] float32 logits of the scheduled items that sample, in batch order."""
        input_ids, positions, slot_mapping, logits_idx = [], [], [], []
        offset = 0
        for item in step.decodes + step.prefills:
            seq = item.seq
            end = item.start + item.num_tokens
            input_ids.append(np.asarray(seq.token_slice(item.start, end), dtype=np.int64))
            positions.append(np.arange(item.start, end, dtype=np.int64))
            slot_mapping.append(self._slots(seq.block_table, item.start, end))
            offset += item.num_tokens
            if item.sample:
                logits_idx.append(offset - 1)
        batch = self._attention_batch(step, slot_mapping)
        to_dev = lambda arrs: torch.from_numpy(np.concatenate(arrs)).to(self.device)
        return self.model(
            to_dev(input_ids),
            to_dev(positions),
            self.kv.tensor,
            batch,
            torch.tensor(logits_idx, dtype=torch.long, device=self.device),
        )

    def _slots(self, block_table: list[int], start: int, end: int) -> np.ndarray:
        bs = self.kv.block_size
        blocks = np.asarray(block_table[: -(-end // bs)], dtype=np.int64)
        return (blocks[:, None] * bs + self._arange).reshape(-1)[start:end]

    def _attention_batch(
        self, step: SchedulerOutput, slot_mapping: list[np.ndarray]
    ) -> AttentionBatch:
        dev = self.device
        bs = self.kv.block_size
        decode_blocks = decode_bias = None
        if step.decodes:
            lens = [d.start + 1 for d in step.decodes]
            nb = -(-max(lens) // bs)
            blocks = np.zeros((len(lens), nb), dtype=np.int64)
            bias = np.full((1, len(lens), 1, nb * bs), -np.inf, dtype=np.float32)
            for b, (d, n) in enumerate(zip(step.decodes, lens)):
                table = d.seq.block_table[: -(-n // bs)]
                blocks[b, : len(table)] = table
                bias[0, b, :, :n] = 0.0
            decode_blocks = torch.from_numpy(blocks.reshape(-1)).to(dev)
            decode_bias = torch.from_numpy(bias).to(dev)
        prefills = []
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
            prefills.append(PrefillChunk(q_start, p.num_tokens, ctx_blocks, end, mask))
            q_start += p.num_tokens
        return AttentionBatch(
            slot_mapping=torch.from_numpy(np.concatenate(slot_mapping)).to(dev),
            num_decodes=len(step.decodes),
            block_size=bs,
            decode_blocks=decode_blocks,
            decode_bias=decode_bias,
            prefills=prefills,
        )
