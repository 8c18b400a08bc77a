"""Shared by the module-elasticity integration tests (test_module_worker, test_cluster_*): a
4-layer tiny model, the offline engine's answers, an elastic `tideserve serve`, and /cluster
polling."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest

from tests.factories import make_tiny_model, make_tiny_tokenizer
from tideserve.launcher import ServeProcess

MAX_TOKENS = 640  # long enough that every change lands while the requests still run
PROMPTS = [f"prompt {i}: " + "words " * (i % 7) for i in range(16)]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = make_tiny_model(
        tmp_path_factory.mktemp("tiny-modules"), vocab_size=259 + 5, num_hidden_layers=4,
        max_position_embeddings=1024,
    )  # fmt: skip
    return make_tiny_tokenizer(path)


def offline_texts(model_dir, prompts: list[str] = PROMPTS) -> list[str]:
    """The offline engine's greedy texts: what every served mode must return."""
    from tideserve import LLM, SamplingParams

    llm = LLM(model=str(model_dir), dtype="float32", kv_cache_bytes=1 << 24)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    return [o.text for o in llm.generate(prompts, params)]


def serve_elastic(model_dir, workers: int) -> ServeProcess:
    """`tideserve serve` with `workers` colocated workers of two layer stages each."""
    return ServeProcess(
        "--model", str(model_dir), "--mode", "colocated", "--decode", str(workers),
        "--dtype", "float32", "--kv-cache-bytes", str(1 << 24), "--served-model-name", "tiny",
        "--num-threads", "1", "--layer-stages", "2",
    )  # fmt: skip


def post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def complete(url: str, prompt: str) -> tuple[str, str]:
    """One greedy completion: (text, finish_reason)."""
    body = {"model": "tiny", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True}  # fmt: skip
    choice = post(url + "/v1/completions", body)[1]["choices"][0]
    return choice["text"], choice["finish_reason"]


def workers(url: str) -> dict[str, dict]:
    with urllib.request.urlopen(url + "/cluster", timeout=10) as r:
        return {w["id"]: w for w in json.loads(r.read())["workers"]}


def until(url: str, check, timeout_s: float = 60.0) -> dict[str, dict]:
    """Polls /cluster until `check(workers by id)` holds; returns them."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ws = workers(url)
        if check(ws):
            return ws
        time.sleep(0.05)
    raise TimeoutError(f"/cluster never showed it; last: {workers(url)}")
