"""Replication onto another worker of a served cluster (CoCoServe across workers): `tideserve
serve --mode colocated --decode 2 --layer-stages 2`; while 16 concurrent greedy requests run,
the admin endpoint replicates worker A's last stage [2, 4) onto worker B (the router passes A's
HostReplica to B, B serves the replica on a thread, A attaches it between steps, the offloaded
sequences' KV of [2, 4) crosses over), then takes it away (the KV comes back). Every request
finishes with the offline engine's tokens, /cluster shows the replica on both workers while it
is on, and neither worker holds a KV block at the end."""

from __future__ import annotations

import concurrent.futures
import json
import time
import urllib.request

from tests.integration.test_module_worker import _post, tiny_dir  # noqa: F401
from tideserve.launcher import ServeProcess

MAX_TOKENS = 384  # long enough that both changes land while the requests still run


def _workers(url: str) -> dict[str, dict]:
    with urllib.request.urlopen(url + "/cluster", timeout=10) as r:
        return {w["id"]: w for w in json.loads(r.read())["workers"]}


def _until(url: str, check, timeout_s: float = 60.0) -> dict[str, dict]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ws = _workers(url)
        if check(ws):
            return ws
        time.sleep(0.05)
    raise TimeoutError(f"/cluster never showed it; last: {_workers(url)}")


def test_replicate_onto_another_worker_mid_stream_matches_offline(tiny_dir):  # noqa: F811
    from tideserve import LLM, SamplingParams

    prompts = [f"prompt {i}: " + "words " * (i % 7) for i in range(16)]
    llm = LLM(model=str(tiny_dir), dtype="float32", kv_cache_bytes=1 << 24)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    expected = [o.text for o in llm.generate(prompts, params)]

    srv = ServeProcess(
        "--model", str(tiny_dir), "--mode", "colocated", "--decode", "2", "--dtype", "float32",
        "--kv-cache-bytes", str(1 << 24), "--served-model-name", "tiny", "--num-threads", "1",
        "--layer-stages", "2",
    )  # fmt: skip
    with srv:
        url = srv.url
        ws = _until(url, lambda ws: len(ws) == 2 and all(w["layers"] for w in ws.values()))
        a, b = sorted(ws)
        admin = f"{url}/admin/workers/{a}/modules"

        def one(p: str) -> tuple[str, str]:
            body = {"model": "tiny", "prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0,
                    "ignore_eos": True}  # fmt: skip
            choice = _post(url + "/v1/completions", body)[1]["choices"][0]
            return choice["text"], choice["finish_reason"]

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(one, p) for p in prompts]
            _until(url, lambda ws: ws[a]["load"]["running"] >= 4)

            status, body = _post(admin, {"action": "replicate", "layers": [0, 2], "target": b})
            assert status == 409  # the first stage takes token ids: not across processes
            body = {"action": "replicate", "layers": [2, 4], "share": 0.5, "target": b}
            status, got = _post(admin, body)
            assert status == 200, got
            ws = _until(  # B reports the replica's KV once it has loaded
                url, lambda ws: ws[a]["replicas"] and any(r["kv_bytes"] for r in ws[b]["replicas"])
            )
            (on_a,) = ws[a]["replicas"]
            assert on_a["layers"] == [2, 4] and on_a["host"] == b and on_a["seqs"] > 0
            (on_b,) = ws[b]["replicas"]
            assert on_b["for"] == a and on_b["host"] == b and on_b["layers"] == [2, 4]
            assert on_b["kv_bytes"] > 0
            assert not any(f.done() for f in futures)  # it landed mid-stream
            time.sleep(1.0)  # some steps with the replica computing part of A's batch

            status, got = _post(admin, {"action": "unreplicate", "layers": [2, 4], "target": b})
            assert status == 200, got
            _until(url, lambda ws: not ws[a]["replicas"] and not ws[b]["replicas"])
            assert not all(f.done() for f in futures)
            results = [f.result() for f in futures]

        assert [t for t, _ in results] == expected
        assert {r for _, r in results} == {"length"}  # nothing lost or cut short
        ws = _until(url, lambda ws: all(w["load"]["running"] == 0 for w in ws.values()))
        assert [w["kv_blocks_used"] for w in ws.values()] == [0, 0]  # no leaked block
    assert not srv.leftover_children()
