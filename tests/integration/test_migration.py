"""Live migration between real worker processes (`tideserve serve --mode colocated --decode
2`, a small random model slow enough to catch requests mid-generation): 16 concurrent
streams, some migrated once and some twice (there and back) mid-generation through
POST /admin/migrate, all equal the offline engine's greedy output token for token, nothing
lost or duplicated; then a worker drained with {"migrate": true} empties while its requests
go on elsewhere; and no KV block is left held."""

from __future__ import annotations

import concurrent.futures
import json
import time
import urllib.error
import urllib.request

import pytest

from tests.factories import make_tiny_model, make_tiny_tokenizer
from tideserve.launcher import ServeProcess

MAX_TOKENS = 400
N = 16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = make_tiny_model(
        tmp_path_factory.mktemp("mig-model"), vocab_size=259 + 5, hidden_size=256,
        intermediate_size=768, num_hidden_layers=6, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=1024,
    )  # fmt: skip
    return make_tiny_tokenizer(path)


def _call(url: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _complete(url: str, prompt: str) -> str:
    body = {"model": "m", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True, "stream": True}  # fmt: skip
    req = urllib.request.Request(
        url + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    text = []
    with urllib.request.urlopen(req, timeout=300) as r:
        for line in r:
            line = line.decode().strip()
            if line.startswith("data: {"):
                ev = json.loads(line[6:])
                assert "error" not in ev, ev
                text.append(ev["choices"][0]["text"])
    return "".join(text)


def test_migrations_under_load_lose_and_duplicate_nothing(model_dir):
    from tideserve import LLM, SamplingParams

    prompts = [f"stream {i}: once upon a time" for i in range(N)]
    llm = LLM(model=str(model_dir), dtype="float32", kv_cache_bytes=64 << 20)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    expected = [o.text for o in llm.generate(prompts, params)]
    del llm

    srv = ServeProcess(
        "--model", str(model_dir), "--mode", "colocated", "--decode", "2", "--dtype", "float32",
        "--kv-cache-bytes", str(64 << 20), "--served-model-name", "m", "--num-threads", "1",
    )  # fmt: skip
    with srv:
        url = srv.url
        deadline = time.monotonic() + 60
        while len(_call(url + "/cluster")[1]["workers"]) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        ws = sorted(w["id"] for w in _call(url + "/cluster")[1]["workers"])
        moved: dict[str, int] = {}  # request id -> times migrated
        with concurrent.futures.ThreadPoolExecutor(N) as pool:
            futures = [pool.submit(_complete, url, p) for p in prompts]
            deadline = time.monotonic() + 120
            while not all(f.done() for f in futures) and time.monotonic() < deadline:
                for r in _call(url + "/admin/requests")[1]["requests"]:
                    rid, n = r["request_id"], moved.get(r["request_id"], 0)
                    want = 2 if int(rid[-1], 16) % 2 else 1  # half of them twice
                    step = 40 * (n + 1)  # the first move after 40 tokens, the next after 80
                    if r["migrating_to"] or n >= want or r["tokens_out"] < step:
                        continue
                    other = ws[1] if r["worker"] == ws[0] else ws[0]
                    status, body = _call(
                        url + "/admin/migrate", {"request_id": rid, "to_worker": other}
                    )
                    if status == 200:
                        moved[rid] = n + 1
                time.sleep(0.05)
            texts = [f.result(timeout=60) for f in futures]
        assert texts == expected  # token for token, across every move
        cluster = _call(url + "/cluster")[1]
        assert cluster["migrations"]["done"] >= 4 and 2 in moved.values(), (moved, cluster)

        # scale-in by migration: drain one worker while its requests still run; they move
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(_complete, url, p) for p in prompts[:4]]
            deadline = time.monotonic() + 30
            busy = {"requests": 0}
            while busy["requests"] == 0 and time.monotonic() < deadline:
                busy = max(_call(url + "/cluster")[1]["workers"], key=lambda w: w["requests"])
            before = _call(url + "/cluster")[1]["migrations"]["done"]
            _call(url + f"/admin/workers/{busy['id']}/drain", {"migrate": True})
            while time.monotonic() < deadline:
                w = next(w for w in _call(url + "/cluster")[1]["workers"] if w["id"] == busy["id"])
                if w["requests"] == 0:
                    break
                time.sleep(0.1)
            texts = [f.result(timeout=120) for f in futures]
        after = _call(url + "/cluster")[1]["migrations"]["done"]
        assert w["requests"] == 0 and after > before, (before, after)  # moved, not waited for
        assert texts == expected[:4]
        time.sleep(1.0)
        for w in _call(url + "/cluster")[1]["workers"]:
            assert w["kv_blocks_used"] == 0, w
    assert not srv.leftover_children()
