"""The admin API on a real tiny-model cluster (1 prefill, 2 decode workers): a drained worker
gets no new work while the rest serve correctly; a drained, idle worker switches role in place
(same process, weights kept) and serves in its new role; a busy one refuses (409); a batch cap
reaches the worker; /admin/stats reports the traffic."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest

from tests.factories import make_tiny_model, make_tiny_tokenizer
from tideserve.launcher import ServeProcess

PROMPTS = ["hello there", "another prompt", "x y z"]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("tiny-admin"), vocab_size=259 + 5)
    return make_tiny_tokenizer(path)


def _call(url: str, body: dict | None = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _workers(srv) -> dict[str, dict]:
    return {w["id"]: w for w in _call(srv.url + "/cluster")[1]["workers"]}


def _until(cond, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if v := cond():
            return v
        time.sleep(0.1)
    raise TimeoutError("condition never held")


def test_drain_role_switch_and_limits(tiny_dir):
    from tideserve import LLM, SamplingParams

    llm = LLM(model=str(tiny_dir), dtype="float32", kv_cache_bytes=1 << 24)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    expected = [o.text for o in llm.generate(PROMPTS, params)]

    def complete(srv, i: int) -> str:
        body = {"model": "tiny", "prompt": PROMPTS[i], "max_tokens": MAX_TOKENS,
                "temperature": 0, "ignore_eos": True}  # fmt: skip
        status, out = _call(srv.url + "/v1/completions", body)
        assert status == 200, out
        return out["choices"][0]["text"]

    srv = ServeProcess(
        "--model", str(tiny_dir), "--prefill", "1", "--decode", "2", "--dtype", "float32",
        "--kv-cache-bytes", str(1 << 24), "--served-model-name", "tiny", "--num-threads", "1",
    )  # fmt: skip
    with srv:
        _until(lambda: len(_workers(srv)) == 3)
        pid = _workers(srv)["decode-1"]["pid"]
        status, w = _call(srv.url + "/admin/workers/decode-1/drain", {})
        assert status == 200 and w["state"] == "draining"
        assert [complete(srv, i) for i in range(3)] == expected
        assert _call(srv.url + "/admin/stats")[1]["decode_tokens_per_s"] > 0
        # the drained worker was given nothing: its KV blocks were never used
        assert _workers(srv)["decode-1"]["kv_blocks_used"] == 0

        status, err = _call(srv.url + "/admin/workers/decode-2/role", {"role": "prefill"})
        assert status == 409 and "drained" in err["error"]["message"]
        assert _call(srv.url + "/admin/workers/nope/drain", {})[0] == 404
        assert _call(srv.url + "/admin/workers/decode-1/role", {"role": "chef"})[0] == 400

        status, _ = _call(srv.url + "/admin/workers/decode-1/role", {"role": "prefill"})
        assert status == 200
        w = _until(lambda: (w := _workers(srv)["decode-1"])["role"] == "prefill" and w)
        assert w["pid"] == pid and w["state"] == "ready"  # the same process, serving again
        _call(srv.url + "/admin/workers/prefill-0/drain", {})  # only the switched one prefills
        assert [complete(srv, i) for i in range(3)] == expected

        assert _call(srv.url + "/admin/workers/decode-2/limits", {"max_num_seqs": 2})[0] == 200
        _until(lambda: _workers(srv)["decode-2"]["max_num_seqs"] == 2)
        assert _call(srv.url + "/admin/workers/decode-2/limits", {"max_num_seqs": 0})[0] == 400
        assert [complete(srv, i) for i in range(3)] == expected
    time.sleep(0.3)
    assert not srv.leftover_children()
