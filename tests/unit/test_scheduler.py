"""The scheduler as a pure state machine, driven by a fake model (next token = last + 1)."""

from __future__ import annotations

import pytest

from tideserve.engine.block_pool import BlockPool
from tideserve.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from tideserve.engine.sequence import SamplingParams, Sequence, SequenceStatus

EOS = 999


def make_scheduler(num_blocks=64, block_size=4, **cfg) -> Scheduler:
    cfg.setdefault("max_model_len", 256)
    return Scheduler(SchedulerConfig(**cfg), BlockPool(num_blocks, block_size))


def make_seq(
    rid: str, prompt_len: int, max_tokens: int = 4, priority: int = 0, **params
) -> Sequence:
    params.setdefault("ignore_eos", True)
    sp = SamplingParams(max_tokens=max_tokens, temperature=0, **params)
    return Sequence(rid, list(range(1, prompt_len + 1)), sp, priority=priority)


def fake_step(s: Scheduler, out: SchedulerOutput) -> list[Sequence]:
    """What the model would do: sample last token + 1 for every chunk that samples."""
    sampled = {}
    for item in out.scheduled:
        if item.sample:
            last = item.seq.token_slice(
                item.num_tokens + item.start - 1, item.start + item.num_tokens
            )
            sampled[item.seq.request_id] = last[0] + 1
    return s.update(out, sampled, eos_token_ids=frozenset({EOS}))


def run_to_completion(s: Scheduler, max_steps: int = 1000) -> list[SchedulerOutput]:
    steps = []
    for _ in range(max_steps):
        if not s.has_work:
            return steps
        out = s.schedule()
        steps.append(out)
        fake_step(s, out)
    raise AssertionError("scheduler did not finish")


def assert_no_leak(s: Scheduler) -> None:
    assert s.pool.num_free == s.pool.num_blocks
    assert s.pool.num_used == 0
    assert not s.waiting and not s.running and not s.importing


def test_budget_respected_and_chunked_prefill():
    s = make_scheduler(max_num_batched_tokens=10)
    seqs = [make_seq(f"r{i}", n, max_tokens=5) for i, n in enumerate([23, 3, 17, 1])]
    for q in seqs:
        s.add(q)
    steps = run_to_completion(s)
    assert all(0 < st.num_batched_tokens <= 10 for st in steps)
    assert any(p.num_tokens < p.seq.num_prompt_tokens for st in steps for p in st.prefills)
    for q in seqs:
        assert q.status is SequenceStatus.FINISHED_LENGTH
        n = q.num_prompt_tokens
        assert q.output_token_ids == list(range(n + 1, n + 6))  # continuity across chunks
    assert_no_leak(s)


def test_mixed_prefill_and_decode_in_one_step():
    s = make_scheduler(max_num_batched_tokens=16)
    s.add(make_seq("a", 4, max_tokens=10))
    fake_step(s, s.schedule())  # a prefilled, now decoding
    s.add(make_seq("b", 8))
    out = s.schedule()
    assert [d.seq.request_id for d in out.decodes] == ["a"]
    assert [p.seq.request_id for p in out.prefills] == ["b"]
    fake_step(s, out)
    run_to_completion(s)
    assert_no_leak(s)


def test_max_num_seqs_limits_running():
    s = make_scheduler(max_num_seqs=2)
    for i in range(5):
        s.add(make_seq(f"r{i}", 3))
    out = s.schedule()
    assert len(out.scheduled) == 2 and len(s.running) == 2
    fake_step(s, out)
    run_to_completion(s)
    assert_no_leak(s)


def test_preemption_by_recompute_when_blocks_run_out():
    # 6 blocks of 4 tokens = 24 slots; two sequences that each grow to 16 tokens can't both fit.
    s = make_scheduler(num_blocks=6, block_size=4, max_num_batched_tokens=64)
    a, b = make_seq("a", 8, max_tokens=8), make_seq("b", 8, max_tokens=8)
    s.add(a)
    s.add(b)
    steps = run_to_completion(s)
    preempted = [q.request_id for st in steps for q in st.preempted]
    assert "b" in preempted and "a" not in preempted  # the older request keeps running
    assert b.num_preemptions >= 1
    for q in (a, b):  # recompute gives the same continuation as no preemption
        assert q.output_token_ids == list(range(9, 17))
    assert_no_leak(s)


def test_priority_orders_admission_and_preemption():
    s = make_scheduler(max_num_seqs=1)
    s.add(make_seq("low", 3, priority=5))
    s.add(make_seq("high", 3, priority=0))
    out = s.schedule()
    assert [x.seq.request_id for x in out.scheduled] == ["high"]
    fake_step(s, out)
    run_to_completion(s)
    assert_no_leak(s)


def test_abort_waiting_running_and_mid_prefill_frees_blocks():
    s = make_scheduler(max_num_batched_tokens=8)
    a, b, c = make_seq("a", 20), make_seq("b", 4), make_seq("c", 4)
    for q in (a, b, c):
        s.add(q)
    fake_step(s, s.schedule())  # a is mid-prefill (8 of 20)
    assert a.status is SequenceStatus.RUNNING and a.is_prefill and a.block_table
    s.abort(a)
    s.abort(c)
    assert a.status is SequenceStatus.FINISHED_ABORTED and not a.block_table
    run_to_completion(s)
    assert b.status is SequenceStatus.FINISHED_LENGTH
    assert_no_leak(s)


def test_stop_on_eos_respects_min_tokens_and_stop_ids():
    s = make_scheduler()
    # prompt ends at 996, so outputs are 997, 998, 999(eos), 1000...
    eos_seq = Sequence("e", list(range(990, 997)), SamplingParams(max_tokens=10, temperature=0))
    min_seq = Sequence(
        "m", list(range(990, 997)), SamplingParams(max_tokens=10, temperature=0, min_tokens=4)
    )
    stop_seq = Sequence("s", [5], SamplingParams(max_tokens=10, temperature=0, stop_token_ids=(7,)))
    for q in (eos_seq, min_seq, stop_seq):
        s.add(q)
    run_to_completion(s)
    assert eos_seq.output_token_ids == [997, 998, 999]
    assert eos_seq.status is SequenceStatus.FINISHED_STOPPED
    assert min_seq.output_token_ids == [997, 998, 999, 1000, 1001, 1002, 1003, 1004, 1005, 1006]
    assert (
        stop_seq.output_token_ids == [6, 7] and stop_seq.status is SequenceStatus.FINISHED_STOPPED
    )
    assert_no_leak(s)


def test_hold_kv_keeps_blocks_until_released():
    s = make_scheduler()
    q = make_seq("h", 9, max_tokens=1)
    q.hold_kv = True
    s.add(q)
    run_to_completion(s)
    assert q.is_finished and len(q.block_table) == 3
    s.release(q)
    assert_no_leak(s)


def test_many_random_requests_never_leak():
    import random

    rng = random.Random(0)
    s = make_scheduler(num_blocks=20, block_size=4, max_num_batched_tokens=12, max_num_seqs=6)
    seqs = []
    for i in range(40):
        q = make_seq(f"r{i}", rng.randint(1, 30), max_tokens=rng.randint(1, 12))
        seqs.append(q)
        s.add(q)
        if rng.random() < 0.5:
            fake_step(s, s.schedule())
        if rng.random() < 0.1:
            s.abort(rng.choice(seqs))
        assert s.pool.num_used == sum(len(x.block_table) for x in seqs)
    run_to_completion(s)
    assert all(q.is_finished for q in seqs)
    assert_no_leak(s)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_num_seqs": 0},
        {"max_num_batched_tokens": 0},
        {"enable_chunked_prefill": False, "max_num_batched_tokens": 8},
    ],
)
def test_bad_config_is_a_clear_error(kwargs):
    with pytest.raises(ValueError):
        SchedulerConfig(max_model_len=256, **kwargs)


def test_batch_work_waits_for_interactive_but_ages_in_and_never_starves():
    s = make_scheduler(max_num_seqs=1, priority_aging_s=10.0)
    batch = make_seq("batch", 3, max_tokens=2, priority=10)
    batch.arrival_time = 0.0
    s.add(batch)
    ran = []
    for t in range(30):  # an interactive request arrives every step: full demand
        seq = make_seq(f"i{t}", 3, max_tokens=1)
        seq.arrival_time = float(t)
        s.add(seq)
        out = s.schedule(now=float(t))
        ran += [item.seq.request_id for item in out.scheduled]
        fake_step(s, out)
    first = ran.index("batch")
    assert first > 5  # interactive went first while the batch request was young
    assert first <= 12  # but once it waited priority_aging_s it ran, ahead of newer ones
    run_to_completion(s)
    assert batch.is_finished
