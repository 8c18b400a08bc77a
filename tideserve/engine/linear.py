"""Linear layers with weights pre-packed for oneDNN on CPU.

`F.linear` re-lays out the weight on every call; packing it once for oneDNN makes the small-M
matmuls of decode 1.5-2.5x faster on this class of CPU (benchmarks/engine_throughput.py), and
keeps each row's result independent of how many rows are in the batch. On CUDA, or where
oneDNN lacks the dtype, layers stay plain `nn.Linear`.
"""

from __future__ import annotations

import torch
from torch import nn


def can_pack(dtype: torch.dtype, device: torch.device) -> bool:
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if dtype == torch.float16:
        return torch.ops.mkldnn._is_mkldnn_fp16_supported()
    return dtype == torch.float32


class PackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, in] -> [T, out]
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def pack_linears(module: nn.Module) -> int:
    """Replaces every `nn.Linear` under `module` with a `PackedLinear` where it pays off."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            if can_pack(child.weight.dtype, child.weight.device):
                setattr(module, name, PackedLinear(child))
                count += 1
        else:
            count += pack_linears(child)
    return count
