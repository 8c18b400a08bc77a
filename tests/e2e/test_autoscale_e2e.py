"""`tideserve serve --autoscale` on the real default model with the local actuator (colocated
workers at 1 thread, float32): a burst of load drives scale-out, a quiet period drives
scale-in (drained, then stopped), every request completes with the offline engine's greedy
output, none is lost or errored, and no process is left behind."""

from __future__ import annotations

import concurrent.futures
import json
import time
import urllib.request

import pytest

from tideserve.launcher import ServeProcess

pytestmark = pytest.mark.slow
# NOTE: the burst must outlast a new worker's start-up (~4-5 s here) for scale-out to show;
# at 24 tokens the faster engine finished it before the second worker was ready.
MAX_TOKENS = 64
PROMPTS = [f"Write one sentence about the number {i}." for i in range(24)]


def _cluster(srv) -> list[dict]:
    with urllib.request.urlopen(srv.url + "/cluster", timeout=10) as r:
        return json.loads(r.read())["workers"]


def _complete(srv, prompt: str) -> str:
    body = {"model": "m", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True}  # fmt: skip
    req = urllib.request.Request(
        srv.url + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=300) as r:
        out = json.loads(r.read())
    assert out["usage"]["completion_tokens"] == MAX_TOKENS
    return out["choices"][0]["text"]


def test_default_model_burst_scales_out_and_quiet_scales_in():
    from tideserve import LLM, SamplingParams

    llm = LLM(dtype="float32", kv_cache_bytes=64 << 20)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    expected = [o.text for o in llm.generate(PROMPTS, params)]
    del llm

    srv = ServeProcess(
        "--mode", "colocated", "--dtype", "float32", "--kv-cache-bytes", str(64 << 20),
        "--served-model-name", "m", "--threads", "1", "--max-num-seqs", "4",
        "--autoscale", "--policy", "utilization", "--min-decode", "1", "--max-decode", "2",
        "--interval", "1", "--policy-option", "up_cooldown_s=0",
        "--policy-option", "down_stabilization_s=5", "--policy-option", "down_cooldown_s=5",
        log_level="INFO",
    )  # fmt: skip
    with srv:
        seen = set()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(_complete, srv, p) for p in PROMPTS]
            while not all(f.done() for f in futures):
                seen.add(sum(w["state"] == "ready" for w in _cluster(srv)))
                time.sleep(0.2)
            texts = [f.result() for f in futures]
        assert texts == expected
        assert 2 in seen, srv.output()
        deadline = time.monotonic() + 120
        while len(_cluster(srv)) > 1 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert len(_cluster(srv)) == 1, srv.output()
    time.sleep(0.5)
    assert not srv.leftover_children()
    out = srv.output(50_000)
    assert "scale out colocated 1->2" in out and "scale in colocated 2->1" in out
    assert "served its first token: total" in out
