"""Partial disaggregation's pure rules: the phase rule never lets a running request exceed its
TPOT SLO (a fake-clock simulation of 1,000 steps with random arrivals) and never starves
prompts; rolling activation routing; mitosis split and merge."""

from __future__ import annotations

import random

import pytest

from tideserve.policy.padg import (
    MIN_CHUNK,
    Decoding,
    Instance,
    join,
    leave,
    may_prefill,
    place,
    prefill_token_budget,
    regroup,
    slack,
)

TPOT_SLO = 0.1


def test_slack_and_may_prefill():
    r = Decoding(first_token_at=0.0, num_generated=5)  # banked 0.5 s, spent 0.2 s
    assert slack(r, 0.2, TPOT_SLO) == pytest.approx(0.3)
    assert may_prefill(0.2, [r], TPOT_SLO, est_prefill_s=0.25, est_decode_step_s=0.05)
    assert not may_prefill(0.2, [r], TPOT_SLO, est_prefill_s=0.26, est_decode_step_s=0.05)
    assert may_prefill(0.2, [], TPOT_SLO, est_prefill_s=99.0, est_decode_step_s=0.05)
    assert prefill_token_budget(0.2, [r], TPOT_SLO, 0.01, 0.05, 1024) == 25
    assert prefill_token_budget(0.2, [], TPOT_SLO, 0.01, 0.05, 1024) == 1024
    assert prefill_token_budget(0.6, [r], TPOT_SLO, 0.01, 0.05, 1024) == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_phase_rule_keeps_every_request_within_its_tpot_slo(seed):
    """1,000 steps of one instance: prompts arrive at random; each step is a prefill phase
    (as many prompt tokens as the rule's budget allows) or a decode step; step times are
    what the estimates say. No running request ever falls behind its TPOT SLO."""
    rng = random.Random(seed)
    per_token, decode_s, max_tokens = 0.0004, 0.02, 512
    now, waiting, running, done = 0.0, [], [], 0
    worst = float("inf")
    for _ in range(1000):
        if rng.random() < 0.15:
            waiting.append([rng.randint(16, 400), rng.randint(5, 60)])  # [prompt left, out]
        decoding = [Decoding(t0, n) for t0, n, _ in running]
        budget = prefill_token_budget(now, decoding, TPOT_SLO, per_token, decode_s, max_tokens)
        if waiting and (budget >= min(MIN_CHUNK, waiting[0][0]) or not running):
            budget = budget or max_tokens
            used = 0
            while waiting and used < budget:
                take = min(waiting[0][0], budget - used)
                waiting[0][0] -= take
                used += take
                if waiting[0][0] == 0:
                    _, out = waiting.pop(0)
                    running.append([None, 0, out])  # its first token comes with the phase
            now += used * per_token
            for r in running:
                if r[0] is None:
                    r[0], r[1] = now, 1
        else:
            now += decode_s
            for r in running:
                r[1] += 1
            done += sum(1 for r in running if r[1] >= r[2])
            running = [r for r in running if r[1] < r[2]]
        for t0, n, _ in running:
            worst = min(worst, slack(Decoding(t0, n), now, TPOT_SLO))
    assert worst >= -1e-9, worst  # nobody ever behind its TPOT SLO
    assert done > 20 and len(waiting) < 10  # and prompts were not starved


def inst(wid, free=100, queued=0, slack_s=None, ready=True, per_token=0.001, step=0.05):
    return Instance(wid, ready, free, 16, queued, slack_s, per_token, step)


def test_rolling_activation_places_on_the_active_instance_when_it_can():
    groups, active = [["a", "b", "c"]], {0: "a"}
    ins = {w: inst(w) for w in "abc"}
    p = place(groups, active, ins, 100, ttft_slo_s=1.0)
    assert (p.worker_id, p.active, p.rolled) == ("a", "a", False)


@pytest.mark.parametrize(
    "active_state, why",
    [
        ({"slack_s": 0.05}, "the prefill does not fit its slack"),
        ({"queued": 2000}, "it cannot meet the TTFT deadline"),
        ({"free": 3}, "it has no free KV"),
        ({"ready": False}, "it is draining"),
    ],
)
def test_activation_rolls_to_the_next_instance_that_can(active_state, why):
    groups, active = [["a", "b", "c"]], {0: "a"}
    ins = {"a": inst("a", **active_state), "b": inst("b", slack_s=0.01), "c": inst("c")}
    p = place(groups, active, ins, 100, ttft_slo_s=1.0)
    assert (p.worker_id, p.active, p.rolled) == ("c", "c", True), why


def test_no_instance_can_the_request_waits_where_it_starts_soonest():
    groups, active = [["a", "b"]], {0: "a"}
    ins = {"a": inst("a", queued=5000), "b": inst("b", queued=3000)}
    p = place(groups, active, ins, 100, ttft_slo_s=1.0)
    assert p.worker_id == "b" and p.active == "a"  # activation stays; nothing is refused
    assert place(groups, active, {"a": inst("a", ready=False)}, 100, 1.0) is None


def test_groups_are_tried_by_free_kv():
    groups, active = [["a"], ["b"]], {0: "a", 1: "b"}
    ins = {"a": inst("a", free=50), "b": inst("b", free=90)}
    assert place(groups, active, ins, 100, 1.0).worker_id == "b"


def test_mitosis_grows_one_at_a_time_splits_and_merges():
    g: list[list[str]] = []
    for w in "abcd":
        g = join(g, w, n_max=4)
    assert g == [["a", "b", "c", "d"]]
    g = join(g, "e", n_max=4)  # over n_max: split in two
    assert sorted(map(len, g)) == [2, 3] and sorted(sum(g, [])) == list("abcde")
    g = leave(g, "a", n_min=2, n_max=4)
    assert len(g) == 2  # one group below n_min stays as it is
    g = leave(leave(g, "c", n_min=2, n_max=4), "d", n_min=2, n_max=4)
    assert g == [["b", "e"]]  # two below n_min merged
    assert regroup([["a"], ["b"], ["c"]], n_max=2, n_min=2) in ([["c"], ["a", "b"]],)
    with pytest.raises(ValueError, match="n_min"):
        regroup([["a"]], n_max=1, n_min=2)
