"""Replication onto another worker of a served cluster (CoCoServe across workers): `tideserve
serve --mode colocated --decode 2 --layer-stages 2`; while 16 concurrent greedy requests run,
the admin endpoint replicates worker A's last stage [2, 4) onto worker B (the router passes A's
HostReplica to B, B serves the replica on a thread, A attaches it between steps, the offloaded
sequences' KV of [2, 4) crosses over), then takes it away (the KV comes back). Every request
finishes with the offline engine's tokens, /cluster shows the replica on both workers while it
is on, and neither worker holds a KV block at the end."""

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
)


def test_replicate_onto_another_worker_mid_stream_matches_offline(tiny_dir):  # noqa: F811
    prompts = PROMPTS
    expected = offline_texts(tiny_dir)

    srv = serve_elastic(tiny_dir, 2)
    with srv:
        url = srv.url
        ws = until(url, lambda ws: len(ws) == 2 and all(w["layers"] for w in ws.values()))
        a, b = sorted(ws)
        admin = f"{url}/admin/workers/{a}/modules"

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(complete, url, p) for p in prompts]
            until(url, lambda ws: ws[a]["load"]["running"] >= 4)

            status, body = post(admin, {"action": "replicate", "layers": [0, 2], "target": b})
            assert status == 409  # the first stage takes token ids: not across processes
            body = {"action": "replicate", "layers": [2, 4], "share": 0.5, "target": b}
            status, got = post(admin, body)
            assert status == 200, got
            ws = until(  # B reports the replica's KV once it has loaded
                url, lambda ws: ws[a]["replicas"] and any(r["kv_bytes"] for r in ws[b]["replicas"])
            )
            (on_a,) = ws[a]["replicas"]
            assert on_a["layers"] == [2, 4] and on_a["host"] == b and on_a["seqs"] > 0
            (on_b,) = ws[b]["replicas"]
            assert on_b["for"] == a and on_b["host"] == b and on_b["layers"] == [2, 4]
            assert on_b["kv_bytes"] > 0
            assert not any(f.done() for f in futures)  # it landed mid-stream
            time.sleep(0.5)  # some steps with the replica computing part of A's batch

            status, got = post(admin, {"action": "unreplicate", "layers": [2, 4], "target": b})
            assert status == 200, got
            until(url, lambda ws: not ws[a]["replicas"] and not ws[b]["replicas"])
            assert not all(f.done() for f in futures)
            results = [f.result() for f in futures]

        assert [t for t, _ in results] == expected
        assert {r for _, r in results} == {"length"}  # nothing lost or cut short
        ws = until(url, lambda ws: all(w["load"]["running"] == 0 for w in ws.values()))
        assert [w["kv_blocks_used"] for w in ws.values()] == [0, 0]  # no leaked block
    assert not srv.leftover_children()
