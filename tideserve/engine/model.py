"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2) over a paged KV cache.

Weights use HF names at load time; q/k/v and gate/up are fused into one matmul each after
loading (`fuse()`), so a layer is 4 matmuls. `forward` takes the flattened tokens of a mixed
batch and returns logits only for the positions that sample.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tideserve.engine.attention import AttentionBatch, paged_attention, write_kv
from tideserve.engine.linear import pack_linears
from tideserve.engine.model_config import ModelConfig


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_ctx = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    raise ValueError(f"unsupported rope_scaling type {kind!r}; supported: default, linear, llama3")


class Rotary(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__()
        t = torch.arange(max_positions, dtype=torch.int64).float()
        freqs = torch.outer(t, rope_inv_freq(cfg))  # [P, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, hd]
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype):
        """cos, sin: [T, 1, hd] for this step's positions, computed once for all layers."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(
            dtype
        )


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, hd], rotated by the HF (half-split) convention."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # NOTE: rms_norm accumulates in float32 and rounds once, as HF does; the weight then
        # scales in the model dtype, also as HF does.
        return self.weight * F.rms_norm(x, self.weight.shape, eps=self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        )
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, q_size, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_size, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(q_size, cfg.hidden_size, bias=False)
        self.qkv: nn.Linear | None = None
        self.sizes = (q_size, kv_size, kv_size)
        self.scale = cfg.head_dim**-0.5

    def fuse(self) -> None:
        self.qkv = _fuse_linears([self.q_proj, self.k_proj, self.v_proj])
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x, cache: torch.Tensor, batch: AttentionBatch):
        t, h = x.shape[0], self.num_heads
        if batch.ops is not None:  # rotary and the KV write in one fused call
            q = batch.ops.rope_write_kv(
                self.qkv(x), batch.cos, batch.sin, cache, batch.slot_mapping, h, self.num_kv_heads
            )
            return self.o_proj(paged_attention(q, cache, batch, self.scale).view(t, -1))
        qkv = self.qkv(x).view(t, -1, self.head_dim)  # [T, H + 2*kvh, hd]
        qk = apply_rotary(qkv[:, : h + self.num_kv_heads], batch.cos, batch.sin)  # [T, H+kvh, hd]
        write_kv(cache, qk[:, h:], qkv[:, h + self.num_kv_heads :], batch.slot_mapping)
        o = paged_attention(qk[:, :h], cache, batch, self.scale)  # [T, H, hd]
        return self.o_proj(o.reshape(t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gate_up: nn.Linear | None = None

    def fuse(self) -> None:
        self.gate_up = _fuse_linears([self.gate_proj, self.up_proj])
        del self.gate_proj, self.up_proj

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cache, batch):
        ops = batch.ops
        if ops is None:
            x = x + self.self_attn(self.input_layernorm(x), cache, batch)
            return x + self.mlp(self.post_attention_layernorm(x))
        # NOTE: the fused CPU ops (cpu_kernels.py) round where the torch ops above do; one call
        # each for the norm, the residual add with the next norm, and SiLU * up.
        norm1, norm2, mlp = self.input_layernorm, self.post_attention_layernorm, self.mlp
        x = x.contiguous()  # (hidden states from another stage arrive as they were sent)
        n = ops.rms_norm(x, norm1.weight, norm1.eps)
        x, n = ops.add_rms_norm(x, self.self_attn(n, cache, batch), norm2.weight, norm2.eps)
        return x + mlp.down_proj(ops.silu_mul(mlp.gate_up(n)))


class LlamaModel(nn.Module):
    """HF-compatible module tree: `model.layers.N....` and `lm_head` match checkpoint names."""

    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.config = cfg
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.model.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = Rotary(cfg, max_positions)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def fuse(self) -> None:
        """Fuses q/k/v and gate/up into one matmul each, then packs matmul weights for the CPU."""
        for layer in self.model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()
        pack_linears(self)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_cache: torch.Tensor,  # [num_layers, 2, kvh, S, hd]
        batch: AttentionBatch,
        logits_indices: torch.Tensor,  # [N] rows of the batch that sample
        layer_hook=None,  # called with the layer index after each layer (KV streaming)
    ) -> torch.Tensor:  # [N, vocab] in the model dtype
        x = self.model.embed_tokens(input_ids)  # [T, hidden]
        batch.cos, batch.sin = self.rotary.tables(positions, x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, kv_cache[i], batch)
            if layer_hook is not None:
                layer_hook(i)
        x = self.model.norm(x[logits_indices])  # [N, hidden]
        return self.lm_head(x)  # the sampler widens only the rows that need it


def _fuse_linears(linears: list[nn.Linear]) -> nn.Linear:
    w = torch.cat([lin.weight.data for lin in linears], dim=0)
    has_bias = linears[0].bias is not None
    fused = nn.Linear(w.shape[1], w.shape[0], bias=has_bias, device=w.device, dtype=w.dtype)
    fused.weight.data = w
    if has_bias:
        fused.bias.data = torch.cat([lin.bias.data for lin in linears])
    return fused
