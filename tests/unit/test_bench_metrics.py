"""Pure parts of `tideserve bench`: per-request metrics, summary, worker-seconds, goodput search."""

from __future__ import annotations

import pytest

from tideserve.bench.cost import count_workers, integrate
from tideserve.bench.goodput import search_goodput
from tideserve.bench.metrics import RequestRecord, Slo, summarize_run


def record(index=0, *, ttft_ms=50.0, tpot_ms=10.0, n=11, scheduled_s=0.0, lag_ms=1.0, **kw):
    send = scheduled_s + lag_ms / 1e3
    first = send + ttft_ms / 1e3
    last = first + tpot_ms * (n - 1) / 1e3
    fields = dict(
        send_s=send,
        first_token_s=first,
        last_token_s=last,
        end_s=last + 0.001,
        num_output_tokens=n,
        status=200,
        itl_ms=[tpot_ms] * (n - 1),
    )
    fields.update(kw)
    return RequestRecord(index, scheduled_s, 100, n, 100, **fields)


def test_request_metrics_follow_the_distserve_definitions():
    r = record(ttft_ms=50, tpot_ms=10, n=11, lag_ms=2)
    assert r.ttft_ms == pytest.approx(50)
    assert r.tpot_ms == pytest.approx(10)
    assert r.e2e_ms == pytest.approx(50 + 100 + 1)
    assert r.send_lag_ms == pytest.approx(2)
    one = record(n=1)
    assert one.tpot_ms is None and one.meets(Slo(100, 1))


def test_summary_counts_failures_against_attainment_and_lists_them():
    records = [record(i, ttft_ms=40 + 10 * i, scheduled_s=i * 0.1) for i in range(8)]
    records.append(
        RequestRecord(8, 0.8, 100, 11, 100, send_s=0.8, end_s=0.81, status=500, error="HTTP 500")
    )
    records.append(RequestRecord(9, 0.9, 100, 11, 100))  # never sent
    s = summarize_run(records, Slo(ttft_ms=75, tpot_ms=12), worker_seconds=3.0)
    assert (s["num_requests"], s["num_completed"], s["num_failed"], s["num_unsent"]) == (
        10,
        8,
        1,
        1,
    )
    assert s["slo_attainment"] == pytest.approx(4 / 10)  # ttft 40, 50, 60, 70 ms pass
    assert s["failures"] == [{"index": 8, "status": 500, "error": "HTTP 500", "send_s": 0.8}]
    assert s["ttft_ms"]["p50"] == pytest.approx(70)  # nearest rank of 40..110
    assert s["ttft_ms"]["p90"] == pytest.approx(110)
    assert s["ttft_ms"]["mean"] == pytest.approx(75)
    assert s["tpot_ms"]["p99"] == pytest.approx(10)
    assert s["worker_seconds"] == 3.0
    assert s["offered_rps"] == pytest.approx(10 / 0.9)
    assert s["output_tokens_per_s"] == pytest.approx(8 * 11 / s["duration_s"])
    assert summarize_run(records, Slo())["slo_attainment"] is None


def test_length_mismatches_are_reported():
    ok = record(0, n=11)
    short = record(1, n=3, finish_reason="stop")
    short.output_tokens = 11
    other_prompt = record(2, server_prompt_tokens=98)
    lengths = summarize_run([ok, short, other_prompt], Slo())["lengths"]
    assert lengths["num_output_mismatch"] == 1
    assert lengths["num_input_checked"] == 1 and lengths["num_input_mismatch"] == 1
    assert {e["index"] for e in lengths["examples"]} == {1, 2}


def test_worker_seconds_integrate_a_step_function():
    assert integrate([(0.5, 1), (1.0, 3), (2.0, 2)], end_s=2.5) == pytest.approx(5.0)
    assert integrate([(-0.05, 2)], end_s=1.0) == pytest.approx(2.0)
    assert integrate([(0.1, 1), (5.0, 2)], end_s=3.0) == pytest.approx(3.0)


def test_count_workers_from_cluster_and_metrics():
    assert count_workers("/cluster", b'{"workers": [{"id": "a"}, {"id": "b"}]}') == 2
    assert count_workers("/cluster", b"<html>") is None
    metrics = (
        b"# HELP tideserve_worker_kv_blocks_total KV blocks\n"
        b'tideserve_worker_kv_blocks_total{worker="p0",role="prefill"} 100.0\n'
        b'tideserve_worker_kv_blocks_total{worker="d0",role="decode"} 100.0\n'
    )
    assert count_workers("/metrics", metrics) == 2
    assert count_workers("/metrics", b"other_metric 1\n") is None


async def test_goodput_search_brackets_then_bisects():
    capacity = 3.3
    seen = []

    async def probe(m):
        seen.append(m)
        return 1.0 if m <= capacity else 0.5

    found = await search_goodput(probe, max_probes=10, rel_tol=0.02)
    assert seen[:3] == [1.0, 2.0, 4.0]
    assert capacity / 1.02 <= found.multiplier <= capacity < found.upper <= capacity * 1.02
    assert found.goodput_rps(base_rps=10.0) == pytest.approx(10 * found.multiplier)
    assert len(found.probes) <= 10


async def test_goodput_search_goes_down_and_can_find_nothing():
    async def probe(m):
        return 0.95 if m <= 0.3 else 0.0

    found = await search_goodput(probe, max_probes=8, rel_tol=0.05)
    assert 0.3 / 1.05 <= found.multiplier <= 0.3

    async def never(m):
        return 0.0

    none = await search_goodput(never, max_probes=3)
    assert none.multiplier is None and none.goodput_rps(5.0) == 0.0 and none.upper == 0.25

    async def always(m):
        return 1.0

    unbounded = await search_goodput(always, max_probes=3)
    assert (unbounded.multiplier, unbounded.upper) == (4.0, None)
    assert [p.multiplier for p in none.probes] == [1.0, 0.5, 0.25]
