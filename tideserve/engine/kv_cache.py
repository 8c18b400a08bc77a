"""The paged KV-cache tensor, sized from a memory budget, and per-layer export/import.

Layout: [num_layers, 2 (k, v), num_kv_heads, num_blocks * block_size (slots), head_dim].
A token at position p of a sequence lives in slot block_table[p // block_size] * block_size +
p % block_size. Export and import move one layer of one sequence at a time, so a transport
can stream layer by layer while the model is still computing the next one.
"""

from __future__ import annotations

import ctypes
import sys

import torch

from tideserve.engine.model_config import ModelConfig


def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return cfg.num_layers * 2 * block_size * cfg.num_kv_heads * cfg.head_dim * elem


def num_blocks_for_budget(
    cfg: ModelConfig, block_size: int, dtype: torch.dtype, budget_bytes: int
) -> int:
    n = budget_bytes // bytes_per_block(cfg, block_size, dtype)
    if n < 1:
        raise ValueError(
            f"KV cache budget of {budget_bytes} bytes is smaller than one block "
            f"({bytes_per_block(cfg, block_size, dtype)} bytes); raise --kv-cache-bytes"
        )
    return int(n)


def cuda_kv_budget(fraction: float, device: torch.device) -> int:
    """`fraction` of the GPU's total memory, minus what is already allocated (weights)."""
    free, total = torch.cuda.mem_get_info(device)
    used = total - free
    return max(0, int(total * fraction) - used)


_MADV_HUGEPAGE = 14
_HUGE = 1 << 21


def advise_huge_pages(t: torch.Tensor) -> bool:
    """Asks Linux for 2 MiB pages under a large, not yet touched CPU tensor (where transparent
    huge pages are `madvise`, the usual default). Decode attention reads every sequence's KV
    blocks each step; with 4 KiB pages that is a TLB miss every few blocks (~5% of a decode
    step here). The price is paid once, at the first touch: Linux may compact memory to find
    2 MiB pages (zeroing a 1 GiB cache took 0.1-1.2 s here, against 0.27 s on small pages).
    False where the call is unavailable or refused: the tensor works the same, on small pages."""
    nbytes = t.numel() * t.element_size()
    start = (t.data_ptr() + _HUGE - 1) & ~(_HUGE - 1)
    end = (t.data_ptr() + nbytes) & ~(_HUGE - 1)
    if end <= start or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc.madvise(start, end - start, _MADV_HUGEPAGE) == 0
    except (OSError, AttributeError):
        return False


class KVCache:
    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype, device) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (cfg.num_layers, 2, cfg.num_kv_heads, num_blocks * block_size, cfg.head_dim)
        self.tensor = torch.empty(shape, dtype=dtype, device=device)
        if self.tensor.device.type == "cpu":
            advise_huge_pages(self.tensor)
        self.tensor.zero_()  # first touch: after the advice, so the pages are huge

    @property
    def num_layers(self) -> int:
        return self.tensor.shape[0]

    def slots(self, block_table: list[int], num_tokens: int) -> torch.Tensor:
        """[num_tokens] cache slots of positions 0..num_tokens-1 of a sequence."""
        bs = self.block_size
        blocks = torch.tensor(block_table, dtype=torch.long)
        slots = (blocks[:, None] * bs + torch.arange(bs)).reshape(-1)[:num_tokens]
        return slots.to(self.tensor.device)

    def export_layer(self, layer: int, slots: torch.Tensor) -> torch.Tensor:
        """[2, kvh, num_tokens, hd] copy of one layer's K and V for the given slots."""
        return self.tensor[layer].index_select(2, slots)

    def import_layer(self, layer: int, slots: torch.Tensor, kv: torch.Tensor) -> None:
        num_layers = self.tensor.shape[0]
        if not 0 <= layer < num_layers:
            raise ValueError(f"KV layer {layer} does not exist: the model has {num_layers}")
        expected = (2, self.tensor.shape[2], slots.shape[0], self.tensor.shape[4])
        if tuple(kv.shape) != expected:
            raise ValueError(f"KV layer shape {tuple(kv.shape)} != expected {expected}")
        self.tensor[layer].index_copy_(
            2, slots, kv.to(device=self.tensor.device, dtype=self.tensor.dtype)
        )
