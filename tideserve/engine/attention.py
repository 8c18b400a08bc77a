"""Paged attention in plain torch, for one layer of a flattened mixed batch.

A step's tokens are laid out as [decode tokens (one per sequence) | prefill chunks]. Decodes
attend as one padded batch over KV gathered from their block tables; each prefill chunk
attends on its own with a causal mask offset by the tokens already in its cache. A sequence
therefore runs the same kernels whatever else is in the batch (batch invariance).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PrefillChunk:
    q_start: int  # offset of the chunk's first token in the flattened batch
    q_len: int  # tokens in the chunk
    ctx_slots: torch.Tensor  # [ctx_len] cache slots of every token up to the chunk's end
    mask: torch.Tensor | None  # [q_len, ctx_len] bool, True = attend; None = plain causal


@dataclass
class AttentionBatch:
    """Per-step metadata shared by every layer."""

    slot_mapping: torch.Tensor  # [T] cache slot each new token's K/V is written to
    num_decodes: int  # the first num_decodes tokens are decodes, one per sequence
    decode_slots: torch.Tensor | None  # [B, L] slots of each decode's context (padded)
    decode_bias: torch.Tensor | None  # [B, 1, 1, L] 0 where valid, -inf on padding
    prefills: list[PrefillChunk]


def write_kv(cache_k: torch.Tensor, cache_v: torch.Tensor, k, v, slots: torch.Tensor) -> None:
    """cache_*: [S, kvh, hd] flat slots of one layer; k, v: [T, kvh, hd]."""
    cache_k.index_copy_(0, slots, k)
    cache_v.index_copy_(0, slots, v)


def paged_attention(
    q: torch.Tensor,  # [T, H, hd]
    cache_k: torch.Tensor,  # [S, kvh, hd]
    cache_v: torch.Tensor,  # [S, kvh, hd]
    batch: AttentionBatch,
    scale: float,
) -> torch.Tensor:  # [T, H, hd]
    out = torch.empty_like(q)
    b = batch.num_decodes
    if b:
        out[:b] = _decode_attention(q[:b], cache_k, cache_v, batch, scale)
    for chunk in batch.prefills:
        sl = slice(chunk.q_start, chunk.q_start + chunk.q_len)
        out[sl] = _prefill_attention(q[sl], cache_k, cache_v, chunk, scale)
    return out


def _decode_attention(q, cache_k, cache_v, batch: AttentionBatch, scale: float) -> torch.Tensor:
    bsz, num_heads, hd = q.shape
    kvh = cache_k.shape[1]
    slots = batch.decode_slots  # [B, L]
    L = slots.shape[1]
    k = cache_k.index_select(0, slots.reshape(-1)).view(bsz, L, kvh, hd).transpose(1, 2)
    v = cache_v.index_select(0, slots.reshape(-1)).view(bsz, L, kvh, hd).transpose(1, 2)
    qg = q.view(bsz, kvh, num_heads // kvh, hd)  # [B, kvh, g, hd]
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scale  # [B, kvh, g, L]
    scores = scores + batch.decode_bias
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v).reshape(bsz, num_heads, hd)  # [B, H, hd]


def _prefill_attention(q, cache_k, cache_v, chunk: PrefillChunk, scale: float) -> torch.Tensor:
    k = cache_k.index_select(0, chunk.ctx_slots).transpose(0, 1)  # [kvh, ctx, hd]
    v = cache_v.index_select(0, chunk.ctx_slots).transpose(0, 1)
    qh = q.transpose(0, 1)  # [H, q_len, hd]
    if chunk.mask is None:
        o = F.scaled_dot_product_attention(qh, k, v, is_causal=True, scale=scale, enable_gqa=True)
    else:
        o = F.scaled_dot_product_attention(qh, k, v, attn_mask=chunk.mask, scale=scale, enable_gqa=True)
    return o.transpose(0, 1)  # [q_len, H, hd]
