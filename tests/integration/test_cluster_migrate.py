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

from tests.integration.elastic import (  # noqa: F401 (tiny_dir: a fixture)
    PROMPTS,
    complete,
    offline_texts,
    post,
    serve_elastic,
    tiny_dir,
    until,
    workers,
)


def test_migrate_a_stage_to_another_worker_and_back_mid_stream(tiny_dir):  # noqa: F811
    prompts = PROMPTS
    expected = offline_texts(tiny_dir)

    srv = serve_elastic(tiny_dir, 2)
    with srv:
        url = srv.url
        ws = until(url, lambda ws: len(ws) == 2 and all(w["layers"] for w in ws.values()))
        a, b = sorted(ws)
        full = ws[a]["layers"]
        assert full == [[0, 2], [2, 4]]
        admin = f"{url}/admin/workers/{a}/modules"

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(complete, url, p) for p in prompts]
            until(url, lambda ws: ws[a]["load"]["running"] >= 4)

            status, _ = post(admin, {"action": "migrate", "layers": [0, 2], "target": b})
            assert status == 409  # the first stage takes token ids: not across processes
            status, got = post(admin, {"action": "migrate", "layers": [2, 4], "target": b})
            assert status == 200, got
            ws = until(  # A freed its copy; B's next heartbeat reports the loaded replica
                url,
                lambda ws: (
                    ws[a]["layers"] == [[0, 2]]
                    and any(r.get("kv_bytes", 0) > 0 for r in ws[b]["replicas"])
                ),
            )
            assert not any(f.done() for f in futures)  # it landed mid-stream
            (own,) = ws[a]["replicas"]
            assert (own["layers"], own["host"], own["share"]) == ([2, 4], b, 1.0)
            assert own["seqs"] > 0
            (on_b,) = ws[b]["replicas"]
            assert on_b["for"] == a and on_b["layers"] == [2, 4] and on_b["kv_bytes"] > 0
            assert ws[b]["layers"] == full  # B keeps its own stages
            status, _ = post(admin, {"action": "migrate", "layers": [2, 4], "target": b})
            assert status == 409  # [2, 4) is no longer A's stage
            time.sleep(0.5)  # steps with [2, 4) of A's batch computed on B

            status, got = post(admin, {"action": "unreplicate", "layers": [2, 4], "target": b})
            assert status == 200, got  # moves it back
            until(
                url,
                lambda ws: all(w["layers"] == full and not w["replicas"] for w in ws.values()),
            )
            assert not all(f.done() for f in futures)
            results = [f.result() for f in futures]

        assert [t for t, _ in results] == expected
        assert {r for _, r in results} == {"length"}  # nothing lost or cut short
        ws = until(url, lambda ws: all(w["load"]["running"] == 0 for w in ws.values()))
        assert [w["kv_blocks_used"] for w in workers(url).values()] == [0, 0]
    assert not srv.leftover_children()
