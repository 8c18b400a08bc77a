"""torch tensors <-> (TensorMeta, raw bytes) for ZMQ frames and shared memory, without copies
where the layout allows (bf16 travels as raw 2-byte words: numpy has no bfloat16)."""

from __future__ import annotations

import numpy as np
import torch

from tideserve.protocol import TensorMeta, check_tensor

_TORCH = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
}
_NAMES = {v: k for k, v in _TORCH.items()}


def meta_of(t: torch.Tensor) -> TensorMeta:
    if t.dtype not in _NAMES:
        raise ValueError(f"unsupported tensor dtype {t.dtype}")
    return TensorMeta(_NAMES[t.dtype], tuple(t.shape))


def to_frame(t: torch.Tensor) -> tuple[TensorMeta, np.ndarray]:
    """Meta and a contiguous CPU numpy view of `t` (copied only if non-contiguous or on GPU)."""
    meta = meta_of(t)
    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:
        return meta, t.view(torch.int16).numpy()
    return meta, t.numpy()


def from_frame(meta: TensorMeta, raw) -> torch.Tensor:
    """A tensor over `raw` (no copy; the caller keeps `raw` alive or copies)."""
    check_tensor(meta, memoryview(raw))
    dtype = _TORCH.get(meta.dtype)
    if dtype is None:
        raise ValueError(f"unsupported tensor dtype {meta.dtype!r}")
    if len(raw) == 0:
        return torch.empty(meta.shape, dtype=dtype)
    return torch.frombuffer(raw, dtype=dtype).view(meta.shape)
