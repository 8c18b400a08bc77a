"""`tideserve bench` against a fake OpenAI streaming server with known, controlled delays.

The fake server (``tideserve.bench.fake_server``) runs in the test's event loop on 127.0.0.1
and notes when each request arrives; the bench must measure what the server was told to do.
Tolerances allow for a busy 2-core machine: lateness only ever adds time.
"""

from __future__ import annotations

import asyncio

import pytest

from tideserve.bench.fake_server import FakeServer, FakeServerConfig
from tideserve.bench.goodput import search_goodput
from tideserve.bench.metrics import Slo, slo_attainment, summarize_run
from tideserve.bench.prompts import PromptMaker
from tideserve.bench.runner import RunConfig, replay
from tideserve.bench.traces import TraceRequest
from tideserve.bench.transforms import scale_time

pytestmark = pytest.mark.usefixtures("quiet_gc")


async def run(cfg: FakeServerConfig, trace, slo: Slo | None = None, **kw):
    server = FakeServer(cfg)
    url = await server.start()
    try:
        res = await replay(
            trace,
            PromptMaker.token_ids(),
            RunConfig(url, cfg.model, show_progress=False),
            slo,
            **kw,
        )
    finally:
        await server.stop()
    leaked = [t for t in asyncio.all_tasks() if "_Run." in repr(t.get_coro())]
    assert leaked == []
    return res, server


async def test_ttft_tpot_e2e_match_the_servers_delays():
    trace = [TraceRequest(i * 0.02, 16, 11) for i in range(6)]
    res, _ = await run(FakeServerConfig(ttft_ms=50, itl_ms=10), trace)
    s = summarize_run(res.records, Slo(ttft_ms=1000, tpot_ms=100))
    assert s["num_completed"] == 6 and s["num_failed"] == 0
    assert 50 <= s["ttft_ms"]["p50"] < 150  # generous upper bounds: a shared, loaded CI box
    assert 10 <= s["tpot_ms"]["p50"] < 25
    assert 9 <= s["itl_ms"]["p50"] < 30
    assert 150 <= s["e2e_ms"]["p50"] < 400  # 50 + 10 gaps of 10 ms
    assert s["slo_attainment"] == 1.0
    assert summarize_run(res.records, Slo(ttft_ms=40))["slo_attainment"] == 0.0
    assert summarize_run(res.records, Slo(tpot_ms=8))["slo_attainment"] == 0.0
    assert all(r.num_output_tokens == 11 and r.finish_reason == "length" for r in res.records)
    assert s["lengths"]["num_output_mismatch"] == 0
    assert s["lengths"]["num_input_mismatch"] == 0


async def test_arrivals_are_open_loop_at_the_trace_times():
    # NOTE: wide gaps and tolerances: the suite shares 2 cores with other processes; what
    # matters is that each request leaves at its own time, not when the previous one ends.
    arrivals = [0.0, 0.2, 0.3, 0.6, 0.64, 0.66, 1.0]
    trace = [TraceRequest(t, 8, 150) for t in arrivals]  # each streams for ~1.5 s
    res, server = await run(FakeServerConfig(ttft_ms=50, itl_ms=10), trace)
    received = [t for t, _ in server.received]
    assert len(received) == len(arrivals)
    offsets = [t - received[0] for t in received]
    for got, want in zip(offsets, arrivals):
        assert got == pytest.approx(want, abs=0.06)
    first = res.records[0]
    assert all(r.send_s < first.end_s for r in res.records[1:])  # sent before #0 finished
    assert max(r.send_lag_ms for r in res.records) < 60


async def test_failed_requests_are_counted_and_listed():
    trace = [TraceRequest(i * 0.01, 8, 3) for i in range(9)]
    res, _ = await run(FakeServerConfig(fail_every=3), trace)
    s = summarize_run(res.records, Slo(ttft_ms=1000))
    assert (s["num_requests"], s["num_completed"], s["num_failed"]) == (9, 6, 3)
    assert [f["status"] for f in s["failures"]] == [500, 500, 500]
    assert all("injected failure" in f["error"] for f in s["failures"])
    assert s["slo_attainment"] == pytest.approx(6 / 9)


async def test_short_outputs_from_a_server_that_ignores_ignore_eos_are_reported():
    trace = [TraceRequest(0.0, 8, 10), TraceRequest(0.01, 8, 2)]
    res, _ = await run(FakeServerConfig(max_output_tokens=3), trace)
    lengths = summarize_run(res.records, Slo())["lengths"]
    assert lengths["num_output_mismatch"] == 1
    assert lengths["examples"][0]["received"] == 3
    assert lengths["examples"][0]["finish_reason"] == "stop"


async def test_worker_seconds_from_cluster_and_unknown_without_it():
    trace = [TraceRequest(i * 0.1, 8, 2) for i in range(13)]
    res, server = await run(FakeServerConfig(num_workers=3), trace)
    assert server.num_cluster_polls >= 1
    assert res.worker_seconds == pytest.approx(3 * res.wall_s, rel=0.1)
    res, _ = await run(FakeServerConfig(num_workers=None), trace[:3])
    assert res.worker_seconds is None


async def test_goodput_finds_the_servers_capacity():
    # 2 slots, each request holds one for 20 ms + 3 gaps of 5 ms = 35 ms: ~57 req/s at most.
    cfg = FakeServerConfig(ttft_ms=20, itl_ms=5, num_slots=2)
    slo = Slo(ttft_ms=45)
    base = [TraceRequest(i / 25, 8, 4) for i in range(30)]  # 25 req/s
    server = FakeServer(cfg)
    url = await server.start()
    run_cfg = RunConfig(url, cfg.model, show_progress=False)

    async def probe(m):
        res = await replay(scale_time(base, 1 / m), PromptMaker.token_ids(), run_cfg, slo, 3)
        return slo_attainment(res.records, slo)

    try:
        found = await search_goodput(probe, max_probes=6, rel_tol=0.05)
    finally:
        await server.stop()
    goodput = found.goodput_rps(base_rps=25.0)
    assert found.probes[0].attainment >= 0.9
    assert 20 <= goodput <= 80  # wide: the box is shared; the search itself is exact
    assert any(p.attainment < 0.9 for p in found.probes)
