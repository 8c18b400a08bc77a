"""`tideserve serve` as real processes on a tiny random model: fast, in the default suite.

Greedy output through the router equals the offline engine's tokens in both modes, and a
KV transfer over each transport (shm between local workers, tcp when forced) lands intact.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import psutil
import pytest

from tests.factories import make_tiny_model, make_tiny_tokenizer
from tideserve.launcher import free_port


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("tiny-serve"), vocab_size=259 + 5)
    return make_tiny_tokenizer(path)


def post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


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

    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "tideserve.cli",
        "serve",
        "--model",
        str(tiny_dir),
        "--mode",
        mode,
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--kv-cache-bytes",
        str(1 << 24),
        "--served-model-name",
        "tiny",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    children = []
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "not ready in 120 s"
            try:
                with urllib.request.urlopen(url + "/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.3)
        children = psutil.Process(proc.pid).children(recursive=True)
        for prompt, ids in zip(prompts, expected):
            status, body = post(
                url + "/v1/completions",
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
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    time.sleep(0.3)
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
