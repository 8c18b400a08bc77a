"""The routing policy as pure functions: FuDG prefill/decode choice, NoDG fallback."""

from __future__ import annotations

from tideserve.policy.routing import WorkerView, route


def w(wid, role, queued=0, free=100, state="ready", max_len=2048):
    return WorkerView(wid, role, state, queued, free, 100, 16, max_len)


def test_prefill_least_queued_decode_most_free():
    workers = [
        w("p1", "prefill", queued=500),
        w("p2", "prefill", queued=10),
        w("d1", "decode", free=20),
        w("d2", "decode", free=80),
    ]
    r = route(workers, 100)
    assert (r.prefill, r.target) == ("p2", "d2")


def test_in_flight_blocks_count_as_used_and_not_ready_is_skipped():
    workers = [
        w("p", "prefill"),
        w("d1", "decode", free=5),
        w("d2", "decode", free=90, state="draining"),
    ]
    r = route(workers, 1000)  # needs 63 blocks; d1 has no room but is the only ready one
    assert r.target == "d1"
    assert route([w("p", "prefill"), w("d", "decode", state="starting")], 10) is None


def test_colocated_fallback_and_exclusion():
    workers = [w("c1", "colocated", free=50, queued=800), w("c2", "colocated", free=40)]
    assert route(workers, 10) == route(workers, 10)  # deterministic
    assert route(workers, 10).target == "c2"  # 40 free beats 50 free minus 50 blocks queued
    assert route(workers, 10, exclude=frozenset({"c2"})).target == "c1"
    assert route(workers, 10).prefill is None


def test_prompt_longer_than_a_worker_context_skips_it():
    workers = [w("c1", "colocated", max_len=512), w("c2", "colocated", max_len=4096, free=1)]
    assert route(workers, 1000).target == "c2"
