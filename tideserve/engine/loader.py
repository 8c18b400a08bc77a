"""Build a `LlamaModel` from an HF folder (safetensors, sharded or not) or random weights."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open

from tideserve.engine.model import LlamaModel
from tideserve.engine.model_config import ModelConfig

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def resolve_dtype(name: str, cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """`auto` takes the checkpoint's dtype; float16 becomes bfloat16 on CPU (fp16 is slow there)."""
    if name == "auto":
        dtype = DTYPES.get(cfg.torch_dtype, torch.float32)
        if dtype == torch.float16 and device.type == "cpu":
            dtype = torch.bfloat16
        return dtype
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({path / f for f in weight_map.values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {str(path)!r}")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"shards listed in the index are missing: {missing}")
    return files


def load_model(
    path: str | Path,
    cfg: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    max_positions: int,
    load_format: str = "safetensors",
) -> LlamaModel:
    with torch.device("meta"):
        model = LlamaModel(cfg, max_positions)
    if load_format == "dummy":
        state = _dummy_state(model, dtype, device)
    elif load_format in ("safetensors", "auto"):
        state = _read_state(Path(path), dtype, device)
    else:
        raise ValueError(f"unknown load format {load_format!r}; choose safetensors or dummy")
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    expected = {n for n, _ in model.named_parameters()}
    if cfg.tie_word_embeddings:
        expected.discard("lm_head.weight")
    missing = sorted(expected - state.keys())
    if missing:
        raise ValueError(
            f"checkpoint at {str(path)!r} lacks {len(missing)} weights, e.g. {missing[:3]}"
        )
    unexpected = sorted(state.keys() - expected)
    if unexpected:
        log.warning("ignoring %d unexpected weights, e.g. %s", len(unexpected), unexpected[:3])
        for name in unexpected:
            del state[name]
    model.load_state_dict(state, strict=False, assign=True)
    model.rotary = type(model.rotary)(cfg, max_positions).to(device)
    model.tie_weights()
    model.fuse()
    return model.eval()


def _read_state(
    path: Path, dtype: torch.dtype, device: torch.device, names: set[str] | None = None
) -> dict[str, torch.Tensor]:
    """Every weight of the checkpoint, or only `names` (a layer range reads only its own)."""
    state = {}
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                if name.endswith(_IGNORED_SUFFIXES) or (names is not None and name not in names):
                    continue
                state[name] = f.get_tensor(name).to(dtype=dtype).to(device)
    return state


def _dummy_state(
    model: LlamaModel, dtype: torch.dtype, device: torch.device
) -> dict[str, torch.Tensor]:
    """Deterministic random weights (seed 0) for any shape: for benchmarks, never for quality."""
    gen = torch.Generator(device=device).manual_seed(0)
    state = {}
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            state[name] = torch.ones(p.shape, dtype=dtype, device=device)
        else:
            t = torch.empty(p.shape, dtype=torch.float32, device=device)
            state[name] = t.normal_(0.0, 0.02, generator=gen).to(dtype)
    return state
