"""The real default model, prepared into the user's cache, loads as an HF tokenizer and model."""

from __future__ import annotations

import pytest

from tideserve.engine.default_model import is_prepared, prepare_default_model

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def model_dir():
    path = prepare_default_model(progress=False)
    assert is_prepared(path)
    return path


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return transformers.AutoTokenizer.from_pretrained(model_dir)


@pytest.mark.parametrize(
    "text",
    ["12345", "  two  spaces\n\tand a tab", "héllo 世界", "<|im_start|>user\nhi<|im_end|>"],
)
def test_tokenizer_round_trips(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text


def test_digits_and_special_tokens_are_single_ids(tokenizer):
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("12345")) == list("12345")
    ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>") == 1
    assert ids[-1] == tokenizer.eos_token_id == 2


def test_chat_template_renders(tokenizer):
    prompt = tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\n")
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


def test_greedy_answer_is_coherent(model_dir, tokenizer):
    torch = pytest.importorskip("torch")
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    prompt = tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
