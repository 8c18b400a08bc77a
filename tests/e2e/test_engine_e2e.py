"""The engine on the real default model: batch invariance and KV export/import (float32)."""

from __future__ import annotations

import random

import pytest

from tests.factories import run_engine as run
from tideserve import LLM, SamplingParams
from tideserve.config import EngineConfig
from tideserve.engine.engine import LLMEngine

pytestmark = pytest.mark.slow
GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32", kv_cache_bytes=512 << 20)  # model=None: the embedded default


def mixed_prompts(llm, n: int = 16) -> list[list[int]]:
    rng = random.Random(0)
    words = "the a river mountain code light seven quickly blue engine sings under".split()
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(2, 120))) for _ in range(n)]
    return [llm.encode(t) for t in texts]


def test_default_model_answers(llm):
    chat = llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}]
    )
    out = llm.generate(chat, SamplingParams(max_tokens=16, temperature=0.0))[0]
    assert "Paris" in out.text and out.finish_reason == "stop"


def test_batch_of_16_with_chunked_prefill_equals_alone(llm):
    prompts = mixed_prompts(llm)
    params = SamplingParams(max_tokens=24, **GREEDY)
    alone = [llm.generate([p], params)[0].token_ids for p in prompts]
    path = str(llm.engine.model_path)
    batched = LLMEngine.from_config(
        EngineConfig(
            model=path, dtype="float32", kv_cache_bytes=512 << 20, max_num_batched_tokens=64
        )
    )
    for i, p in enumerate(prompts):
        batched.add_request(str(i), p, params)
    got = run(batched)
    assert [got[str(i)] for i in range(len(prompts))] == alone
    assert batched.num_free_blocks == batched.num_total_blocks


def test_kv_export_import_continues_like_uninterrupted(llm):
    prompt = mixed_prompts(llm, 1)[0]
    expected = llm.generate([prompt], SamplingParams(max_tokens=40, **GREEDY))[0].token_ids
    cfg = EngineConfig(model=str(llm.engine.model_path), dtype="float32", kv_cache_bytes=256 << 20)
    src, dst = LLMEngine.from_config(cfg), LLMEngine.from_config(cfg)
    src.add_request("m", prompt, SamplingParams(max_tokens=10, **GREEDY), hold_kv=True)
    head = run(src)["m"]
    n = src.kv_num_tokens("m")
    assert dst.begin_import("m", prompt, head, n, SamplingParams(max_tokens=40, **GREEDY))
    for layer in range(src.model_config.num_layers):
        dst.import_kv_layer("m", layer, src.export_kv_layer("m", layer))
    src.release("m")
    dst.finish_import("m")
    assert run(dst)["m"] == expected
    assert src.num_free_blocks == src.num_total_blocks
    assert dst.num_free_blocks == dst.num_total_blocks
