"""The gloo transport (the nccl code on CPU tensors) between two real processes on 127.0.0.1:
layer-wise KV arrives bit-exact in bf16 and fp32, the pair is made on demand, a new pair forms
after one leaves, and a peer that dies fails its transfers with a clear reason in bounded time.
With CUDA, the same exchange runs over nccl (marked gpu).

The far end runs in a child process (`python -m tests.unit.test_kv_dist ROLE ...`), started
before it is needed so that its torch import overlaps the test's own work.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import zmq

from kv_transfer import (
    KVAbortEvent,
    KVBeginEvent,
    KVDoneEvent,
    KVLayerEvent,
    choose_transport,
    dist_available,
    make_receiver,
    make_sender,
)
from tideserve.protocol import KVBegin, KVPairClose, KVPairOffer, Params, TensorMeta, decode, encode
from tideserve.roles.host import offered_transports

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 2.0  # a transfer or a pair op that makes no progress this long fails
DEADLINE_S = 8.0  # the longest any test waits for anything
SHAPES = [(torch.bfloat16, 3, 5), (torch.float32, 2, 17)]  # (dtype, layers, tokens)

pytestmark = pytest.mark.skipif(not dist_available("gloo"), reason="torch without gloo")


def layers_for(index: int, dtype: torch.dtype, num_layers: int, tokens: int) -> list:
    g = torch.Generator().manual_seed(1000 + index)
    return [torch.randn(2, 2, tokens, 8, generator=g).to(dtype) for _ in range(num_layers)]


def kv_begin(rid: str, reply: str, layers: list[torch.Tensor]) -> KVBegin:
    kv = layers[0]
    meta = TensorMeta(str(kv.dtype).removeprefix("torch."), tuple(kv.shape))
    return KVBegin(rid, "p0", reply, [1, 2], [], kv.shape[2], Params(4), 0, len(layers), meta)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


# -- the child process -------------------------------------------------------------------------


def child_send(address: str, backend: str, first: int, count: int, die_mid: bool) -> int:
    """Waits for a line on stdin, then sends `count` transfers (data by index) and waits for
    their acks; with `die_mid`, exits abruptly after the first layer of its last transfer."""
    sys.stdin.readline()
    ctx = zmq.Context()
    dev = "cuda" if backend == "nccl" else "cpu"
    sender = make_sender(backend, ctx, timeout_s=TIMEOUT_S, device=dev, connect_timeout_s=5.0)
    for i in range(first, first + count):
        dtype, n, t = SHAPES[i % len(SHAPES)]
        layers = [x.to(dev) for x in layers_for(i, dtype, n, t)]
        rid = f"req-{i}"
        sender.begin(address, kv_begin(rid, sender.reply_address, layers))
        for j, kv in enumerate(layers):
            sender.send_layer(rid, j, kv)
            if die_mid and i == first + count - 1:
                time.sleep(0.3)  # let the first layer and its notice go
                os._exit(3)
        sender.done(rid, [i])
        end = time.monotonic() + DEADLINE_S
        acks = []
        while not acks:
            acks = sender.poll_acks()
            if time.monotonic() > end:
                print("no ack", flush=True)
                return 1
            time.sleep(0.002)
        if not acks[0].ok:
            print(f"nack: {acks[0].reason}", flush=True)
            return 1
    sender.close()
    ctx.destroy(linger=500)
    print("ok", flush=True)
    return 0


def child_recv(backend: str, die_at_begin: int) -> int:
    """Prints its address; receives transfers and acks them; exits abruptly at the KVBegin of
    transfer number `die_at_begin` (0-based)."""
    ctx = zmq.Context()
    receiver = make_receiver(backend, ctx, timeout_s=TIMEOUT_S, connect_timeout_s=5.0)
    print(receiver.address, flush=True)
    begun = 0
    end = time.monotonic() + DEADLINE_S
    while time.monotonic() < end:
        for ev in receiver.poll():
            if isinstance(ev, KVBeginEvent):
                if begun == die_at_begin:
                    os._exit(3)
                begun += 1
            elif isinstance(ev, KVDoneEvent):
                receiver.ack(ev.request_id, True)
        time.sleep(0.002)
    return 0


def spawn(*args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tests.unit.test_kv_dist", *args]
    return subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def go(proc: subprocess.Popen) -> None:
    proc.stdin.write("go\n")
    proc.stdin.flush()


# -- the parent side ---------------------------------------------------------------------------


@pytest.fixture
def ctx():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def pump(receiver, until, deadline_s: float = DEADLINE_S) -> list:
    """Polls until `until(events)`; layers are cloned at once, done transfers acked ok."""
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
            elif isinstance(ev, KVDoneEvent):
                receiver.ack(ev.request_id, True)
            events.append(ev)
        for rid in receiver.expired(time.monotonic()):
            events.append(KVAbortEvent(rid, "expired"))
        poller.poll(20)
    return events


def finished(n: int):
    return lambda evs: sum(isinstance(e, KVDoneEvent | KVAbortEvent) for e in evs) >= n


def check_arrived(events: list, index: int) -> None:
    dtype, n, t = SHAPES[index % len(SHAPES)]
    rid = f"req-{index}"
    got = {e.layer: e.tensor for e in events if isinstance(e, KVLayerEvent) and e.request_id == rid}
    want = layers_for(index, dtype, n, t)
    assert sorted(got) == list(range(n))
    for j in range(n):
        assert got[j].dtype == dtype and torch.equal(bits(got[j]), bits(want[j])), (rid, j)
    done = [e for e in events if isinstance(e, KVDoneEvent) and e.request_id == rid]
    assert done and done[0].output_token_ids == (index,)
    last_layer = max(i for i, e in enumerate(events) if getattr(e, "request_id", "") == rid
                     and isinstance(e, KVLayerEvent))  # fmt: skip
    assert events.index(done[0]) > last_layer  # KVDone only after every layer


def wait_exit(proc: subprocess.Popen) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=DEADLINE_S)
    return proc.returncode, out


def test_gloo_pairs_form_on_demand_and_move_kv_bit_exact(ctx):
    first, second = spawn("send", "?", "gloo", "0", "2"), spawn("send", "?", "gloo", "2", "1")
    receiver = make_receiver("gloo", ctx, timeout_s=TIMEOUT_S, connect_timeout_s=5.0)
    try:
        for p in (first, second):  # the address only exists now: hand it over on stdin
            p.stdin.write(receiver.address + "\n")
        assert receiver.pairs == {}  # no pair before the first transfer
        go(first)
        events = pump(receiver, finished(2))
        check_arrived(events, 0)  # bf16
        check_arrived(events, 1)  # fp32
        assert wait_exit(first) == (0, "ok\n")
        pump(receiver, lambda _: not receiver.pairs)  # the sender left: its KVPairClose
        go(second)
        events = pump(receiver, finished(1))
        check_arrived(events, 2)
        assert len(receiver.pairs) == 1  # a new pair with the new sender
        assert wait_exit(second) == (0, "ok\n")
        assert receiver.num_inflight == 0
    finally:
        receiver.close()
        for p in (first, second):
            p.kill()


def test_a_sender_that_dies_mid_transfer_fails_it_at_the_receiver(ctx):
    proc = spawn("send", "?", "gloo", "0", "2", "die")
    receiver = make_receiver("gloo", ctx, timeout_s=TIMEOUT_S, connect_timeout_s=5.0)
    try:
        proc.stdin.write(receiver.address + "\n")
        go(proc)
        t0 = time.monotonic()
        events = pump(receiver, finished(2))
        check_arrived(events, 0)
        aborts = [e for e in events if isinstance(e, KVAbortEvent)]
        assert [e.request_id for e in aborts] == ["req-1"]
        assert time.monotonic() - t0 < TIMEOUT_S + 4.0  # bounded: no hang
        assert wait_exit(proc)[0] == 3
        assert receiver.num_inflight == 0
    finally:
        receiver.close()
        proc.kill()


def test_a_receiver_that_dies_fails_the_senders_transfer_with_a_clear_reason(ctx):
    proc = spawn("recv", "gloo", "1")
    sender = make_sender("gloo", ctx, timeout_s=TIMEOUT_S, connect_timeout_s=5.0)
    try:
        address = proc.stdout.readline().strip()
        layers = layers_for(0, torch.bfloat16, 3, 5)

        def transfer(rid: str) -> list:
            sender.begin(address, kv_begin(rid, sender.reply_address, layers))
            for j, kv in enumerate(layers):
                sender.send_layer(rid, j, kv)
            sender.done(rid, [1])
            end, acks = time.monotonic() + DEADLINE_S, []
            while not acks:
                assert time.monotonic() < end, "no ack: the sender hangs"
                acks = sender.poll_acks()
                for rid2 in sender.expired(time.monotonic()):
                    acks.append(("expired", rid2))
                time.sleep(0.005)
            return acks

        assert [a.ok for a in transfer("a")] == [True]
        t0 = time.monotonic()
        acks = transfer("b")  # the receiver exits at this KVBegin
        assert time.monotonic() - t0 < TIMEOUT_S + 4.0
        assert len(acks) == 1 and not isinstance(acks[0], tuple), acks
        assert not acks[0].ok and "KV pair failed" in acks[0].reason, acks[0]
        assert sender.num_inflight == 0 and sender.pairs == {}
    finally:
        sender.close()
        proc.kill()


def test_a_pair_offer_for_another_backend_is_refused(ctx):
    receiver = make_receiver("gloo", ctx, timeout_s=TIMEOUT_S)
    reply = ctx.socket(zmq.PULL)
    port = reply.bind_to_random_port("tcp://127.0.0.1")
    push = ctx.socket(zmq.PUSH)
    push.connect(receiver.address)
    try:
        push.send_multipart(
            encode(KVPairOffer("p1", "nccl", "127.0.0.1", 1, f"tcp://127.0.0.1:{port}"))
        )
        pump(receiver, lambda _: reply.poll(0), deadline_s=3.0)
        msg, _ = decode(reply.recv_multipart())
        assert isinstance(msg, KVPairClose) and msg.pair_id == "p1" and "gloo" in msg.reason
        assert receiver.pairs == {}
    finally:
        push.close(0)
        reply.close(0)
        receiver.close()


def test_nccl_is_chosen_only_when_both_workers_are_on_cuda_and_offer_it():
    both = ("nccl", "shm", "tcp")
    assert choose_transport("a", "b", both, both, "cuda:0", "cuda:1") == "nccl"
    assert choose_transport("a", "a", both, both, "cuda:0", "cpu") == "shm"
    assert choose_transport("a", "b", both, ("shm", "tcp"), "cuda:0", "cuda:0") == "tcp"
    assert choose_transport("a", "b", ("shm", "tcp"), both, "cuda:0", "cuda:0") == "tcp"
    assert choose_transport("a", "a", both, None, "cuda:0", "cuda:0") == "shm"  # an old sender
    gloo = ("gloo", "shm", "tcp")
    assert choose_transport("a", "a", gloo, gloo) == "gloo"  # configured on both ends
    assert choose_transport("a", "a", gloo, ("shm", "tcp")) == "shm"


def test_workers_offer_nccl_on_cuda_where_it_runs():
    assert offered_transports(("shm", "tcp"), "cpu") == ("shm", "tcp")
    assert offered_transports(("nccl", "shm", "tcp"), "cpu") == ("shm", "tcp")
    assert offered_transports(("gloo", "tcp"), "cpu") == ("gloo", "tcp")
    expect = ("nccl", "shm", "tcp") if dist_available("nccl") else ("shm", "tcp")
    assert offered_transports(("shm", "tcp"), "cuda:0") == expect
    assert offered_transports(("bogus",), "cpu") == ("tcp",)


@pytest.mark.gpu
@pytest.mark.skipif(not dist_available("nccl"), reason="needs CUDA and NCCL")
def test_nccl_pair_moves_kv_bit_exact_gpu_to_gpu(ctx):
    proc = spawn("send", "?", "nccl", "0", "2")
    receiver = make_receiver("nccl", ctx, timeout_s=10.0, device="cuda", connect_timeout_s=30.0)
    try:
        proc.stdin.write(receiver.address + "\n")
        go(proc)
        events = pump(receiver, finished(2), deadline_s=60.0)
        for e in events:
            if isinstance(e, KVLayerEvent):
                assert e.tensor.is_cuda
        events = [
            KVLayerEvent(e.request_id, e.layer, e.tensor.cpu()) if isinstance(e, KVLayerEvent)
            else e for e in events
        ]  # fmt: skip
        check_arrived(events, 0)
        check_arrived(events, 1)
        assert wait_exit(proc) == (0, "ok\n")
    finally:
        receiver.close()
        proc.kill()


if __name__ == "__main__":
    role = sys.argv[1]
    if role == "send":
        address = sys.stdin.readline().strip()
        _, _, backend, first, count, *rest = sys.argv[1:]
        sys.exit(child_send(address, backend, int(first), int(count), rest == ["die"]))
    sys.exit(child_recv(sys.argv[2], int(sys.argv[3])))
