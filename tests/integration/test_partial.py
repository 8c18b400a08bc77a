"""`tideserve serve --mode partial --decode 2` on a real tiny-model cluster: greedy output
equals the offline engine's token for token under 16 concurrent requests, and /cluster shows
each instance's macro instance, prefill-active flag, phase and slack."""

from __future__ import annotations

import concurrent.futures
import json
import time
import urllib.request

import pytest

from tests.factories import make_tiny_model, make_tiny_tokenizer
from tideserve.launcher import ServeProcess

MAX_TOKENS = 48


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("tiny-partial"), vocab_size=259 + 5)
    return make_tiny_tokenizer(path)


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def test_partial_mode_matches_offline_under_16_concurrent(tiny_dir):
    from tideserve import LLM, SamplingParams

    prompts = [f"prompt {i}: " + "words " * (i % 7) for i in range(16)]
    llm = LLM(model=str(tiny_dir), dtype="float32", kv_cache_bytes=1 << 24)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    expected = [o.text for o in llm.generate(prompts, params)]

    srv = ServeProcess(
        "--model", str(tiny_dir), "--mode", "partial", "--decode", "2", "--dtype", "float32",
        "--kv-cache-bytes", str(1 << 24), "--served-model-name", "tiny", "--num-threads", "1",
        "--slo-tpot", "0.1", "--slo-ttft", "1.0",
    )  # fmt: skip
    with srv:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with urllib.request.urlopen(srv.url + "/cluster", timeout=10) as r:
                workers = json.loads(r.read())["workers"]
            if len(workers) == 2:
                break
            time.sleep(0.2)

        def one(p: str) -> str:
            body = {"model": "tiny", "prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0,
                    "ignore_eos": True}  # fmt: skip
            return _post(srv.url + "/v1/completions", body)["choices"][0]["text"]

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            texts = list(pool.map(one, prompts))
        assert texts == expected
        with urllib.request.urlopen(srv.url + "/cluster", timeout=10) as r:
            workers = json.loads(r.read())["workers"]
        assert {w["role"] for w in workers} == {"partial"}
        assert [w["macro_instance"] for w in workers] == [0, 0]  # one macro instance of 2
        assert sum(w["prefill_active"] for w in workers) == 1
        assert all(w["phase"] in ("prefill", "decode") for w in workers)
    assert not srv.leftover_children()
