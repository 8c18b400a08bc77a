"""KV transfer: real sender/receiver pairs on 127.0.0.1 (tcp, shm) and in-process (fake) move
KV bit-exactly, abort, refuse, time out, survive garbage, push back; then two tiny engines hand
a request over through tcp and decode exactly as one engine would."""

from __future__ import annotations

import logging
import os
import time
from itertools import count

import pytest
import torch
import zmq

from kv_transfer import (
    KVAbortEvent,
    KVBackpressure,
    KVBeginEvent,
    KVDoneEvent,
    KVLayerEvent,
    choose_transport,
    make_receiver,
    make_sender,
)
from tests.factories import run_engine
from tideserve.config import EngineConfig
from tideserve.engine.engine import LLMEngine
from tideserve.engine.sequence import SamplingParams
from tideserve.protocol import Hello, KVBegin, KVLayer, Params, TensorMeta, encode

DEADLINE_S = 5.0
TIMEOUT_S = 2.0
_rids = count()


class Pair:
    def __init__(self, transport: str, ctx: zmq.Context, prefix: str, **sender_kw) -> None:
        self.transport = transport
        self.receiver = make_receiver(transport, ctx, timeout_s=TIMEOUT_S)
        self.sender = make_sender(
            transport, ctx, timeout_s=TIMEOUT_S, shm_prefix=prefix, **sender_kw
        )

    def begin(self, layers: list[torch.Tensor], rid: str = "", prompt=(1, 2, 3)) -> str:
        rid = rid or f"req-{next(_rids)}"
        msg = kv_begin(rid, self.sender.reply_address, layers, prompt)
        self.sender.begin(self.receiver.address, msg)
        return rid

    def send(self, layers: list[torch.Tensor], first_token=7, rid="", prompt=(1, 2, 3)) -> str:
        rid = self.begin(layers, rid, prompt)
        for i, kv in enumerate(layers):
            self.sender.send_layer(rid, i, kv)
        self.sender.done(rid, [first_token])
        return rid

    def assert_no_leak(self) -> None:
        assert self.sender.num_inflight == 0 and self.sender.inflight_bytes == 0
        assert self.receiver.num_inflight == 0


def kv_begin(rid: str, reply: str, layers: list[torch.Tensor], prompt=(1, 2, 3)) -> KVBegin:
    kv = layers[0]
    meta = TensorMeta(str(kv.dtype).removeprefix("torch."), tuple(kv.shape))
    return KVBegin(
        rid, "prefill-0", reply, list(prompt), [], kv.shape[2], Params(8), 0, len(layers), meta
    )


def random_layers(n: int, tokens: int, dtype=torch.float32, kvh=2, hd=8) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(tokens * 31 + n)
    return [torch.randn(2, kvh, tokens, hd, generator=g).to(dtype) for _ in range(n)]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def shm_files(prefix: str) -> list[str]:
    return [f for f in os.listdir("/dev/shm") if f.startswith(prefix)]


def drain(receiver, until, deadline_s: float = DEADLINE_S) -> list:
    """Polls until `until(events)`; layer tensors are cloned at once (views die at next poll)."""
    events: list = []
    poller = zmq.Poller()
    for s in receiver.sockets:
        poller.register(s, zmq.POLLIN)
    end = time.monotonic() + deadline_s
    while not until(events):
        assert time.monotonic() < end, f"timed out; events so far: {events}"
        for ev in receiver.poll():
            if isinstance(ev, KVLayerEvent):
                ev = KVLayerEvent(ev.request_id, ev.layer, ev.tensor.clone())
            events.append(ev)
        if receiver.sockets and not until(events):
            poller.poll(20)
    return events


def wait_acks(sender, n: int, deadline_s: float = DEADLINE_S) -> list:
    acks: list = []
    end = time.monotonic() + deadline_s
    while len(acks) < n:
        assert time.monotonic() < end, f"timed out waiting for {n} acks, got {acks}"
        acks += sender.poll_acks()
        time.sleep(0.005)
    return acks


def count_done(n: int):
    return lambda evs: sum(isinstance(e, KVDoneEvent | KVAbortEvent) for e in evs) >= n


@pytest.fixture
def ctx():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture
def prefix() -> str:
    return f"tskvtest{os.getpid()}_"


@pytest.fixture(params=["tcp", "shm", "fake"])
def pair(request, ctx, prefix):
    p = Pair(request.param, ctx, prefix)
    yield p
    p.sender.close()
    p.receiver.close()
    assert shm_files(prefix) == []


@pytest.fixture(params=["tcp", "shm"])
def wire_pair(request, ctx, prefix):
    p = Pair(request.param, ctx, prefix)
    yield p
    p.sender.close()
    p.receiver.close()
    assert shm_files(prefix) == []


# -- the happy path ----------------------------------------------------------------------------


def test_concurrent_requests_arrive_bit_exact_in_every_dtype(pair):
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    sent = {}
    for i, dtype in enumerate(dtypes):  # begun together, layers interleaved
        layers = random_layers(4, tokens=5 + 11 * i, dtype=dtype)
        sent[pair.begin(layers)] = layers
    for layer in range(4):
        for rid, layers in sent.items():
            pair.sender.send_layer(rid, layer, layers[layer])
    for j, rid in enumerate(sent):
        pair.sender.done(rid, [100 + j])

    events = drain(pair.receiver, count_done(3))
    got = {(e.request_id, e.layer): e.tensor for e in events if isinstance(e, KVLayerEvent)}
    assert len(got) == 12
    for rid, layers in sent.items():
        for i, kv in enumerate(layers):
            assert got[rid, i].dtype == kv.dtype and torch.equal(bits(got[rid, i]), bits(kv))
    begins = [e.msg.request_id for e in events if isinstance(e, KVBeginEvent)]
    dones = {e.request_id: e.output_token_ids for e in events if isinstance(e, KVDoneEvent)}
    assert sorted(begins) == sorted(sent) and sorted(dones) == sorted(sent)
    assert [dones[rid] for rid in sent] == [(100,), (101,), (102,)]

    for rid in sent:
        pair.receiver.ack(rid, True)
    acks = wait_acks(pair.sender, 3)
    assert sorted(a.request_id for a in acks) == sorted(sent) and all(a.ok for a in acks)
    pair.assert_no_leak()


def test_empty_and_non_contiguous_layers(wire_pair):
    empty = random_layers(3, tokens=0, dtype=torch.bfloat16)
    base = torch.randn(3, 2, 2, 6, 16)
    strided = [base[i].transpose(1, 2)[..., ::2] for i in range(3)]  # [2, 6, 2, 8], strided
    assert not strided[0].is_contiguous()
    rids = [wire_pair.send(empty), wire_pair.send(strided)]

    events = drain(wire_pair.receiver, count_done(2))
    got = {(e.request_id, e.layer): e.tensor for e in events if isinstance(e, KVLayerEvent)}
    for i in range(3):
        assert got[rids[0], i].shape == (2, 2, 0, 8)
        assert torch.equal(got[rids[1], i], strided[i])
    for rid in rids:
        wire_pair.receiver.ack(rid, True)
    wait_acks(wire_pair.sender, 2)
    wire_pair.assert_no_leak()


def test_shm_segments_are_reused_after_ok_acks_and_unlinked_at_close(ctx, prefix):
    p = Pair("shm", ctx, prefix)
    segments = []
    for tokens in (16, 12):  # the second fits in the first's segment
        layers = random_layers(3, tokens=tokens)
        rid = p.send(layers)
        events = drain(p.receiver, count_done(1))
        got = [e.tensor for e in events if isinstance(e, KVLayerEvent)]
        assert all(torch.equal(a, b) for a, b in zip(got, layers, strict=True))
        p.receiver.ack(rid, True)
        wait_acks(p.sender, 1)
        segments.append(shm_files(prefix))
    assert len(segments[0]) == 1 and segments[1] == segments[0]
    assert p.receiver.shm.num_mapped == 1  # kept mapped while the sender keeps it
    p.sender.close()
    assert shm_files(prefix) == []
    p.receiver.poll()
    assert p.receiver.shm.num_mapped == 0  # and let go once the sender unlinked it
    p.receiver.close()

    strict = Pair("shm", ctx, prefix, shm_pool_bytes=0)
    rid = strict.send(random_layers(2, tokens=4))
    drain(strict.receiver, count_done(1))
    strict.receiver.ack(rid, True)
    wait_acks(strict.sender, 1)
    assert shm_files(prefix) == []
    strict.sender.close()
    strict.receiver.close()


# -- ending early ------------------------------------------------------------------------------


def test_abort_mid_transfer_reaches_receiver_and_frees_the_segment(wire_pair, prefix):
    layers = random_layers(4, tokens=9)
    rid = wire_pair.begin(layers)
    for i in range(2):
        wire_pair.sender.send_layer(rid, i, layers[i])
    events = drain(wire_pair.receiver, lambda evs: len(evs) == 3)
    assert [type(e) for e in events] == [KVBeginEvent, KVLayerEvent, KVLayerEvent]
    assert len(shm_files(prefix)) == (wire_pair.transport == "shm")
    wire_pair.sender.abort(rid, "client went away")
    assert shm_files(prefix) == []

    [ev] = drain(wire_pair.receiver, count_done(1))
    assert ev == KVAbortEvent(rid, "client went away")
    wire_pair.sender.send_layer(rid, 2, layers[2])  # settled: a no-op
    wire_pair.receiver.ack(rid, False, "late")  # settled: a no-op
    assert wire_pair.sender.poll_acks() == [] and wire_pair.receiver.poll() == []
    wire_pair.assert_no_leak()


def test_layers_of_a_freed_segment_fail_the_transfer_cleanly(ctx, prefix):
    p = Pair("shm", ctx, prefix)
    layers = random_layers(2, tokens=5)
    rid = p.send(layers)
    p.sender.abort(rid, "gone before the receiver looked")  # unlinks the segment at once
    events = drain(p.receiver, count_done(1))
    assert [type(e) for e in events] == [KVBeginEvent, KVAbortEvent]
    assert "gone" in events[-1].reason
    p.assert_no_leak()
    p.sender.close()
    p.receiver.close()


def test_refusal_round_trips_and_late_layers_are_dropped(pair, prefix):
    layers = random_layers(3, tokens=4)
    rid = pair.begin(layers)
    drain(pair.receiver, lambda evs: any(isinstance(e, KVBeginEvent) for e in evs))
    pair.receiver.ack(rid, False, "no free KV blocks")
    [ack] = wait_acks(pair.sender, 1)
    assert (ack.request_id, ack.ok, ack.reason) == (rid, False, "no free KV blocks")
    assert shm_files(prefix) == []
    for i, kv in enumerate(layers):  # the prefill's forward pass goes on: no-ops now
        pair.sender.send_layer(rid, i, kv)
    pair.sender.done(rid)
    assert pair.receiver.poll() == []
    pair.assert_no_leak()


def test_stalled_transfers_expire_on_both_sides(wire_pair, prefix):
    layers = random_layers(2, tokens=3)
    unacked = wire_pair.send(layers)  # complete, but the receiver never acks
    stalled = wire_pair.begin(layers)  # KVDone never comes
    wire_pair.sender.send_layer(stalled, 0, layers[0])
    drain(wire_pair.receiver, lambda evs: sum(isinstance(e, KVLayerEvent) for e in evs) == 3)

    now = time.monotonic()
    assert wire_pair.sender.expired(now) == [] and wire_pair.receiver.expired(now) == []
    later = now + TIMEOUT_S + 1
    assert wire_pair.receiver.expired(later) == [stalled]  # done ones wait for the worker
    [nack] = wait_acks(wire_pair.sender, 1)
    assert nack.request_id == stalled and not nack.ok and "timed out" in nack.reason
    assert wire_pair.sender.expired(later) == [unacked]
    assert shm_files(prefix) == []
    wire_pair.receiver.ack(unacked, True)
    assert wire_pair.sender.poll_acks() == []  # a late ack for an expired transfer
    wire_pair.assert_no_leak()


# -- bad input and limits ----------------------------------------------------------------------


def test_malformed_frames_are_dropped_and_the_receiver_keeps_working(ctx, prefix, caplog):
    p = Pair("tcp", ctx, prefix)
    push = ctx.socket(zmq.PUSH)
    push.connect(p.receiver.address)
    layers = random_layers(2, tokens=4)
    victim = p.begin(layers)
    drain(p.receiver, lambda evs: len(evs) == 1)  # the KVBegin is in before the garbage
    garbage = [
        [b"not msgpack at all"],
        [b"\x93\xa8kv_layer\x01"],  # truncated struct
        encode(KVLayer("nobody", 0, TensorMeta("float32", (2, 2, 4, 8)))) + [b"x" * 256],
        encode(Hello(1, "w", "decode", "h", "", "m", 1, 16, 64, "cpu", 1)),
        encode(KVLayer(victim, 0, TensorMeta("float32", (2, 2, 4, 8)))) + [b"short"],
    ]
    with caplog.at_level(logging.WARNING):
        for frames in garbage:
            push.send_multipart(frames)
        events = drain(p.receiver, count_done(1))
    assert [type(e) for e in events] == [KVAbortEvent]  # the bad layer fails the transfer
    [nack] = wait_acks(p.sender, 1)
    assert nack.request_id == victim and not nack.ok
    assert sum("dropped" in r.message for r in caplog.records) >= 3

    rid = p.send(layers)
    events = drain(p.receiver, count_done(1))
    assert sum(isinstance(e, KVLayerEvent) for e in events) == 2
    p.receiver.ack(rid, True)
    assert wait_acks(p.sender, 1)[0].ok
    p.assert_no_leak()
    push.close(0)
    p.sender.close()
    p.receiver.close()


def test_begin_beyond_max_inflight_bytes_raises_backpressure(ctx, prefix):
    layers = random_layers(2, tokens=8)  # 2 x 1 KiB
    p = Pair("shm", ctx, prefix, max_inflight_bytes=3 * 1024)
    first = p.send(layers)
    with pytest.raises(KVBackpressure, match="max_inflight_bytes"):
        p.begin(layers)
    assert len(shm_files(prefix)) == 1  # the refused one allocated nothing
    drain(p.receiver, count_done(1))
    p.receiver.ack(first, True)
    wait_acks(p.sender, 1)
    p.send(random_layers(6, tokens=8))  # larger than the budget, but alone: it goes
    with pytest.raises(KVBackpressure):
        p.begin(layers)
    p.sender.close()
    p.receiver.close()
    assert shm_files(prefix) == []


def test_misuse_is_a_clear_error_and_a_bad_address_a_nack(ctx, prefix):
    p = Pair("tcp", ctx, prefix)
    layers = random_layers(2, tokens=3)
    with pytest.raises(ValueError, match="reply_address"):
        p.sender.begin(p.receiver.address, kv_begin("x", "tcp://elsewhere:1", layers))
    rid = p.begin(layers)
    with pytest.raises(ValueError, match="does not match"):
        p.sender.send_layer(rid, 0, layers[0][:, :, :2])
    with pytest.raises(ValueError, match="already in flight"):
        p.begin(layers, rid)
    p.sender.abort(rid, "test")
    bad = "req-bad-address"
    p.sender.begin("bogus://nowhere", kv_begin(bad, p.sender.reply_address, layers))
    [nack] = p.sender.poll_acks()
    assert nack.request_id == bad and not nack.ok and "failed" in nack.reason
    p.assert_no_leak()
    with pytest.raises(ValueError, match="unknown KV transport"):
        make_sender("carrier-pigeon", ctx)
    p.sender.close()
    p.receiver.close()


def test_choose_transport():
    assert choose_transport("node1", "node1", ("shm", "tcp")) == "shm"
    assert choose_transport("127.0.0.1", "localhost", ("shm", "tcp")) == "shm"
    assert choose_transport("node1", "node1", ("tcp",)) == "tcp"
    assert choose_transport("node1", "node2", ("shm", "tcp")) == "tcp"
    with pytest.raises(ValueError, match="no common KV transport"):
        choose_transport("node1", "node2", ("shm",))


# -- two engines -------------------------------------------------------------------------------

GREEDY = dict(temperature=0.0, ignore_eos=True)


def prefill(engine: LLMEngine, rid: str, prompt: list[int]) -> tuple[int, list[torch.Tensor]]:
    engine.add_request(rid, prompt, SamplingParams(max_tokens=1, **GREEDY), hold_kv=True)
    [first] = run_engine(engine)[rid]
    layers = [engine.export_kv_layer(rid, i) for i in range(engine.model_config.num_layers)]
    return first, layers


def test_two_engines_hand_over_a_request_through_tcp(tiny_model_dir, ctx, prefix):
    new_engine = lambda: LLMEngine.from_config(
        EngineConfig(model=str(tiny_model_dir), kv_cache_bytes=1 << 22)
    )
    a, b = new_engine(), new_engine()
    prompt = [(17 * i) % 500 + 3 for i in range(45)]
    a.add_request("ref", prompt, SamplingParams(max_tokens=12, **GREEDY))
    expected = run_engine(a)["ref"]

    p = Pair("tcp", ctx, prefix)
    first, layers = prefill(a, "r1", prompt)
    rid = p.send(layers, first, "r1", prompt)
    for ev in drain(p.receiver, count_done(1)):
        if isinstance(ev, KVBeginEvent):
            m = ev.msg
            params = SamplingParams(max_tokens=12, **GREEDY)
            assert b.begin_import(rid, m.prompt_token_ids, [], m.num_kv_tokens, params)
        elif isinstance(ev, KVLayerEvent):
            b.import_kv_layer(rid, ev.layer, ev.tensor)
        elif isinstance(ev, KVDoneEvent):
            b.finish_import(rid, list(ev.output_token_ids))
            p.receiver.ack(rid, True)
    assert wait_acks(p.sender, 1)[0].ok
    a.release(rid)
    assert run_engine(b)[rid] == expected

    _, layers = prefill(a, "r2", prompt)
    aborted = p.begin(layers, "r2", prompt)
    p.sender.send_layer(aborted, 0, layers[0])
    p.sender.abort(aborted, "the router cancelled it")
    a.release(aborted)
    for ev in drain(p.receiver, count_done(1)):
        if isinstance(ev, KVBeginEvent):
            assert b.begin_import(aborted, prompt, [], len(prompt), SamplingParams(max_tokens=4))
            assert b.num_free_blocks < b.num_total_blocks
        elif isinstance(ev, KVLayerEvent):
            b.import_kv_layer(aborted, ev.layer, ev.tensor)
        elif isinstance(ev, KVAbortEvent):
            assert b.abort(aborted)
    for name, e in (("a", a), ("b", b)):
        assert (name, e.num_free_blocks, e.seqs) == (name, e.num_total_blocks, {})
    p.assert_no_leak()
    p.sender.close()
    p.receiver.close()


def test_segments_of_dead_senders_are_removed_at_start(tmp_path):
    """SIGKILL skips close(): the next sender on the host unlinks what the dead one left."""
    import subprocess
    import sys

    from kv_transfer.shm import remove_orphans

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    for name in (f"tsorph_{dead}_0_abc", f"tsorph_{os.getpid()}_0_abc", "tsorph_x_0", "other"):
        (tmp_path / name).write_bytes(b"x")
    assert remove_orphans("tsorph_", str(tmp_path)) == [f"tsorph_{dead}_0_abc"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "other", f"tsorph_{os.getpid()}_0_abc", "tsorph_x_0"
    ]  # fmt: skip
