"""`tideserve serve --mode colocated --layer-stages 2` on a real tiny-model cluster: while 16
concurrent greedy requests run, the router's admin endpoint replicates a stage, takes the replica
away and migrates a layer; every request finishes with the offline engine's tokens, and
/cluster shows the worker's layer ranges and the replica while it is on."""

from __future__ import annotations

import concurrent.futures

from tests.integration.elastic import (  # noqa: F401 (tiny_dir: a fixture)
    PROMPTS,
    complete,
    offline_texts,
    post,
    serve_elastic,
    tiny_dir,
    until,
)


def _until(url: str, check, timeout_s: float = 30.0) -> dict:
    """Polls /cluster until its one worker passes `check`; returns that worker."""
    ws = until(url, lambda ws: len(ws) == 1 and check(next(iter(ws.values()))), timeout_s)
    return next(iter(ws.values()))


def test_replicate_unreplicate_migrate_mid_stream_match_offline(tiny_dir):  # noqa: F811
    prompts = PROMPTS
    expected = offline_texts(tiny_dir)

    srv = serve_elastic(tiny_dir, 1)
    with srv:
        url = srv.url
        w = _until(url, lambda w: w["layers"])
        assert w["layers"] == [[0, 2], [2, 4]] and w["replicas"] == []
        admin = f"{url}/admin/workers/{w['id']}/modules"

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(complete, url, p) for p in prompts]
            _until(url, lambda w: w["load"]["running"] >= 8)

            status, body = post(admin, {"action": "replicate", "layers": [2, 4], "share": 0.5})
            assert status == 200, body
            w = _until(url, lambda w: w["replicas"])
            assert w["replicas"][0]["layers"] == [2, 4] and w["replicas"][0]["host"] == w["id"]
            assert w["replicas"][0]["seqs"] > 0  # live sequences moved to it, KV and all
            assert not any(f.done() for f in futures)  # it landed mid-stream

            status, body = post(admin, {"action": "unreplicate", "layers": [2, 4]})
            assert status == 200, body
            _until(url, lambda w: not w["replicas"])

            status, body = post(admin, {"action": "migrate", "layers": [1, 2]})
            assert status == 200, body
            _until(url, lambda w: w["layers"] == [[0, 1], [1, 4]])
            assert not all(f.done() for f in futures)

            status, body = post(admin, {"action": "migrate", "layers": [2, 3]})
            assert status == 409  # not at an inner edge of [0, 1) or [1, 4)
            results = [f.result() for f in futures]

        assert [t for t, _ in results] == expected
        assert {r for _, r in results} == {"length"}  # nothing lost or cut short
        w = _until(url, lambda w: w["load"]["running"] == 0)
        assert w["kv_blocks_used"] == 0  # no leaked block
        assert w["layers"] == [[0, 1], [1, 4]] and w["replicas"] == []
    assert not srv.leftover_children()
