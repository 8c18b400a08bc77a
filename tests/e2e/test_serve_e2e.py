"""`tideserve serve` end to end on the real default model, through the official openai client.

Both modes (disaggregated: router + prefill + decode; colocated: router + one worker) must give
the offline engine's greedy output token for token (float32), stream and not, for completions
and chat; survive bad input with clear 4xx JSON; free KV on both workers when a client goes
away mid-stream; and leave no process behind.
"""

from __future__ import annotations

import concurrent.futures
import json
import signal
import time
import urllib.error
import urllib.request

import pytest

from tideserve.launcher import ServeProcess

pytestmark = pytest.mark.slow
openai = pytest.importorskip("openai")

MODEL = "SmolLM2-135M-Instruct"
PROMPTS = [
    "The capital of France is",
    "def add(a, b):\n   ",
    "List three colors:",
    "In 1905, Albert Einstein",
]


def _get(url: str, timeout: float = 5.0):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def _post(url: str, body: bytes, headers=None):
    req = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def offline():
    from tideserve import LLM

    return LLM(dtype="float32", kv_cache_bytes=256 << 20)


def greedy_text(offline, prompt, max_tokens: int) -> tuple[str, list[int]]:
    from tideserve import SamplingParams

    out = offline.generate([prompt], SamplingParams(max_tokens=max_tokens, temperature=0.0))[0]
    return out.text, out.token_ids


def Server(mode: str) -> ServeProcess:
    return ServeProcess(
        "--mode",
        mode,
        "--dtype",
        "float32",
        "--kv-cache-bytes",
        str(128 << 20),
        "--max-num-batched-tokens",
        "512",
    )


@pytest.fixture(scope="module", params=["disaggregated", "colocated"])
def server(request):
    srv = Server(request.param)
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()
    time.sleep(0.5)
    assert not srv.leftover_children(), "child processes left running"


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", timeout=120, max_retries=0)


def test_models_and_health(server):
    status, body = _get(server.url + "/v1/models")
    assert status == 200 and body["data"][0]["id"] == MODEL
    assert _get(server.url + "/health")[0] == 200
    status, body = _get(server.url + "/cluster")
    roles = sorted(w["role"] for w in body["workers"])
    assert roles in (["decode", "prefill"], ["colocated"])
    assert all(w["state"] == "ready" for w in body["workers"])


def test_completions_match_offline_engine(server, client, offline):
    for prompt in PROMPTS:
        text, ids = greedy_text(offline, prompt, 24)
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
        assert r.choices[0].text == text, prompt
        assert r.usage.completion_tokens == len(ids)
        chunks = client.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        parts, usage = [], None
        for c in chunks:
            if c.choices:
                parts.append(c.choices[0].text)
            if c.usage:
                usage = c.usage
        assert "".join(parts) == text
        assert usage.completion_tokens == len(ids) and usage.prompt_tokens == len(
            offline.encode(prompt)
        )


def test_token_id_prompt_and_chat(server, client, offline):
    ids = offline.encode("Once upon a time")
    text, _ = greedy_text(offline, ids, 16)
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=16, temperature=0)
    assert r.choices[0].text == text

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat_ids = offline.tokenizer.apply_chat_template(messages, tokenize=True)
    text, _ = greedy_text(offline, chat_ids, 32)
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=32, temperature=0)
    assert r.choices[0].message.content == text and "Paris" in text
    assert r.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=32, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text


def test_16_concurrent_streams(server, client, offline):
    prompts = [f"Question {i}: what is {i} plus {i}? Answer:" for i in range(16)]
    expected = [greedy_text(offline, p, 20)[0] for p in prompts]

    def one(p: str) -> str:
        s = client.completions.create(
            model=MODEL, prompt=p, max_tokens=20, temperature=0, stream=True
        )
        return "".join(c.choices[0].text for c in s if c.choices)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        got = list(pool.map(one, prompts))
    assert got == expected


def test_stop_strings_and_params(server, client):
    r = client.completions.create(
        model=MODEL, prompt="1, 2, 3, 4,", max_tokens=30, temperature=0, stop=[" 7"]
    )
    assert " 7" not in r.choices[0].text and r.choices[0].finish_reason == "stop"
    r = client.completions.create(
        model=MODEL,
        prompt="Hello",
        max_tokens=5,
        temperature=0.8,
        top_p=0.9,
        seed=7,
        extra_body={"ignore_eos": True, "min_tokens": 5},
    )
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"


def test_bad_input_gets_clear_4xx_and_server_keeps_serving(server, client):
    url = server.url + "/v1/completions"
    cases = [
        (b"{not json", 400),
        (json.dumps({"model": MODEL, "prompt": 5}).encode(), 400),
        (json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": -1}).encode(), 400),
        (json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": "ten"}).encode(), 400),
        (json.dumps({"model": MODEL, "prompt": "hi", "n": 2}).encode(), 400),
        (json.dumps({"model": "gpt-9", "prompt": "hi"}).encode(), 404),
        (json.dumps({"model": MODEL, "prompt": "word " * 9000}).encode(), 400),
        (json.dumps({"model": MODEL, "prompt": "x" * (5 << 20)}).encode(), 413),
    ]
    for body, status in cases:
        got, payload = _post(url, body)
        assert got == status, (body[:60], payload)
        assert payload["error"]["message"], payload
    status, payload = _post(
        server.url + "/v1/chat/completions", json.dumps({"model": MODEL}).encode()
    )
    assert status == 400 and "messages" in payload["error"]["message"]
    r = client.completions.create(model=MODEL, prompt="Still alive?", max_tokens=4, temperature=0)
    assert r.usage.completion_tokens == 4


def test_client_disconnect_frees_kv_on_every_worker(server):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    body = json.dumps(
        {
            "model": MODEL,
            "prompt": "Tell me a long story about the sea.",
            "max_tokens": 400,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
    )
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    for _ in range(5):
        resp.fp.readline()
    used = _kv_used(server)
    assert any(used.values()), used  # the request holds blocks somewhere
    conn.sock.shutdown(2)
    conn.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_kv_used(server).values()):
        time.sleep(0.25)
    assert not any(_kv_used(server).values()), _kv_used(server)


def _kv_used(server) -> dict[str, int]:
    time.sleep(0.6)  # one heartbeat
    return {w["id"]: w["kv_blocks_used"] for w in _get(server.url + "/cluster")[1]["workers"]}


def test_metrics_exposed(server, client):
    client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, temperature=0)
    with urllib.request.urlopen(server.url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    for name in (
        "tideserve_ttft_seconds",
        "tideserve_e2e_seconds",
        "tideserve_requests_total",
        "tideserve_worker_kv_blocks_total",
        "tideserve_requests_inflight",
    ):
        assert name in text, name


def test_no_orphans_after_sigterm():
    srv = Server("disaggregated")
    try:
        srv.start()
        assert len(srv.children) >= 3
        srv.proc.send_signal(signal.SIGTERM)
        srv.proc.wait(30)
    finally:
        srv.stop()
    time.sleep(0.5)
    assert not srv.leftover_children()
