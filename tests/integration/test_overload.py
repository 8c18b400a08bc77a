"""Overload on a real tiny-model server: offered 3x its measured capacity for a few seconds,
it stays up, the router's memory stays bounded, every admitted request completes whole, and
the excess is rejected with 429 + Retry-After, much faster than an admitted request takes."""

from __future__ import annotations

import asyncio
import statistics
import urllib.request

import pytest

from tests.factories import make_tiny_model, make_tiny_tokenizer
from tideserve.bench.overload import RssSampler, measure_capacity, offer
from tideserve.launcher import ServeProcess

MAX_INFLIGHT = 4


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("tiny-overload"), vocab_size=259 + 5)
    return make_tiny_tokenizer(path)


def test_three_times_capacity_is_shed_not_suffered(tiny_dir):
    srv = ServeProcess(
        "--model", str(tiny_dir), "--mode", "colocated", "--dtype", "float32",
        "--kv-cache-bytes", str(1 << 24), "--served-model-name", "tiny",
        "--max-inflight", str(MAX_INFLIGHT),
    )  # fmt: skip
    with srv:
        router = next(p for p in srv.children if "router" in p.cmdline())
        cap = asyncio.run(measure_capacity(srv.url, "tiny", MAX_INFLIGHT, 2.0, 48))
        assert cap > 0
        with RssSampler(router.pid) as rss:
            out = asyncio.run(offer(srv.url, "tiny", 3 * cap, 4.0, 48, seed=1))
        with urllib.request.urlopen(srv.url + "/health", timeout=10) as r:
            assert r.status == 200  # still up
        s = out.summary()
        assert out.lost == 0 and not out.other, s
        assert out.completed + out.rejected == out.offered, s
        assert out.rejected > out.offered / 3, s  # 3x capacity: most of the excess is shed
        assert out.completed > 0 and out.missing_retry_after == 0, s
        assert statistics.median(out.rejected_latency_s) < 0.5 * statistics.median(
            out.admitted_latency_s
        ), s
        assert rss.peak - rss.baseline < 64 << 20, (rss.baseline, rss.peak)
    assert not srv.leftover_children()
