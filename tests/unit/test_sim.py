"""The cluster simulator: event core, performance model, same live code, determinism, outputs."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from tideserve.bench.traces import TraceRequest
from tideserve.engine.scheduler import Scheduler
from tideserve.policy import routing
from tideserve.policy.autoscale import Observation, ScaleTo
from tideserve.sim.config import parse_config
from tideserve.sim.events import EventLoop
from tideserve.sim.perf import (
    PerfModel,
    StepFit,
    StepSample,
    attention_pairs,
    fit_quality,
    fit_step,
    kv_transfer_s,
    load_model_shape,
    load_profile,
    roofline,
    save_profile,
)
from tideserve.sim.run import simulate

# -- factories ----------------------------------------------------------------------------------


def perf(**kw) -> PerfModel:
    base = dict(
        name="test",
        step=StepFit(0.01, 1e-4, 1e-3, 0.0),
        block_size=16,
        num_kv_blocks=512,
        max_model_len=2048,
        kv_bytes_per_token=1000,
        startup_s=30.0,
        source="measured",
    )
    return PerfModel(**{**base, **kw})


def config(tmp_path, mode="colocated", pool=None, perf_model=None, **extra):
    prof = tmp_path / "perf.json"
    save_profile(perf_model or perf(), prof)
    raw = {
        "mode": mode,
        "slo": {"ttft_ms": 1000.0, "tpot_ms": 50.0},
        "scheduler": {"max_num_seqs": 32, "max_num_batched_tokens": 512, "max_model_len": 2048},
        "workers": {"default": {"profile": str(prof), "cost_per_gpu_hour": 3.6}},
        "pool": pool or {"colocated": 2},
        **extra,
    }
    return parse_config(raw, tmp_path)


def trace(n=60, rate=5.0, inp=200, out=20) -> list[TraceRequest]:
    return [TraceRequest(i / rate, inp + (i * 37) % 100, out + (i * 13) % 10) for i in range(n)]


# -- the event core -----------------------------------------------------------------------------


def test_events_run_in_time_order_ties_in_push_order():
    loop, seen = EventLoop(), []
    loop.at(2.0, seen.append, "c")
    loop.at(1.0, seen.append, "a")
    loop.at(1.0, seen.append, "b")
    loop.at(1.5, lambda _: loop.after(1.0, seen.append, "d"))  # at 2.5
    loop.run()
    assert seen == ["a", "b", "c", "d"]
    assert loop.now == 2.5 and loop.num_events == 5 and loop.is_empty


def test_next_barrier_is_the_earliest_pending_barrier_event():
    loop, seen = EventLoop(), []
    loop.at(3.0, seen.append, "tick", barrier=True)
    loop.at(1.0, lambda _: seen.append(loop.next_barrier_s))
    loop.at(2.0, seen.append, "arrival", barrier=True)
    loop.at(2.5, lambda _: seen.append(loop.next_barrier_s))
    loop.run()
    assert seen == [2.0, "arrival", 3.0, "tick"]
    assert loop.next_barrier_s == float("inf")


def test_events_never_go_back_in_time_and_stop_at_until():
    loop, seen = EventLoop(), []
    loop.at(5.0, lambda _: loop.at(1.0, lambda _: seen.append(loop.now)))
    loop.at(9.0, seen.append, "late")
    loop.run(until=6.0)
    assert seen == [5.0] and loop.now == 6.0 and not loop.is_empty


# -- the performance model ----------------------------------------------------------------------


def test_fit_recovers_linear_coefficients():
    true = StepFit(0.02, 3e-4, 2e-3, 5e-6)
    samples = [
        StepSample(p, d, c, true.base_s + 3e-4 * p + 2e-3 * d + 5e-6 * c)
        for p, d, c in [(0, 1, 100), (0, 8, 900), (0, 32, 5000), (256, 0, 256), (1024, 0, 1024),
                        (64, 4, 700), (0, 16, 16000), (512, 2, 3000)]
    ]  # fmt: skip
    fit = fit_step(samples)
    for name in ("base_s", "prefill_token_s", "decode_seq_s", "context_token_s"):
        assert getattr(fit, name) == pytest.approx(getattr(true, name), rel=1e-6)


def test_fit_recovers_the_quadratic_prefill_term_and_reports_its_quality():
    true = StepFit(0.03, 1e-3, 1e-3, 2e-6, 5e-6)  # the shape of this CPU's profile
    shapes = [(p, 0, p, attention_pairs(0, p)) for p in (16, 64, 128, 256, 512, 1024)]
    shapes += [(0, d, d * c, 0) for d in (1, 4, 16) for c in (64, 512)]
    model = perf(step=true)
    samples = [StepSample(p, d, c, model.step_s(p, d, c, a), a) for p, d, c, a in shapes]
    fit = fit_step(samples)
    assert fit.prefill_pair_s == pytest.approx(5e-6, rel=1e-6)
    q = fit_quality(fit, samples)
    assert q["r2"] == pytest.approx(1.0) and q["all"]["max_rel_error"] < 1e-6
    assert q["prefill"]["num_steps"] == 6 and q["decode"]["num_steps"] == 6
    # without the pair term, a linear fit misses long prompts by far
    linear = fit_step([dataclasses.replace(s, attention_pairs=0) for s in samples])
    assert fit_quality(linear, samples)["prefill"]["max_rel_error"] > 0.2
    assert attention_pairs(0, 1) == 1 and attention_pairs(10, 1) == 11  # a decode: its context


def test_fit_never_goes_negative():
    samples = [StepSample(p, 0, p, 0.05 - 1e-6 * p) for p in (16, 64, 256, 1024)]
    fit = fit_step(samples)
    assert fit.prefill_token_s == 0 and fit.base_s > 0
    with pytest.raises(ValueError, match="at least 4"):
        fit_step(samples[:2])


def test_profile_round_trips(tmp_path):
    p = perf()
    save_profile(p, tmp_path / "p.json")
    assert load_profile(tmp_path / "p.json") == p
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="bad.json"):
        load_profile(tmp_path / "bad.json")


def test_shipped_model_configs_have_the_public_sizes():
    assert load_model_shape("llama-3-8b").num_params == pytest.approx(8.03e9, rel=0.01)
    assert load_model_shape("llama-3-70b").num_params == pytest.approx(70.6e9, rel=0.01)
    assert load_model_shape("qwen2-7b").num_params == pytest.approx(7.6e9, rel=0.01)
    assert load_model_shape("llama-3-8b").kv_bytes_per_token() == 131072  # 2*32*8*128*2


def test_roofline_orders_hardware_and_needs_tp_for_70b():
    h100, a100, l20 = (roofline(hw, "llama-3-8b") for hw in ("H100-80G", "A100-80G", "L20"))
    for p in (1, 64):
        assert h100.step_s(2048, 0, 2048) < a100.step_s(2048, 0, 2048) < l20.step_s(2048, 0, 2048)
        assert h100.step_s(0, p, p * 1000) < a100.step_s(0, p, p * 1000)
    # decode is memory bound: the weights read dominates one decode step
    assert h100.step.base_s == pytest.approx(0.002 + 16.06e9 / (3.35e12 * 0.8), rel=0.01)
    with pytest.raises(ValueError, match="raise tp"):
        roofline("H100-80G", "llama-3-70b", tp=1)
    assert roofline("H100-80G", "llama-3-70b", tp=4).num_kv_blocks > 0
    assert kv_transfer_s(12_500_000_000, 100.0) == pytest.approx(1.0)


# -- the same code as the live system -----------------------------------------------------------


class RecordingPolicy:
    """A scaling policy that records what it saw and asks for one more colocated worker."""

    name = "recording"

    def __init__(self):
        self.seen: list[Observation] = []

    def decide(self, obs):
        self.seen.append(obs)
        if len(self.seen) == 2:
            return [ScaleTo({"colocated": 3}, "test")]
        return []


def test_simulator_calls_the_policy_and_routing_it_is_given(tmp_path):
    cfg = config(
        tmp_path,
        autoscale={"policy": "static", "interval_s": 2.0, "actuator_delay_s": 1.0},
    )
    policy, routed = RecordingPolicy(), []

    def route(workers, n, exclude=frozenset()):
        routed.append((tuple(w.worker_id for w in workers), n))
        return routing.route(workers, n, exclude)

    summary, cluster = simulate(cfg, trace(), policy=policy, route=route)
    assert len(routed) == 60 and routed[0][1] == trace()[0].input_tokens
    assert [o.now for o in policy.seen[:3]] == [0.0, 2.0, 4.0]
    assert policy.seen[0].inflight == {"interactive": 1, "batch": 0}  # the t=0 arrival
    # the scale-out happened: a third worker started at 2 + 1 (actuator) and was ready 30 s on
    third = cluster.workers["colocated-3"]
    assert third.started_at == 3.0 and third.state == "ready"
    assert any(len(ids) == 3 for ids, _ in routed) or summary["duration_s"] < 33.0
    assert all(isinstance(w.scheduler, Scheduler) for w in cluster.workers.values())
    assert summary["num_completed"] == 60


def test_real_scheduler_preempts_when_the_kv_pool_is_small(tmp_path):
    small = perf(num_kv_blocks=40, max_model_len=640)
    cfg = config(tmp_path, perf_model=small, pool={"colocated": 1})
    cfg = dataclasses.replace(cfg, scheduler=dataclasses.replace(cfg.scheduler, max_model_len=640))
    summary, cluster = simulate(cfg, trace(n=40, rate=20.0, inp=150, out=60))
    assert summary["sim"]["num_preemptions"] > 0
    assert summary["num_completed"] == 40
    w = cluster.workers["colocated-1"]
    assert w.scheduler.pool.num_used == 0 and not w.scheduler.has_work  # nothing leaked


# -- modes, results, determinism ----------------------------------------------------------------


@pytest.mark.parametrize(
    "mode,pool",
    [
        ("colocated", {"colocated": 2}),
        ("disaggregated", {"prefill": 1, "decode": 2}),
        ("partial", {"partial": 2}),
    ],
)
def test_every_request_completes_with_its_lengths_and_nothing_leaks(tmp_path, mode, pool):
    cfg = config(tmp_path, mode=mode, pool=pool)
    reqs = trace()
    summary, cluster = simulate(cfg, reqs)
    assert summary["num_completed"] == len(reqs) and summary["num_failed"] == 0
    assert summary["lengths"]["num_output_mismatch"] == 0
    for rec in cluster.records:
        assert rec.send_s <= rec.first_token_s <= rec.last_token_s == rec.end_s
        assert len(rec.itl_ms) == rec.num_output_tokens - 1
    for w in cluster.workers.values():
        assert w.scheduler.pool.num_used == 0 and w.pending_blocks == 0 and not w.imports
    span = summary["duration_s"]
    assert summary["worker_seconds"] == pytest.approx(sum(pool.values()) * span)
    assert summary["cost_usd"] == pytest.approx(summary["worker_seconds"] * 3.6 / 3600)


def test_fudg_ttft_is_one_prefill_step_and_decode_waits_for_the_transfer(tmp_path):
    p = perf(step=StepFit(0.01, 1e-4, 1e-3, 0.0), kv_bytes_per_token=125_000)  # 1 Mb/token
    cfg = config(
        tmp_path,
        mode="disaggregated",
        pool={"prefill": 1, "decode": 1},
        perf_model=p,
        network={"kv_link_gbps": 1.0, "kv_link_latency_ms": 0.0},
    )
    summary, cluster = simulate(cfg, [TraceRequest(0.0, 100, 3)])
    rec = cluster.records[0]
    assert rec.first_token_s == pytest.approx(0.01 + 100 * 1e-4)  # one prefill step
    # 100 tokens x 1 Mb over 1 Gb/s = 0.1 s from the step's start; then two decode steps
    assert rec.end_s == pytest.approx(0.1 + 2 * (0.01 + 1e-3))


def test_same_seed_same_results_other_seed_differs(tmp_path):
    cfg = config(tmp_path, step_jitter=0.1, seed=7)

    def run(c):
        s, _ = simulate(c, trace())
        return json.dumps({k: v for k, v in s.items() if k != "sim"}, sort_keys=True)

    assert run(cfg) == run(cfg)
    assert run(cfg) != run(dataclasses.replace(cfg, seed=8))


@pytest.mark.parametrize(
    "mode,pool,extra",
    [
        ("colocated", {"colocated": 2}, {"step_jitter": 0.2}),
        ("disaggregated", {"prefill": 1, "decode": 2}, {"step_jitter": 0.1}),
        ("partial", {"partial": 3}, {}),
        (
            "colocated",
            {"colocated": 1},
            {
                "autoscale": {
                    "policy": "utilization", "interval_s": 1.0, "actuator_delay_s": 0.5,
                    "bounds": {"min_colocated": 1, "max_colocated": 3, "max_decode": 0,
                               "max_prefill": 0, "min_decode": 0},
                },
            },
        ),
    ],
)  # fmt: skip
def test_fast_decode_runs_give_the_same_records_as_step_by_step(tmp_path, mode, pool, extra):
    small = perf(num_kv_blocks=120)  # tight enough that runs stop at block limits
    cfg = config(tmp_path, mode=mode, pool=pool, perf_model=small, **extra)
    reqs = trace(n=150, rate=8.0, inp=120, out=90)
    fast, fc = simulate(cfg, reqs)
    slow, sc = simulate(dataclasses.replace(cfg, fast_decode=False), reqs)
    assert fc.loop.num_events < sc.loop.num_events  # the runs did happen
    assert [dataclasses.asdict(r) for r in fc.records] == [
        dataclasses.asdict(r) for r in sc.records
    ]
    for key in ("gpu_seconds", "scaling_actions", "workers_by_role", "slo_attainment"):
        assert fast[key] == slow[key]
    assert fast["sim"]["num_preemptions"] == slow["sim"]["num_preemptions"]


def test_too_long_prompt_fails_like_the_router_and_counts(tmp_path):
    cfg = config(tmp_path)
    summary, cluster = simulate(cfg, [TraceRequest(0.0, 5000, 4), TraceRequest(0.1, 10, 4)])
    assert summary["num_failed"] == 1 and summary["num_completed"] == 1
    assert cluster.records[0].status == 400


def test_autoscaled_pool_grows_under_load_and_bills_the_new_workers(tmp_path):
    cfg = config(
        tmp_path,
        pool={"colocated": 1},
        autoscale={
            "policy": "utilization",
            "interval_s": 2.0,
            "actuator_delay_s": 1.0,
            "bounds": {"min_colocated": 1, "max_colocated": 4, "max_decode": 0,
                       "max_prefill": 0, "min_decode": 0},
            "options": {"up_cooldown_s": 2.0},
        },
    )  # fmt: skip
    summary, cluster = simulate(cfg, trace(n=400, rate=40.0, inp=300, out=60))
    assert len(cluster.workers) > 1 and summary["scaling_actions"]
    assert summary["worker_seconds"] < len(cluster.workers) * summary["duration_s"]
    assert summary["num_completed"] == 400


def test_cli_writes_bench_outputs_and_a_timeline(tmp_path, capsys):
    from tideserve.cli import main

    cfg_path = tmp_path / "c.toml"
    save_profile(perf(), tmp_path / "perf.json")
    cfg_path.write_text(
        'mode = "colocated"\n[slo]\nttft_ms = 1000.0\ntpot_ms = 50.0\n'
        '[workers.default]\nprofile = "perf.json"\ncost_per_gpu_hour = 2.0\n[pool]\ncolocated = 2\n'
    )
    out = tmp_path / "run"
    rc = main(["sim", "--trace", "azure-conv", "--config", str(cfg_path), "--out", str(out),
               "--max-requests", "200"])  # fmt: skip
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    for key in ("ttft_ms", "tpot_ms", "slo_attainment", "worker_seconds", "cost_usd"):
        assert key in summary
    assert summary["num_requests"] == 200
    assert sum(1 for _ in (out / "requests.jsonl").open()) == 200
    assert (out / "timeline.png").stat().st_size > 0
    assert "cost:" in capsys.readouterr().out


def test_sweep_reports_goodput_per_gpu(tmp_path):
    from tideserve.sim.run import sweep

    cfg = config(tmp_path, record_itl=False)
    rows = sweep(cfg, trace(n=80, rate=5.0), ["1", "2"], max_probes=5)
    assert [r["gpus"] for r in rows] == [1, 2]
    assert all(r["goodput_rps"] > 0 for r in rows)
    assert rows[1]["goodput_rps"] >= rows[0]["goodput_rps"]
    assert rows[0]["goodput_rps_per_gpu"] == pytest.approx(rows[0]["goodput_rps"])
    assert not math.isnan(rows[0]["base_rps"])
