"""Parameter dropping across two served workers (KunServe): `tideserve serve --mode colocated
--decode 2 --layer-stages 2`; while 16 concurrent greedy requests run, the admin endpoint drops
half the layers on each worker (A keeps [0, 2), B keeps [2, 4); each runs its dropped half as a
replica with share 1.0 on the partner, over the partner's own weights, the running sequences' KV
of the dropped layers moved there) and later restores them (weights reloaded, KV back). Every
request finishes with the offline engine's tokens, /cluster shows the halved ranges while
dropped, and neither worker holds a KV block at the end."""

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


def test_drop_then_restore_mid_stream_matches_offline(tiny_dir):  # noqa: F811
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

        assert post(admin, {"action": "drop"})[0] == 400  # no partner
        assert post(admin, {"action": "drop", "target": a})[0] == 400  # itself
        assert post(admin, {"action": "restore", "target": b})[0] == 409  # nothing dropped
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(complete, url, p) for p in prompts]
            until(url, lambda ws: all(w["load"]["running"] >= 2 for w in ws.values()))

            status, got = post(admin, {"action": "drop", "target": b})
            assert status == 200, got
            ws = until(url, lambda ws: ws[a]["layers"] == [[0, 2]] and ws[b]["layers"] == [[2, 4]])
            assert not any(f.done() for f in futures)  # it landed mid-stream
            own_a = [r for r in ws[a]["replicas"] if "for" not in r]
            assert [(r["layers"], r["host"], r["share"]) for r in own_a] == [([2, 4], b, 1.0)]
            status, _ = post(admin, {"action": "drop", "target": b})
            assert status == 409  # already dropped
            time.sleep(0.5)  # steps as one pipeline each way

            status, got = post(admin, {"action": "restore", "target": b})
            assert status == 200, got
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
