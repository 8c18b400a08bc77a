"""SIGKILL the decode worker in the middle of a request's decode, on the real default model
(1 prefill + 2 decode workers, float32): the client's stream goes on from the other decode
worker (the router recomputes the prompt plus the tokens already streamed), no token is
missing or repeated, and the text equals the offline engine's greedy output."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.request

import pytest

from tideserve.launcher import ServeProcess

pytestmark = pytest.mark.slow
openai = pytest.importorskip("openai")

PROMPT = "In 1905, Albert Einstein"
MAX_TOKENS = 96


def _workers(url: str) -> list[dict]:
    with urllib.request.urlopen(url + "/cluster", timeout=10) as r:
        return json.loads(r.read())["workers"]


def test_decode_worker_killed_mid_decode_the_stream_goes_on(tmp_path):
    from tideserve import LLM, SamplingParams

    llm = LLM(dtype="float32", kv_cache_bytes=64 << 20)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    expected = llm.generate([PROMPT], params)[0].text
    del llm

    srv = ServeProcess(
        "--dtype", "float32", "--prefill", "1", "--decode", "2", "--num-threads", "1",
        "--kv-cache-bytes", str(64 << 20), "--heartbeat-timeout", "2",
    )  # fmt: skip
    with srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        model = client.models.list().data[0].id
        pieces: list[str] = []
        errors: list[BaseException] = []

        def consume() -> None:
            try:
                stream = client.completions.create(
                    model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                    stream=True, extra_body={"ignore_eos": True},
                )  # fmt: skip
                for chunk in stream:
                    pieces.append(chunk.choices[0].text)
            except BaseException as e:  # noqa: BLE001 - reported by the main thread
                errors.append(e)

        t = threading.Thread(target=consume)
        t.start()
        victim = None
        deadline = time.monotonic() + 60
        while victim is None and time.monotonic() < deadline and t.is_alive():
            if len(pieces) >= 8:  # mid-decode: tokens are out, more are coming
                busy = [
                    w for w in _workers(srv.url) if w["role"] == "decode" and w["load"]["running"]
                ]
                victim = busy[0] if busy else None
            time.sleep(0.05)
        assert victim is not None, "never caught the decode worker busy"
        n_before = len(pieces)
        os.kill(victim["pid"], signal.SIGKILL)
        t.join(120)
        assert not errors, errors
        assert n_before < MAX_TOKENS  # it really was cut mid-stream
        assert "".join(pieces) == expected
    assert not srv.leftover_children()
