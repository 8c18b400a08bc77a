"""Migration of a layer range between two served workers (CoCoServe): `tideserve serve --mode
colocated --decode 2 --layer-stages 2`; while 16 concurrent greedy requests run, the admin
endpoint moves worker A's last stage [2, 4) to worker B (B loads only those layers, every live
sequence's KV of them crosses over kv_transfer, then A frees its copy: ownership has switched),
and later moves it back (`unreplicate`: A reloads the layers, the KV comes back). Every request
finishes with the offline engine's tokens, /cluster shows A's layers as [[0, 2]] with B as the
owner of [2, 4) while moved, and neither worker holds a KV block at the end."""

from __future__ import annotations

import concurrent.futures
import time

from tests.integration.test_cluster_replica import _until, _workers
from tests.integration.test_module_worker import _post, tiny_dir  # noqa: F401
from tideserve.launcher import ServeProcess

MAX_TOKENS = 384


def test_migrate_a_stage_to_another_worker_and_back_mid_stream(tiny_dir):  # noqa: F811
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
        full = ws[a]["layers"]
        assert full == [[0, 2], [2, 4]]
        admin = f"{url}/admin/workers/{a}/modules"

        def one(p: str) -> tuple[str, str]:
            body = {"model": "tiny", "prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0,
                    "ignore_eos": True}  # fmt: skip
            choice = _post(url + "/v1/completions", body)[1]["choices"][0]
            return choice["text"], choice["finish_reason"]

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(one, p) for p in prompts]
            _until(url, lambda ws: ws[a]["load"]["running"] >= 4)

            status, _ = _post(admin, {"action": "migrate", "layers": [0, 2], "target": b})
            assert status == 409  # the first stage takes token ids: not across processes
            status, got = _post(admin, {"action": "migrate", "layers": [2, 4], "target": b})
            assert status == 200, got
            ws = _until(url, lambda ws: ws[a]["layers"] == [[0, 2]])  # A freed its copy
            assert not any(f.done() for f in futures)  # it landed mid-stream
            (own,) = ws[a]["replicas"]
            assert (own["layers"], own["host"], own["share"]) == ([2, 4], b, 1.0)
            assert own["seqs"] > 0
            (on_b,) = ws[b]["replicas"]
            assert on_b["for"] == a and on_b["layers"] == [2, 4] and on_b["kv_bytes"] > 0
            assert ws[b]["layers"] == full  # B keeps its own stages
            status, _ = _post(admin, {"action": "migrate", "layers": [2, 4], "target": b})
            assert status == 409  # [2, 4) is no longer A's stage
            time.sleep(1.5)  # steps with [2, 4) of A's batch computed on B

            status, got = _post(admin, {"action": "unreplicate", "layers": [2, 4], "target": b})
            assert status == 200, got  # moves it back
            _until(
                url,
                lambda ws: all(w["layers"] == full and not w["replicas"] for w in ws.values()),
            )
            assert not all(f.done() for f in futures)
            results = [f.result() for f in futures]

        assert [t for t, _ in results] == expected
        assert {r for _, r in results} == {"length"}  # nothing lost or cut short
        ws = _until(url, lambda ws: all(w["load"]["running"] == 0 for w in ws.values()))
        assert [w["kv_blocks_used"] for w in _workers(url).values()] == [0, 0]
    assert not srv.leftover_children()
