"""The router's Cluster alone (no sockets served): token order across the two paths of a
disaggregated request, and what a prefill worker's death means at each point."""

from __future__ import annotations

import os
import time

import pytest

from router.cluster import Cluster, Stream, Worker
from tideserve.protocol import PROTOCOL_VERSION, Hello, Params, TokenChunk


def _hello(wid: str, role: str) -> Hello:
    return Hello(
        PROTOCOL_VERSION, wid, role, "127.0.0.1", f"tcp://127.0.0.1:1{len(wid)}", "m", 100, 16,
        512, "cpu", os.getpid(), ("tcp",),
    )  # fmt: skip


_made: list[Cluster] = []


@pytest.fixture(autouse=True)
def _close_clusters():
    yield
    while _made:  # NOTE: an unclosed socket makes its context's finalizer hang the GC
        c = _made.pop()
        c.sock.close(0)
        c.ctx.term()


def _cluster(*workers: tuple[str, str]) -> Cluster:
    c = Cluster("tcp://127.0.0.1:0", 5.0, 2, ("tcp",))
    _made.append(c)
    for wid, role in workers:
        c.workers[wid] = Worker(_hello(wid, role), time.monotonic())
    return c


def _drain(s: Stream) -> list[int]:
    out = []
    while not s.queue.empty():
        out += s.queue.get_nowait().token_ids
    return out


async def test_decode_tokens_that_overtake_the_first_token_wait_for_it():
    c = _cluster(("p0", "prefill"), ("d0", "decode"))
    s = Stream("r", [1, 2, 3], Params(max_tokens=4), 0)
    c.submit(s)
    assert (s.prefill, s.target) == ("p0", "d0")
    c.handle_tokens(TokenChunk("r", "d0", [11]))
    c.handle_tokens(TokenChunk("r", "d0", [12]))
    assert _drain(s) == []  # held: the first token is not there yet
    c.handle_tokens(TokenChunk("r", "p0", [10], is_first=True))
    c.handle_tokens(TokenChunk("r", "d0", [13], finish_reason="length"))
    assert _drain(s) == [10, 11, 12, 13]
    assert not c.streams and not c.wire


async def test_prefill_death_before_its_first_token_arrives_moves_the_request():
    c = _cluster(("p0", "prefill"), ("p1", "prefill"), ("d0", "decode"))
    s = Stream("r", [1, 2, 3], Params(max_tokens=4), 0)
    c.submit(s)
    first_prefill = s.prefill
    c.handle_tokens(TokenChunk("r", "d0", [11]))  # the KV landed, the first token did not
    c._drop(first_prefill)
    assert s.dispatches == 2 and s.prefill not in (None, first_prefill)
    assert s.wire_id == "r~1" and _drain(s) == []
    c.handle_tokens(TokenChunk("r", "d0", [99]))  # the old dispatch's tokens are stale
    c.handle_tokens(TokenChunk("r~1", s.prefill, [10], is_first=True))
    assert _drain(s) == [10]


async def test_prefill_death_after_the_handoff_changes_nothing():
    c = _cluster(("p0", "prefill"), ("d0", "decode"))
    s = Stream("r", [1, 2, 3], Params(max_tokens=4), 0)
    c.submit(s)
    c.handle_tokens(TokenChunk("r", "p0", [10], is_first=True))
    c.handle_tokens(TokenChunk("r", "d0", [11]))
    c._drop("p0")
    assert s.dispatches == 1
    c.handle_tokens(TokenChunk("r", "d0", [12], finish_reason="length"))
    assert _drain(s) == [10, 11, 12]
