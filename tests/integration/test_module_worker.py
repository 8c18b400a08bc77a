"""`tideserve serve --mode colocated --layer-stages 2` on a real tiny-model cluster: while 16
concurrent greedy requests run, the router's admin endpoint replicates a stage, takes the replica
away and migrates a layer; every request finishes with the offline engine's tokens, and
/cluster shows the worker's layer ranges and the replica while it is on."""

from __future__ import annotations

import concurrent.futures
import json
import time
import urllib.error
import urllib.request

import pytest

from tests.factories import make_tiny_model, make_tiny_tokenizer
from tideserve.launcher import ServeProcess

MAX_TOKENS = 384  # long enough that the three changes land while every request still runs


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = make_tiny_model(
        tmp_path_factory.mktemp("tiny-modules"), vocab_size=259 + 5, num_hidden_layers=4,
        max_position_embeddings=1024,
    )  # fmt: skip
    return make_tiny_tokenizer(path)


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _worker(url: str) -> dict:
    with urllib.request.urlopen(url + "/cluster", timeout=10) as r:
        workers = json.loads(r.read())["workers"]
    assert len(workers) <= 1
    return workers[0] if workers else {}


def _until(url: str, check, timeout_s: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        w = _worker(url)
        if w and check(w):
            return w
        time.sleep(0.05)
    raise TimeoutError(f"/cluster never showed it; last: {_worker(url)}")


def test_replicate_unreplicate_migrate_mid_stream_match_offline(tiny_dir):
    from tideserve import LLM, SamplingParams

    prompts = [f"prompt {i}: " + "words " * (i % 7) for i in range(16)]
    llm = LLM(model=str(tiny_dir), dtype="float32", kv_cache_bytes=1 << 24)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    expected = [o.text for o in llm.generate(prompts, params)]

    srv = ServeProcess(
        "--model", str(tiny_dir), "--mode", "colocated", "--decode", "1", "--dtype", "float32",
        "--kv-cache-bytes", str(1 << 24), "--served-model-name", "tiny", "--num-threads", "1",
        "--layer-stages", "2",
    )  # fmt: skip
    with srv:
        url = srv.url
        w = _until(url, lambda w: w["layers"])
        assert w["layers"] == [[0, 2], [2, 4]] and w["replicas"] == []
        admin = f"{url}/admin/workers/{w['id']}/modules"

        def one(p: str) -> tuple[str, str]:
            body = {"model": "tiny", "prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0,
                    "ignore_eos": True}  # fmt: skip
            choice = _post(url + "/v1/completions", body)[1]["choices"][0]
            return choice["text"], choice["finish_reason"]

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(one, p) for p in prompts]
            _until(url, lambda w: w["load"]["running"] >= 8)

            status, body = _post(admin, {"action": "replicate", "layers": [2, 4], "share": 0.5})
            assert status == 200, body
            w = _until(url, lambda w: w["replicas"])
            assert w["replicas"][0]["layers"] == [2, 4] and w["replicas"][0]["host"] == w["id"]
            assert w["replicas"][0]["seqs"] > 0  # live sequences moved to it, KV and all
            assert not any(f.done() for f in futures)  # it landed mid-stream

            status, body = _post(admin, {"action": "unreplicate", "layers": [2, 4]})
            assert status == 200, body
            _until(url, lambda w: not w["replicas"])

            status, body = _post(admin, {"action": "migrate", "layers": [1, 2]})
            assert status == 200, body
            _until(url, lambda w: w["layers"] == [[0, 1], [1, 4]])
            assert not all(f.done() for f in futures)

            status, body = _post(admin, {"action": "migrate", "layers": [2, 3]})
            assert status == 409  # not at an inner edge of [0, 1) or [1, 4)
            results = [f.result() for f in futures]

        assert [t for t, _ in results] == expected
        assert {r for _, r in results} == {"length"}  # nothing lost or cut short
        w = _until(url, lambda w: w["load"]["running"] == 0)
        assert w["kv_blocks_used"] == 0  # no leaked block
        assert w["layers"] == [[0, 1], [1, 4]] and w["replicas"] == []
    assert not srv.leftover_children()
