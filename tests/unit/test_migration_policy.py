"""The migration policy (pure): freeness, who moves where, and the rule for which request."""

from __future__ import annotations

import math

from tideserve.policy.migration import DecodeLoad, RunningRequest, freeness, plan


def load(wid, free, running, queued=0, ready=True, evacuate=False, role="decode"):
    return DecodeLoad(wid, role, ready, evacuate, free, queued, running)


def req(rid, wid, blocks, priority=0, migrating=False):
    return RunningRequest(rid, wid, blocks, priority, migrating)


def test_freeness_counts_queued_blocks_per_running_request():
    assert freeness(load("a", 100, 4, queued=20)) == 20.0
    assert freeness(load("a", 10, 0)) == 10.0
    assert freeness(load("a", 100, 1, evacuate=True)) == -math.inf


def test_moves_the_cheapest_request_from_the_least_to_the_most_free():
    workers = [load("busy", 10, 5), load("idle", 200, 1), load("mid", 100, 2)]
    reqs = [req("big", "busy", 40), req("small", "busy", 3), req("x", "idle", 5)]
    [m] = plan(workers, reqs)
    assert (m.request_id, m.src, m.dst) == ("small", "busy", "idle")
    assert "freeness" in m.reason


def test_batch_requests_move_before_interactive_ones():
    workers = [load("busy", 10, 5), load("idle", 200, 1)]
    reqs = [req("i", "busy", 3, priority=0), req("b", "busy", 30, priority=10)]
    assert plan(workers, reqs)[0].request_id == "b"


def test_balanced_workers_move_nothing_and_balance_off_moves_nothing():
    workers = [load("a", 100, 4), load("b", 104, 4)]
    assert plan(workers, [req("r", "a", 3)]) == []
    workers = [load("busy", 10, 5), load("idle", 200, 1)]
    assert plan(workers, [req("r", "busy", 3)], balance=False) == []


def test_a_draining_worker_is_emptied_even_when_balanced_or_balance_is_off():
    workers = [load("old", 500, 1, ready=False, evacuate=True), load("new", 100, 3)]
    [m] = plan(workers, [req("r", "old", 3)], balance=False)
    assert (m.src, m.dst) == ("old", "new") and "draining" in m.reason
    # the drained worker is never a destination
    workers = [load("busy", 10, 5), load("old", 500, 0, ready=False, evacuate=True)]
    assert plan(workers, [req("r", "busy", 3)]) == []


def test_one_migration_per_source_and_destination_and_it_must_fit():
    workers = [load("busy", 10, 5), load("idle", 200, 1)]
    assert plan(workers, [req("r", "busy", 3, migrating=True), req("s", "busy", 3)]) == []
    assert plan(workers, [req("huge", "busy", 500)]) == []
    workers = [load("b1", 10, 5), load("b2", 12, 5), load("idle", 200, 1)]
    moves = plan(workers, [req("r1", "b1", 3), req("r2", "b2", 3)])
    assert [m.dst for m in moves] == ["idle"]  # one at a time into the same destination


def test_roles_do_not_mix():
    workers = [load("d", 10, 5), load("c", 200, 1, role="colocated")]
    assert plan(workers, [req("r", "d", 3)]) == []


def test_a_move_that_would_only_swap_the_imbalance_is_not_made():
    # 5 vs 4 requests on big pools: one move makes it 4 vs 5, and the next plan moves it back
    workers = [load("a", 2800, 5), load("b", 2600, 4)]
    assert plan(workers, [req("r", "a", 25)]) == []
    # the only request of a worker, to an empty one: it would just move the imbalance
    assert plan([load("a", 2720, 1), load("b", 2912, 0)], [req("r", "a", 192)]) == []
    # draining still empties it
    workers = [load("a", 2720, 1, ready=False, evacuate=True), load("b", 2912, 0)]
    assert len(plan(workers, [req("r", "a", 192)], balance=False)) == 1
