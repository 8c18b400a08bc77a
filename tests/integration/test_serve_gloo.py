"""`tideserve serve --kv-transports gloo` on a real tiny-model cluster (one prefill, one decode
worker): the KV of every request moves through torch.distributed send/recv on CPU, the code
that carries nccl on GPUs. Greedy output equals the offline engine's token for token under 8
concurrent requests, and the router's /metrics and /cluster count every transfer as gloo, none
as tcp or shm."""

from __future__ import annotations

import concurrent.futures
import json
import re
import time
import urllib.request

import pytest

from kv_transfer import dist_available
from tests.factories import make_tiny_model, make_tiny_tokenizer
from tideserve.launcher import ServeProcess

MAX_TOKENS = 16
NUM_REQUESTS = 8

pytestmark = pytest.mark.skipif(not dist_available("gloo"), reason="torch without gloo")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("tiny-gloo"), vocab_size=259 + 5)
    return make_tiny_tokenizer(path)


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read()


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def _kv_transfers(metrics: str) -> dict[str, float]:
    found = re.findall(r'^tideserve_kv_transfers_total\{transport="(\w+)"\} (\S+)$', metrics, re.M)
    return {transport: float(n) for transport, n in found}


def test_disaggregated_over_gloo_matches_offline(tiny_dir):
    from tideserve import LLM, SamplingParams

    prompts = [f"request {i}: " + "more words " * (i % 5) for i in range(NUM_REQUESTS)]
    llm = LLM(model=str(tiny_dir), dtype="float32", kv_cache_bytes=1 << 24)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    expected = [o.text for o in llm.generate(prompts, params)]

    srv = ServeProcess(
        "--model", str(tiny_dir), "--mode", "disaggregated", "--prefill", "1", "--decode", "1",
        "--kv-transports", "gloo", "--dtype", "float32", "--kv-cache-bytes", str(1 << 24),
        "--served-model-name", "tiny", "--num-threads", "1",
    )  # fmt: skip
    with srv:
        deadline = time.monotonic() + 30
        while len(json.loads(_get(srv.url + "/cluster"))["workers"]) < 2:
            assert time.monotonic() < deadline, "the workers did not join"
            time.sleep(0.2)

        def one(prompt: str) -> str:
            body = {"model": "tiny", "prompt": prompt, "max_tokens": MAX_TOKENS,
                    "temperature": 0, "ignore_eos": True}  # fmt: skip
            return _post(srv.url + "/v1/completions", body)["choices"][0]["text"]

        with concurrent.futures.ThreadPoolExecutor(NUM_REQUESTS) as pool:
            texts = list(pool.map(one, prompts))
        assert texts == expected

        assert _kv_transfers(_get(srv.url + "/metrics").decode()) == {"gloo": NUM_REQUESTS}
        assert json.loads(_get(srv.url + "/cluster"))["kv_transfers"] == {"gloo": NUM_REQUESTS}
    time.sleep(0.3)
    assert not srv.leftover_children()
