"""The default model's tokenizer against transformers' AutoTokenizer on the same folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tideserve.engine.tokenizer import IncrementalDetokenizer, Tokenizer

pytestmark = pytest.mark.slow

TEXTS = [
    "Hello, world!",
    "The year 2024 had 366 days; 3.14159 is pi and 1,000,000 is a million.",
    "  indented\n\tcode: def f(x): return x ** 2  # comment\n",
    "Café, naïve, résumé — déjà vu. Ünïcödé!",
    "日本語のテキスト、中文文本和한국어 텍스트.",
    "Emoji 🎉🚀👍🏽🤖 and math ∑ x² ≤ π ≈ 3.14",
    "<|im_start|>user\nInline special tokens<|im_end|>\n",
    "",
    "     ",
    "URLs like https://example.com/a?b=c&d=e#frag and e-mails: a.b@c.org",
]
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Colour of the sky?"},
    ],
    [
        {"role": "user", "content": "Hi 👋"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Count to 10: 1 2 3..."},
    ],
    [{"role": "user", "content": "日本語で答えてください。"}],
    [{"role": "user", "content": "  leading and trailing spaces  \n\n"}],
]


@pytest.fixture(scope="module")
def model_dir() -> Path:
    home = Path(os.environ.get("TIDESERVE_HOME") or Path.home() / ".cache" / "tideserve")
    folder = home / "models" / "SmolLM2-135M-Instruct"
    if not (folder / "tokenizer.json").is_file():
        pytest.skip(f"default model not prepared at {folder}")
    return folder


@pytest.fixture(scope="module")
def both(model_dir):
    transformers = pytest.importorskip("transformers")
    return Tokenizer.from_dir(model_dir), transformers.AutoTokenizer.from_pretrained(str(model_dir))


def test_encode_and_decode_match_hf(both):
    tok, hf = both
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf(text)["input_ids"], text
        assert (
            tok.encode(text, add_special_tokens=False)
            == hf(text, add_special_tokens=False)["input_ids"]
        ), text
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True), text
        assert tok.decode(ids, skip_special_tokens=False) == hf.decode(ids), text


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_hf(both, add_generation_prompt):
    tok, hf = both
    for messages in CONVERSATIONS:
        text = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        assert text == hf.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False
        )
        ids = tok.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=True
        )
        assert ids == hf(text, add_special_tokens=False)["input_ids"]


def test_special_ids_and_streaming(both):
    tok, hf = both
    assert tok.eos_token_ids == {hf.eos_token_id} == {2}
    assert tok.bos_token_id == hf.bos_token_id
    assert tok.vocab_size == len(hf)
    ids = tok.encode("".join(TEXTS), add_special_tokens=False)
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(deltas) == tok.decode(ids)
    assert not any("\ufffd" in d for d in deltas)
