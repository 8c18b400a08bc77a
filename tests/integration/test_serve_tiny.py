"""`tideserve serve` as real processes on a tiny random model: fast, in the default suite.

Greedy output through the router equals the offline engine's tokens in both modes (the
disaggregated one moves each prompt's KV from the prefill to the decode worker over shm), and
stopping the server leaves no process behind.
"""

from __future__ import annotations

import time

import pytest

from tests.factories import make_tiny_model, make_tiny_tokenizer
from tests.integration.elastic import post
from tideserve.launcher import ServeProcess


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("tiny-serve"), vocab_size=259 + 5)
    return make_tiny_tokenizer(path)


@pytest.mark.parametrize("mode", ["disaggregated", "colocated"])
def test_serve_tiny_model_matches_offline(tiny_dir, mode):
    from tideserve import LLM, SamplingParams

    llm = LLM(model=str(tiny_dir), dtype="float32", kv_cache_bytes=1 << 24)
    prompts = ["hello there", "a much longer prompt " * 6, "x"]
    expected = [
        o.token_ids
        for o in llm.generate(
            prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
        )
    ]

    srv = ServeProcess(
        "--model",
        str(tiny_dir),
        "--mode",
        mode,
        "--dtype",
        "float32",
        "--kv-cache-bytes",
        str(1 << 24),
        "--served-model-name",
        "tiny",
    )
    with srv:
        for prompt, ids in zip(prompts, expected):
            status, body = post(
                srv.url + "/v1/completions",
                {
                    "model": "tiny",
                    "prompt": prompt,
                    "max_tokens": 12,
                    "temperature": 0,
                    "ignore_eos": True,
                },
            )
            assert status == 200, body
            assert body["choices"][0]["text"] == llm.tokenizer.decode(ids), prompt
            assert body["usage"]["completion_tokens"] == 12
    time.sleep(0.3)
    assert not srv.leftover_children()
