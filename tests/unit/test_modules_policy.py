"""Module-level elasticity, pure: the replication cost model, the dropping watermarks, and the
`modules` autoscaling policy on synthetic observations (and in the simulator)."""

from __future__ import annotations

import dataclasses

import pytest

from tideserve.bench.traces import TraceRequest
from tideserve.policy.autoscale import SLO, Bounds, Observation, WorkerObs, make_policy
from tideserve.policy.modules import (
    DropLayers,
    DropWatermarks,
    PairUsage,
    ReplicateLayers,
    ReplicationInputs,
    RestoreLayers,
    UnreplicateLayers,
    Watermarks,
    activation_bytes,
    best_replication,
    evaluate,
)
from tideserve.sim.config import parse_config
from tideserve.sim.perf import PerfModel, StepFit, save_profile
from tideserve.sim.run import simulate

MS = 1e-3


def inputs(**kw) -> ReplicationInputs:
    """4 layers of 10 ms at 64 tokens x 1024 hidden x 2 bytes; a 1 ms crossing moves it all."""
    base = dict(
        layer_step_s=(10 * MS,) * 4,
        weight_bytes_per_layer=100_000_000,
        batch_tokens=64,
        hidden_size=1024,
        dtype_bytes=2,
        link_bandwidth_bytes_per_s=131072 / MS,
        link_latency_s=1 * MS,
        load_bandwidth_bytes_per_s=1e9,
    )
    return ReplicationInputs(**{**base, **kw})


# -- the cost model -------------------------------------------------------------------------


def test_evaluate_matches_the_model_by_hand():
    assert activation_bytes(64, 1024, 2) == 131072
    plan = evaluate(inputs(), 0, 2, 0.5)
    # local: 20 ms x 0.5 = 10 ms; remote: 2 x (1 + 0.5 x 1) ms + 20 ms x 0.5 = 13 ms
    assert plan.step_s == pytest.approx(40 * MS)
    assert plan.new_step_s == pytest.approx(33 * MS)
    assert plan.gain_s == pytest.approx(7 * MS)
    assert plan.load_bytes == 200_000_000 and plan.load_s == pytest.approx(0.2)
    assert plan.activation_bytes == 131072  # half the batch, out and back
    assert plan.num_layers == 2


def test_a_slow_replica_or_a_weight_bound_step_gains_less():
    base = evaluate(inputs(), 0, 4, 0.5).gain_s
    assert evaluate(inputs(replica_speed=2.0), 0, 4, 0.5).gain_s < base
    assert evaluate(inputs(fixed_share=0.5), 0, 4, 0.5).gain_s < base
    assert evaluate(inputs(), 0, 4, 0.0).gain_s == 0.0  # nothing offloaded, nothing gained


def test_latency_makes_one_layer_a_loss_so_the_model_picks_more():
    inp = inputs(link_latency_s=4 * MS)
    assert evaluate(inp, 0, 1, 0.5).gain_s < 0  # 5 ms saved, 2 x 4.5 ms spent crossing
    plan = best_replication(inp, shares=(0.5,), horizon_s=60.0)
    assert plan is not None and plan.num_layers > 1 and plan.gain_s > 0


def test_the_replicas_memory_caps_the_range():
    plan = best_replication(inputs(replica_free_bytes=250_000_000), horizon_s=600.0)
    assert plan is not None and plan.num_layers == 2  # 3 layers would not fit
    assert best_replication(inputs(replica_free_bytes=50_000_000)) is None


def test_a_short_horizon_does_not_pay_for_the_load():
    long = best_replication(inputs(), horizon_s=600.0)
    assert long is not None and long.num_layers == 4
    # 4 layers: 17 ms of 40 saved over 0.5 s is 0.21 s of work, against 0.4 s of loading
    assert best_replication(inputs(), horizon_s=0.5) is None


def test_the_model_picks_the_slow_layers():
    inp = inputs(layer_step_s=(2 * MS, 2 * MS, 30 * MS, 30 * MS, 2 * MS), link_latency_s=0.0)
    plan = best_replication(inp, shares=(0.5,), horizon_s=3.0)  # a fast layer: 1 ms won
    assert plan is not None and (plan.start, plan.end) == (2, 4)


def test_the_best_share_balances_the_two_branches():
    plan = best_replication(inputs(), shares=(0.1, 0.25, 0.5, 0.9), horizon_s=600.0)
    assert plan is not None and plan.share == 0.5  # 0.9 leaves the replica the long branch


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"layer_step_s": ()}, "at least one layer"),
        ({"link_bandwidth_bytes_per_s": 0}, "link_bandwidth_bytes_per_s must be > 0"),
        ({"fixed_share": 2.0}, "fixed_share must be in [0, 1]"),
        ({"batch_tokens": -1}, "batch_tokens must be >= 0"),
    ],
)
def test_bad_inputs_are_refused(kw, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        inputs(**kw)


def test_bad_ranges_are_refused():
    with pytest.raises(ValueError, match="outside the model's 4 layers"):
        evaluate(inputs(), 2, 5, 0.5)
    with pytest.raises(ValueError, match="share must be in"):
        evaluate(inputs(), 0, 1, 1.5)


# -- the dropping watermarks ----------------------------------------------------------------


def marks(**kw) -> DropWatermarks:
    base = dict(high=0.9, low=0.6, restore_window_s=10.0, min_dwell_s=20.0)
    return DropWatermarks(Watermarks(**{**base, **kw}))


def test_drop_needs_both_replicas_high_and_a_queue():
    m = marks()
    assert m.step(0, PairUsage((0.95, 0.85), 5, 0.95)) is None  # one is not short
    assert m.step(1, PairUsage((0.95, 0.92), 0, 0.95)) is None  # nobody queued
    assert m.step(2, PairUsage((0.95, 0.92), 3, 0.95)) == "drop"
    assert m.dropped


def test_restore_needs_low_usage_and_no_queue_held_for_the_window():
    m = marks()
    assert m.step(0, PairUsage((0.9, 0.9), 1, 0.9)) == "drop"
    assert m.step(25, PairUsage((0.4, 0.4), 0, 0.7)) is None  # would be above low
    assert m.step(26, PairUsage((0.2, 0.2), 0, 0.5)) is None  # calm starts
    assert m.step(30, PairUsage((0.2, 0.2), 1, 0.5)) is None  # a queue resets it
    assert m.step(31, PairUsage((0.2, 0.2), 0, 0.5)) is None
    assert m.step(40, PairUsage((0.2, 0.2), 0, 0.5)) is None  # 9 s calm
    assert m.step(41, PairUsage((0.2, 0.2), 0, 0.5)) == "restore"
    assert not m.dropped


def test_watermarks_do_not_flap():
    m = marks(restore_window_s=0.0, min_dwell_s=20.0)
    changes = []
    for t in range(200):  # usage swings across both watermarks every tick
        hi = t % 2 == 0
        pair = PairUsage((0.95, 0.95) if hi else (0.1, 0.1), 2 if hi else 0, 0.95 if hi else 0.1)
        if m.step(float(t), pair):
            changes.append(t)
    gaps = [b - a for a, b in zip(changes, changes[1:])]
    assert changes and min(gaps) >= 20  # at most one change per dwell


def test_right_after_a_drop_the_pair_does_not_restore():
    m = marks(restore_window_s=0.0, min_dwell_s=0.0)
    assert m.step(0, PairUsage((0.9, 0.9), 1, 0.9)) == "drop"
    # the freed memory halves the usage, but restored it would still be 0.9 > low
    for t in range(1, 50):
        assert m.step(float(t), PairUsage((0.45, 0.45), 0, 0.9)) is None


def test_watermarks_are_validated():
    with pytest.raises(ValueError, match="0 < low < high <= 1"):
        Watermarks(high=0.5, low=0.6)
    with pytest.raises(ValueError, match="min_dwell_s must be >= 0"):
        Watermarks(min_dwell_s=-1)


# -- the modules policy ---------------------------------------------------------------------


def worker(wid, running=0, waiting=0, used=0, total=100, cap=16, tpot=None) -> WorkerObs:
    return WorkerObs(wid, "decode", "ready", running, waiting, 0, used, total, cap, tpot)


def observe(now, *workers, tpot=None) -> Observation:
    return Observation(
        now=float(now),
        workers=tuple(workers),
        starting={},
        window_s=30.0,
        decode_tokens_per_s=0.0,
        prefill_tokens_per_s=0.0,
        ttft_p90_s=None,
        tpot_p90_s=tpot,
        queue_wait_p90_s=None,
        inflight={"interactive": sum(w.num_running for w in workers)},
        waiting={"interactive": sum(w.num_waiting for w in workers)},
    )


def policy(**options):
    return make_policy("modules", Bounds(), SLO(tpot_s=0.1), **options)


def test_a_hot_worker_gets_a_replica_on_the_spare_one_and_loses_it_when_cool():
    p = policy(drop=False, cool_window_s=20.0)
    hot, spare = worker("d1", 16, 6, tpot=0.12), worker("d2", 1)
    first = p.decide(observe(0, hot, spare))
    assert len(first) == 1 and isinstance(first[0], ReplicateLayers)
    a = first[0]
    assert (a.worker_id, a.target_id) == ("d1", "d2")
    assert 0 <= a.start < a.end <= 30 and 0 < a.share <= 0.5
    assert "d1 hot" in a.reason and "replicate layers" in a.reason
    assert p.decide(observe(5, hot, spare)) == []  # asked once
    cool = worker("d1", 4, 0, tpot=0.03)
    assert p.decide(observe(10, cool, spare)) == []  # cool starts
    assert p.decide(observe(25, cool, spare)) == []
    back = p.decide(observe(30, cool, spare))
    assert back == [UnreplicateLayers("d1", "d2", a.start, a.end, back[0].reason)]


def test_a_served_worker_replicates_a_whole_stage_past_layer_0_or_nothing():
    """With the stages a worker reports (its heartbeat's `layers`), the plan is one of them,
    never the first (the router refuses anything else); a worker that reports none is not
    elastic and gets no replica."""
    hot = dict(running=16, waiting=6, tpot=0.12)
    staged = dataclasses.replace(worker("d1", **hot), layers=((0, 10), (10, 20), (20, 30)))
    [a] = policy(drop=False).decide(observe(0, staged, worker("d2", 1)))
    assert isinstance(a, ReplicateLayers) and (a.start, a.end) in ((10, 20), (20, 30))
    flat = dataclasses.replace(worker("d1", **hot), layers=())
    assert policy(drop=False).decide(observe(0, flat, worker("d2", 1))) == []
    only_first = dataclasses.replace(worker("d1", **hot), layers=((0, 30),))
    assert policy(drop=False).decide(observe(0, only_first, worker("d2", 1))) == []


def test_best_replication_searches_only_the_ranges_it_is_given():
    inp = ReplicationInputs(
        layer_step_s=(0.001,) * 8 + (0.02,) * 2, weight_bytes_per_layer=1 << 20,
        batch_tokens=16, hidden_size=64, dtype_bytes=2, link_bandwidth_bytes_per_s=1e10,
        link_latency_s=1e-5, load_bandwidth_bytes_per_s=1e9,
    )  # fmt: skip
    free = best_replication(inp)
    assert free is not None and (free.start, free.end) == (0, 10)  # loading is cheap here
    given = best_replication(inp, ranges=((0, 5), (5, 10)))
    assert given is not None and (given.start, given.end) == (5, 10)  # the slow layers
    fast = best_replication(inp, ranges=((0, 8),), min_gain=0.1)
    assert fast is None  # the fast layers save 8% of the step, under min_gain


def test_no_replica_without_a_spare_or_when_it_does_not_pay():
    p = policy(drop=False)
    assert p.decide(observe(0, worker("d1", 16, 6, tpot=0.12), worker("d2", 12))) == []
    tiny = policy(drop=False, horizon_s=0.01)  # the load never pays back
    assert tiny.decide(observe(0, worker("d1", 16, 6, tpot=0.12), worker("d2", 0))) == []


def test_two_starved_replicas_drop_then_restore():
    p = policy(replicate=False, restore_window_s=10.0, min_dwell_s=20.0)
    a, b = worker("d1", 8, 3, used=95), worker("d2", 8, 2, used=92)
    [drop] = p.decide(observe(0, a, b))
    assert drop == DropLayers(("d1", "d2"), 15, drop.reason)
    assert "short of KV" in drop.reason
    # dropped: each stage's pool doubled (200 blocks); 130 used would be 0.65 of the full pair
    a2, b2 = worker("d1", 8, 0, used=130, total=200), worker("d2", 8, 0, used=130, total=200)
    assert [p.decide(observe(t, a2, b2)) for t in (5, 20, 40)] == [[], [], []]
    a3, b3 = worker("d1", 4, 0, used=100, total=200), worker("d2", 4, 0, used=100, total=200)
    assert p.decide(observe(41, a3, b3)) == []  # 0.5: calm starts
    [restore] = p.decide(observe(51, a3, b3))
    assert restore == RestoreLayers(("d1", "d2"), restore.reason)


def test_a_departed_worker_is_forgotten():
    p = policy(replicate=False, min_dwell_s=0.0)
    a, b = worker("d1", 8, 3, used=95), worker("d2", 8, 2, used=92)
    assert p.decide(observe(0, a, b))
    assert p.decide(observe(1, a)) == []
    assert not p.pairs and not p.replicas


def test_the_policy_is_deterministic():
    def run():
        p, out = policy(restore_window_s=0.0, min_dwell_s=10.0, cool_window_s=10.0), []
        for t in range(0, 200, 5):
            hot = (t // 40) % 2 == 0
            ws = (
                worker("d1", 16 if hot else 2, 4 if hot else 0, used=95 if hot else 10,
                       tpot=0.12 if hot else 0.02),
                worker("d2", 0, 0, used=0),
                worker("d3", 8, 2 if hot else 0, used=95 if hot else 10),
                worker("d4", 8, 2 if hot else 0, used=93 if hot else 10),
            )  # fmt: skip
            out += [(t, type(x).__name__, x.reason) for x in p.decide(observe(t, *ws))]
        return out

    first = run()
    kinds = {k for _, k, _ in first}
    assert kinds == {"ReplicateLayers", "UnreplicateLayers", "DropLayers", "RestoreLayers"}
    assert first == run()


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="watermarks need 0 < low < high"):
        policy(high_watermark=0.5, low_watermark=0.7)
    with pytest.raises(ValueError, match="layer_cost needs num_layers"):
        policy(layer_cost=(1.0, 2.0))
    with pytest.raises(ValueError, match="unknown option"):
        policy(watermark=0.5)


def test_the_simulator_runs_the_modules_policy(tmp_path):
    prof = tmp_path / "perf.json"
    perf = PerfModel(
        name="test",
        step=StepFit(0.01, 1e-4, 1e-3, 0.0),
        block_size=16,
        num_kv_blocks=60,
        max_model_len=1024,
        kv_bytes_per_token=1000,
        startup_s=30.0,
        source="measured",
    )
    save_profile(perf, prof)
    raw = {
        "mode": "colocated",
        "slo": {"ttft_ms": 1000.0, "tpot_ms": 50.0},
        "scheduler": {"max_num_seqs": 32, "max_num_batched_tokens": 512, "max_model_len": 1024},
        "workers": {"default": {"profile": str(prof)}},
        "pool": {"colocated": 2},
        "autoscale": {
            "policy": "modules",
            "interval_s": 1.0,
            "options": {"replicate": False, "min_dwell_s": 0.0},
        },
    }
    cfg = parse_config(raw, tmp_path)
    reqs = [TraceRequest(i * 0.02, 300, 200) for i in range(40)]
    summary, cluster = simulate(cfg, reqs)
    assert summary["num_completed"] == 40
    assert any("short of KV" in reason for _, reason in cluster.actions)
    assert dataclasses.is_dataclass(cfg)
