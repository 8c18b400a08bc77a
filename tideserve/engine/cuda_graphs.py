"""CUDA graphs for decode steps: one graph per (batch bucket, context bucket), replayed.

A decode-only step on CUDA spends most of its time launching kernels (a few hundred per step
for a small model). `DecodeGraphs` captures the model's forward once per shape and replays it:

    capture(B, nb): static inputs [B] (ids, positions, slots), block table [B*nb], bias
                    [1, B, 1, nb*block_size] -> run the forward once to warm up, then record it
                    into a CUDA graph (all graphs share one memory pool; largest first)
    run(step):      a decode-only step of n sequences with at most `nb_needed` blocks each
                    -> B = the next batch bucket >= n, nb = the next context bucket >= nb_needed
                    -> fill the static inputs (rows n..B-1 repeat row 0: same token, position,
                    slot and blocks, so they write the very same K/V to the same slot) -> replay
                    -> the first n rows of the static logits.
    Anything else (prefill tokens in the step, a layer hook for KV streaming, a shape past
    `max_graph_tokens` batch x context tokens) runs eagerly, as before. Every graph is captured
    at start-up (`capture_all`), never while requests run.

Batch buckets are 1, 2, 4, 8, then every 8 up to max_num_seqs (as vLLM does); context buckets
are powers of two in blocks up to max_model_len. The padding logic is pure numpy (tested on the
CPU); capture and replay only run on a CUDA device.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from tideserve.engine.attention import AttentionBatch, DecodeGroup

log = logging.getLogger(__name__)

# NOTE: a step's attention gathers batch x context tokens of K/V per layer; a graph holds its
# buffers for good, so shapes past this many tokens are not captured and run eagerly
MAX_GRAPH_TOKENS = 1 << 17


def batch_buckets(max_num_seqs: int) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, 8, 16, 24, ... up to max_num_seqs (always included)."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    sizes = [b for b in (1, 2, 4) if b < max_num_seqs]
    sizes += list(range(8, max_num_seqs, 8))
    return sorted(set(sizes) | {max_num_seqs})


def context_buckets(max_blocks: int) -> list[int]:
    """Block-table widths to capture: powers of two up to max_blocks (always included)."""
    if max_blocks < 1:
        raise ValueError(f"max_blocks must be >= 1, got {max_blocks}")
    sizes, nb = [], 1
    while nb < max_blocks:
        sizes.append(nb)
        nb *= 2
    return [*sizes, max_blocks]


def pick_bucket(n: int, buckets: list[int]) -> int | None:
    """The smallest bucket >= n, or None when n is larger than all of them."""
    for b in buckets:
        if b >= n:
            return b
    return None


def pad_rows(a: np.ndarray, size: int) -> np.ndarray:
    """`a` ([n, ...]) grown to `size` rows by repeating row 0 (the padding rows do exactly what
    row 0 does, so their K/V writes land on row 0's slot with row 0's values)."""
    n = a.shape[0]
    if not 0 < n <= size:
        raise ValueError(f"cannot pad {n} rows to {size}")
    if n == size:
        return a
    return np.concatenate([a, np.repeat(a[:1], size - n, axis=0)])


def decode_inputs(
    token_ids: list[int], starts: list[int], tables: list[list[int]], block_size: int, nb: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Host inputs of n decodes (sorted by context): ids [n], positions [n], slots [n], blocks
    [n, nb] (zero-padded) and bias [n, nb*block_size] (0 where the context is, -inf after)."""
    n = len(token_ids)
    positions = np.asarray(starts, dtype=np.int64)
    blocks = np.zeros((n, nb), dtype=np.int64)
    bias = np.full((n, nb * block_size), -np.inf, dtype=np.float32)
    for b, (start, table) in enumerate(zip(starts, tables)):
        used = -(-(start + 1) // block_size)
        if used > nb:
            raise ValueError(f"a context of {start + 1} tokens needs {used} blocks > {nb}")
        blocks[b, :used] = table[:used]
        bias[b, : start + 1] = 0.0
    slots = blocks[np.arange(n), positions // block_size] * block_size + positions % block_size
    return np.asarray(token_ids, dtype=np.int64), positions, slots, blocks, bias


class _Graph:
    """One captured shape: its static inputs, output and the graph."""

    def __init__(self, batch: int, nb: int, block_size: int, device: torch.device) -> None:
        self.batch, self.nb = batch, nb
        z = lambda *shape, dtype=torch.long: torch.zeros(shape, dtype=dtype, device=device)
        self.ids, self.positions, self.slots = z(batch), z(batch), z(batch)
        self.blocks = z(batch * nb)
        self.bias = z(1, batch, 1, nb * block_size, dtype=torch.float32)
        self.rows = torch.arange(batch, device=device)  # logits of every row
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None  # [batch, vocab] float32, the graph's output

    def attention_batch(self, block_size: int) -> AttentionBatch:
        group = DecodeGroup(0, self.batch, self.blocks, self.bias)
        return AttentionBatch(self.slots, self.batch, block_size, [group], [])


class DecodeGraphs:
    """Captured decode steps for one model and KV cache on a CUDA device."""

    def __init__(
        self,
        model,
        kv,
        device: torch.device,
        max_num_seqs: int,
        max_model_len: int,
        max_graph_tokens: int = MAX_GRAPH_TOKENS,
    ):
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        self.model, self.kv, self.device = model, kv, device
        self.block_size = kv.block_size
        self.batches = batch_buckets(max_num_seqs)
        self.contexts = context_buckets(-(-max_model_len // kv.block_size))
        self.max_graph_tokens = max_graph_tokens
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.pool = None  # one memory pool for every graph
        self.num_replays = 0

    def capture_all(self) -> None:
        """Captures every (batch, context) bucket within `max_graph_tokens`, largest first (they
        share one pool)."""
        t0 = time.monotonic()
        for nb in reversed(self.contexts):
            for b in reversed(self.batches):
                if b * nb * self.block_size <= self.max_graph_tokens:
                    self._capture(b, nb)
        log.info("captured %d CUDA graphs (batch %s x blocks %s) in %.1fs", len(self.graphs),
                 self.batches, self.contexts, time.monotonic() - t0)  # fmt: skip

    def run(self, step) -> torch.Tensor | None:
        """[n, vocab] logits of a decode-only step, by replay; None when no graph fits it."""
        if step.prefills or not step.decodes or not all(d.sample for d in step.decodes):
            return None
        step.decodes.sort(key=lambda d: d.start)  # the order forward_logits promises
        n = len(step.decodes)
        need = -(-(step.decodes[-1].start + 1) // self.block_size)
        g = self.graphs.get((pick_bucket(n, self.batches), pick_bucket(need, self.contexts)))
        if g is None:
            return None  # too many sequences or too much context for a captured shape
        b, nb = g.batch, g.nb
        starts = [d.start for d in step.decodes]
        ids = [d.seq.token_slice(d.start, d.start + 1)[0] for d in step.decodes]
        tables = [d.seq.block_table for d in step.decodes]
        host = decode_inputs(ids, starts, tables, self.block_size, nb)
        ids_, pos, slots, blocks, bias = (pad_rows(a, b) for a in host)
        g.ids.copy_(torch.from_numpy(ids_), non_blocking=True)
        g.positions.copy_(torch.from_numpy(pos), non_blocking=True)
        g.slots.copy_(torch.from_numpy(slots), non_blocking=True)
        g.blocks.copy_(torch.from_numpy(blocks.reshape(-1)), non_blocking=True)
        g.bias.copy_(torch.from_numpy(bias).view(1, b, 1, -1), non_blocking=True)
        g.graph.replay()
        self.num_replays += 1
        return g.logits[:n].clone()

    def _capture(self, b: int, nb: int) -> _Graph:
        g = _Graph(b, nb, self.block_size, self.device)
        g.bias.zero_()  # a valid (all-attending) mask for the warm-up runs
        forward = lambda: self.model(
            g.ids, g.positions, self.kv.tensor, g.attention_batch(self.block_size), g.rows
        )
        # NOTE: the warm-up writes K/V of token 0 at slot 0, which may belong to a live
        # sequence: that slot of every layer is saved before and put back after
        slot0 = self.kv.tensor[..., 0:1, :].clone()  # [layers, 2, kvh, 1, hd]
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            forward()  # warm-up: lazy inits and autotuning outside the capture
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self.kv.tensor[..., 0:1, :].copy_(slot0)
        g.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g.graph, pool=self.pool):
            g.logits = forward()
        self.pool = g.graph.pool()
        self.graphs[(b, nb)] = g
        return g
