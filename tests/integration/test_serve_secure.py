"""`tideserve serve --curve-keys DIR` with an API key, as real processes on a tiny random model.

The workers join the router and hand KV over under CURVE (a completion comes back), the API
key is required, and it reaches the router through the environment, never a command line.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest

from tests.factories import make_tiny_model, make_tiny_tokenizer
from tideserve.launcher import ServeProcess
from tideserve.security import generate_keys

KEY = "sk-tideserve-integration-test"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("tiny-secure"), vocab_size=259 + 5)
    return make_tiny_tokenizer(path)


def request(url: str, body: dict | None = None, key: str | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = None if body is None else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_serve_with_curve_and_api_key(tiny_dir, tmp_path):
    keys = tmp_path / "keys"
    generate_keys(keys)
    srv = ServeProcess(
        "--model",
        str(tiny_dir),
        "--dtype",
        "float32",
        "--kv-cache-bytes",
        str(1 << 24),
        "--served-model-name",
        "tiny",
        "--curve-keys",
        str(keys),
        env={"TIDESERVE_API_KEY": KEY},
    )
    body = {"model": "tiny", "prompt": "hello there", "max_tokens": 4, "ignore_eos": True}
    with srv.start(timeout_s=90):
        assert all(KEY not in " ".join(c.cmdline()) for c in srv.children)
        status, answer = request(srv.url + "/v1/completions", body)
        assert status == 401 and answer["error"]["type"] == "authentication_error"
        status, answer = request(srv.url + "/v1/completions", body, key=KEY)
        assert status == 200, answer
        assert answer["usage"]["completion_tokens"] == 4
        status, cluster = request(srv.url + "/cluster", key=KEY)
        assert sorted(w["role"] for w in cluster["workers"]) == ["decode", "prefill"]
    assert KEY not in srv.output()
    time.sleep(0.3)
    assert not srv.leftover_children()
