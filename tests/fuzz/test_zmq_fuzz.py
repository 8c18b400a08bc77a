"""Every ZMQ socket tideserve reads, fed junk (tests/fuzz/junk.py), then asked to work.

(a) the router's ROUTER socket (an in-process Cluster): junk from a registered worker and an
    unknown peer, then a new worker still gets Welcome and a request still completes;
(b) a real colocated worker's DEALER socket, behind a fake router this test controls: junk,
    then it still heartbeats and answers a GenerateRequest;
(c) that worker's KV inbox (the address in its Hello): junk KV messages, then a real transfer
    lands and decodes;
(d) a real prefill worker's KV ack inboxes (tcp and shm): junk, then a real KVAck still settles
    its transfer; then its DEALER socket too, and a real prefill -> decode transfer (both
    transports) still gives the colocated worker's tokens.
Bad frames must be dropped with a log line; a worker process that exits fails the test.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
import zmq
import zmq.asyncio

from router.cluster import Cluster, Stream
from tests.factories import make_tiny_model, make_tiny_tokenizer
from tests.fuzz.junk import junk, oversized
from tideserve.launcher import free_port
from tideserve.protocol import (
    PROTOCOL_VERSION,
    AbortRequest,
    GenerateRequest,
    Goodbye,
    Heartbeat,
    Hello,
    KVAbort,
    KVAck,
    KVBegin,
    KVDone,
    KVLayer,
    Params,
    PrefillRequest,
    ProtocolError,
    RequestFailed,
    TensorMeta,
    TokenChunk,
    Welcome,
    decode,
    encode,
)

NUM_JUNK = 700  # per socket (the two ack inboxes: half each); about 4,200 messages in all
TIMEOUT_S = 10.0


def hello(wid: str, role: str = "colocated", **fields) -> Hello:
    base = dict(
        protocol_version=PROTOCOL_VERSION,
        worker_id=wid,
        role=role,
        host="127.0.0.1",
        kv_address="",
        model="tiny",
        num_kv_blocks=100,
        block_size=16,
        max_model_len=256,
        device="cpu",
        pid=os.getpid(),
    )
    return Hello(**{**base, **fields})


# -- (a) the router ----------------------------------------------------------------------------


def router_samples(wid: str) -> list:
    """What a worker may send the router, well-formed, plus well-formed hostile messages."""
    real = [
        hello(wid),
        Heartbeat(wid, "ready", 0, 0, 0, 0, 100),
        TokenChunk("req-x", wid, [1, 2], None, 3),
        RequestFailed("req-x", wid, "boom", True),
        Goodbye(wid, "bye"),
    ]
    hostile = [
        hello("someone-else"),  # a worker id that is not the sender's
        hello(wid, protocol_version=99),
        hello(wid, block_size=0),
        hello(wid, max_model_len=0, num_kv_blocks=-1),
        hello(wid, role="decode", kv_address="tcp://127.0.0.1:1"),
        Heartbeat("someone-else", "ready", 0, 0, 0, 0, 100),
        Heartbeat(wid, "draining", -5, -5, -(2**63), 2**63 - 1, -1),
        Goodbye("someone-else"),
        TokenChunk("req-x", "someone-else", [2**64 - 1], "stop", -1),
        GenerateRequest("req-x", [1], Params(1), 0),  # a router -> worker message
        Welcome(True),
    ]
    return [(m, ()) for m in real + hostile]


async def _recv(sock, timeout_s: float = TIMEOUT_S):
    assert await sock.poll(timeout_s * 1000), "no answer"
    return decode(await sock.recv_multipart())[0]


async def _expect(sock, kind, timeout_s: float = TIMEOUT_S):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        msg = await _recv(sock, deadline - time.monotonic())
        if isinstance(msg, kind):
            return msg
    raise AssertionError(f"no {kind.__name__} in {timeout_s} s")


def _dealer(ctx, address: str, wid: str):
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, wid.encode())
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    return sock


async def test_router_socket_survives_junk(caplog):
    address = f"tcp://127.0.0.1:{free_port()}"
    cluster = Cluster(address, 30.0, 2, ("tcp",))
    await cluster.start()
    ctx = zmq.asyncio.Context()
    socks = {wid: _dealer(ctx, address, wid) for wid in ("fz-known", "fz-anon", "fz-good")}
    try:
        await socks["fz-known"].send_multipart(encode(hello("fz-known")))
        assert (await _expect(socks["fz-known"], Welcome)).ok
        rng = random.Random(20240601)
        num_sent = 0
        for wid in ("fz-known", "fz-anon"):
            samples = router_samples(wid)
            for frames in [*junk(rng, samples, NUM_JUNK), *oversized(samples)]:
                await socks[wid].send_multipart(frames)
                num_sent += 1
        print(f"\nrouter socket: {num_sent} junk messages")
        for wid in ("fz-known", "fz-anon"):  # answered only once all its junk is read
            await socks[wid].send_multipart(encode(hello(wid)))
            assert await _last_answer(socks[wid]) == Welcome(True)
            await _refuses_bad_hellos(socks[wid], wid)
            await socks[wid].send_multipart(encode(Goodbye(wid)))
        assert not any(t.done() for t in cluster._tasks), "a router loop died"
        await _serve_one_request(cluster, socks["fz-good"])
        assert set(cluster.workers) == {"fz-good"}, "junk registered a worker"
        dropped = [r for r in caplog.records if r.levelname == "WARNING"]
        assert 0 < len(dropped) <= num_sent + 10
    finally:
        for s in socks.values():
            s.close(0)
        ctx.term()
        await cluster.close()


async def _last_answer(sock, quiet_s: float = 0.5):
    """The last message the router sends `sock` before going quiet (answers to junk Hellos,
    Rejoins to junk Heartbeats come first: one connection's messages are handled in order)."""
    last = await _recv(sock)
    while await sock.poll(quiet_s * 1000):
        last = decode(await sock.recv_multipart())[0]
    return last


async def _refuses_bad_hellos(sock, wid: str) -> None:
    """Hellos that would break routing for every request get no Welcome (messages on one
    connection are handled in order: any Welcome before the good Hello's is a bad one's)."""
    for bad in (
        hello(wid, block_size=0),
        hello(wid, max_model_len=1),
        hello(wid, num_kv_blocks=-1),
    ):
        await sock.send_multipart(encode(bad))
    await sock.send_multipart(encode(hello(wid)))
    assert (await _recv(sock)) == Welcome(True)
    assert not await sock.poll(200), "a bad Hello was welcomed"


async def _serve_one_request(cluster: Cluster, sock) -> None:
    """A fresh worker joins and completes one request end to end."""
    await sock.send_multipart(encode(hello("fz-good")))
    assert (await _expect(sock, Welcome)).ok
    await sock.send_multipart(encode(Heartbeat("fz-good", "ready", 0, 0, 0, 0, 100)))
    stream = Stream("req-real", [1, 2, 3], Params(max_tokens=2), 0)
    cluster.submit(stream)
    req = await _expect(sock, GenerateRequest)
    assert req.prompt_token_ids == [1, 2, 3]
    await sock.send_multipart(encode(TokenChunk(req.request_id, "fz-good", [7, 8], "length", 3)))
    out = await asyncio.wait_for(stream.queue.get(), TIMEOUT_S)
    assert out.token_ids == [7, 8] and out.finish_reason == "length"


# -- real workers behind a fake router ---------------------------------------------------------


class FakeRouter:
    """A ROUTER socket standing in for the router: welcomes workers, sends them anything."""

    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.address = f"tcp://127.0.0.1:{free_port()}"
        self.sock.bind(self.address)
        self.heartbeats: dict[str, int] = {}
        self.pending: list[tuple[str, object]] = []  # read, not yet expected (no heartbeats)

    def accept(self, proc: WorkerProcess) -> Hello:
        hello = self.expect(proc, Hello, timeout_s=120)
        self.send(hello.worker_id, encode(Welcome(True)))
        return hello

    def send(self, wid: str, frames: list) -> None:
        self.sock.send_multipart([wid.encode(), *frames])

    def expect(self, proc: WorkerProcess, kind, timeout_s: float = TIMEOUT_S, where=None):
        """The next `kind` message from `proc`'s worker that satisfies `where` (a heartbeat:
        the next one to arrive)."""
        is_it = lambda wid, m: wid == proc.wid and isinstance(m, kind) and (where or bool)(m)
        for i, (wid, msg) in enumerate(self.pending):
            if is_it(wid, msg):
                return self.pending.pop(i)[1]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            proc.check_running()
            if not self.sock.poll(100):
                continue
            ident, *frames = self.sock.recv_multipart()
            wid, msg = ident.decode(), decode(frames)[0]
            if isinstance(msg, Heartbeat):
                self.heartbeats[wid] = self.heartbeats.get(wid, 0) + 1
            if is_it(wid, msg):
                return msg
            if not isinstance(msg, Heartbeat):
                self.pending.append((wid, msg))
        raise AssertionError(f"no {kind.__name__} from {proc.wid} in {timeout_s} s{proc.tail()}")

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


class WorkerProcess:
    """`tideserve prefill|decode` on the tiny model, logging to a file."""

    def __init__(self, cmd: str, wid: str, model_dir, router_address: str, *extra: str) -> None:
        self.wid = wid
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"{wid}-", suffix=".log")
        args = ["--model", str(model_dir), "--dtype", "float32", "--device", "cpu"]
        args += ["--kv-cache-bytes", str(1 << 24), "--num-threads", "1"]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tideserve.cli", "--log-level", "INFO", cmd, *extra]
            + ["--router-address", router_address, "--worker-id", wid, *args],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def check_running(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.wid} died (exit {self.proc.returncode}){self.tail()}")

    def check_alive(self) -> None:
        """Fails if the process exited, or logged a traceback (an exception got that far)."""
        self.check_running()
        assert self.count("Traceback") == 0, self.tail(20_000)

    def tail(self, n: int = 3000) -> str:
        self.log.seek(0)
        return "\n--- worker log ---\n" + self.log.read()[-n:]

    def count(self, text: str) -> int:
        self.log.seek(0)
        return self.log.read().count(text)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("tiny-fuzz"), vocab_size=259 + 5)
    return make_tiny_tokenizer(path)


@pytest.fixture(scope="module")
def router():
    r = FakeRouter()
    yield r
    r.close()


@pytest.fixture(scope="module")
def colocated(model_dir, router):
    proc = WorkerProcess("decode", "fz-colo", model_dir, router.address, "--role", "colocated")
    try:
        proc.hello = router.accept(proc)
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def prefill(model_dir, router):
    proc = WorkerProcess("prefill", "fz-prefill", model_dir, router.address)
    try:
        proc.hello = router.accept(proc)
        yield proc
    finally:
        proc.stop()


GREEDY = Params(max_tokens=4, temperature=0.0, ignore_eos=True)


def generate(router: FakeRouter, proc: WorkerProcess, rid: str, prompt: list[int]) -> list[int]:
    """Runs one GenerateRequest on a colocated worker; returns its tokens."""
    router.send(proc.wid, encode(GenerateRequest(rid, prompt, GREEDY, 0)))
    return collect(router, proc, rid)


def collect(router: FakeRouter, proc: WorkerProcess, rid: str) -> list[int]:
    tokens = []
    while True:
        chunk = router.expect(proc, TokenChunk, where=lambda m: m.request_id == rid)
        tokens += chunk.token_ids
        if chunk.finish_reason is not None:
            return tokens


def send_junk(send, samples: list, seed: int, n: int = NUM_JUNK) -> list:
    """Sends the junk; returns what of it is well-formed (the target acts on those)."""
    rng = random.Random(seed)
    messages = [*junk(rng, samples, n), *oversized(samples)]
    for frames in messages:
        send(frames)
    print(f"\n{len(messages)} junk messages")
    return [m for m in map(_decodes, messages) if m is not None]


def _decodes(frames: list):
    try:
        return decode(frames)[0]
    except ProtocolError:
        return None


# -- (b) a worker's DEALER socket --------------------------------------------------------------


def worker_samples() -> list:
    """What the router may send a colocated worker, well-formed, plus well-formed hostile
    requests (the engine must refuse them, not crash on them). No Welcome and no Rejoin:
    those are orders the worker obeys (stop, drop everything)."""
    ok = Params(max_tokens=2)
    real = [
        GenerateRequest("req-x", [1, 2, 3], ok, 0),
        AbortRequest("req-x"),
        PrefillRequest("req-y", [1], ok, 0, "d", "tcp://127.0.0.1:1", "tcp"),
        TokenChunk("req-x", "w", [1]),
    ]
    bad_params = [
        Params(max_tokens=0),
        Params(max_tokens=2, temperature=float("nan")),
        Params(max_tokens=2, temperature=float("inf")),
        Params(max_tokens=2, top_p=0.0),
        Params(max_tokens=2, top_k=-5),
        Params(max_tokens=2, min_tokens=9),
        Params(max_tokens=2, logprobs=99),
        Params(max_tokens=2, seed=2**64 - 1),
        Params(max_tokens=2**63 - 1, stop_token_ids=(2**64 - 1,)),
    ]
    hostile = [GenerateRequest(f"bad-{i}", [1, 2], p, 0) for i, p in enumerate(bad_params)]
    hostile += [
        GenerateRequest("ids", [10**6, -1], ok, 0),
        GenerateRequest("empty", [], ok, 0),
        GenerateRequest("long", [1] * 10_000, ok, 0),
        GenerateRequest("prio", [1], ok, -(2**63)),
    ]
    return [(m, ()) for m in real + hostile]


def test_worker_socket_survives_junk(router, colocated):
    before = generate(router, colocated, "before", [5, 6, 7])
    nan = Params(max_tokens=2, temperature=float("nan"))
    router.send(colocated.wid, encode(GenerateRequest("nan", [1], nan, 0)))
    failed = router.expect(colocated, RequestFailed, where=lambda m: m.request_id == "nan")
    assert "temperature" in failed.message
    send_junk(lambda f: router.send(colocated.wid, f), worker_samples(), seed=7)
    beats = router.heartbeats.get(colocated.wid, 0)
    router.expect(colocated, Heartbeat)
    router.expect(colocated, Heartbeat)
    assert router.heartbeats[colocated.wid] >= beats + 2
    assert generate(router, colocated, "after", [5, 6, 7]) == before  # greedy: same tokens
    colocated.check_alive()
    assert colocated.count("malformed message") > 0


# -- (c) a decode worker's KV inbox ------------------------------------------------------------


class KVPeer:
    """One end of KV transfer, by hand: a PUSH to `target` (an inbox of the worker under test)
    and a bound PULL inbox of its own at `address` (for acks, or for KV when it stands in for
    a decode worker)."""

    def __init__(self, target: str | None = None) -> None:
        self.ctx = zmq.Context()
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 0)
        if target is not None:
            self.push.connect(target)
        self.inbox = self.ctx.socket(zmq.PULL)
        self.inbox.setsockopt(zmq.LINGER, 0)
        self.address = f"tcp://127.0.0.1:{self.inbox.bind_to_random_port('tcp://127.0.0.1')}"

    def send(self, frames: list) -> None:
        self.push.send_multipart(frames)

    def expect(self, kind, rid: str, timeout_s: float = TIMEOUT_S):
        """The next `kind` message about request `rid` in this peer's inbox."""
        deadline = time.monotonic() + timeout_s
        while self.inbox.poll(max(0, deadline - time.monotonic()) * 1000):
            msg = _decodes(self.inbox.recv_multipart())
            if isinstance(msg, kind) and msg.request_id == rid:
                return msg
        raise AssertionError(f"no {kind.__name__} for {rid}")

    def close(self) -> None:
        self.push.close(0)
        self.inbox.close(0)
        self.ctx.term()


NUM_KV_TOKENS = 5
LAYER = TensorMeta("float32", (2, 2, NUM_KV_TOKENS, 16))  # [2, kvh, T, hd] of the tiny model


def kv_begin(rid: str, reply: str, **fields) -> KVBegin:
    base = dict(
        request_id=rid,
        src_worker_id="fz-peer",
        reply_address=reply,
        prompt_token_ids=[5, 6, 7, 8, 9],
        output_token_ids=[],
        num_kv_tokens=NUM_KV_TOKENS,
        params=GREEDY,
        priority=0,
        num_layers=2,
        layer=LAYER,
    )
    return KVBegin(**{**base, **fields})


def layer_data(meta: TensorMeta = LAYER, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(meta.shape, dtype=np.float32)


def kv_samples(reply: str) -> list:
    """KV messages a receiver takes, well-formed (for transfers it may or may not know)."""
    return [
        (kv_begin("kv-x", reply), ()),
        (KVLayer("kv-x", 0, LAYER), (layer_data(),)),
        (KVLayer("kv-x", 1, LAYER, "tideserve-kv-nope", 0), ()),
        (KVDone("kv-x", [3]), ()),
        (KVAbort("kv-x", "why"), ()),
        (KVAck("kv-x", True), ()),
    ]


def raw(nbytes: int) -> np.ndarray:
    return np.zeros(nbytes, np.uint8)


def hostile_transfers(reply: str) -> list[list]:
    """Well-formed transfers with hostile values: lists of (message, tensors) in order."""
    layers = lambda rid: [(KVLayer(rid, i, LAYER), (layer_data(),)) for i in range(2)]
    big = TensorMeta("float32", (2**62, 4))  # its byte count overflows int64 to 0
    huge = TensorMeta("float32", (2**63 - 1, 2))  # ... and this one to -8
    odd = TensorMeta("i4,i4", (2, 2, 5, 16))  # numpy parses it (8 bytes an item)
    wide = TensorMeta("float32", (2, 3, 5, 16))  # not this model's KV layout
    return [
        [
            (kv_begin("t-layers", reply, num_layers=100), ()),
            (KVLayer("t-layers", 50, LAYER), (layer_data(),)),
        ],
        [(kv_begin("t-big", reply, layer=big), ()), (KVLayer("t-big", 0, big), (raw(0),))],
        [(kv_begin("t-huge", reply, layer=huge), ()), (KVLayer("t-huge", 0, huge), (raw(0),))],
        [(kv_begin("t-odd", reply, layer=odd), ()), (KVLayer("t-odd", 0, odd), (raw(2560),))],
        [(kv_begin("t-wide", reply, layer=wide), ()), (KVLayer("t-wide", 0, wide), (raw(1920),))],
        [(kv_begin("t-tokens", reply, num_kv_tokens=10**9), ())],
        [(kv_begin("t-prompt", reply, prompt_token_ids=[-1, 10**9]), ())],
        [
            (kv_begin("t-out", reply, output_token_ids=[10**6]), ()),
            *layers("t-out"),
            (KVDone("t-out", []), ()),
        ],
        [
            (kv_begin("t-first", reply), ()),
            *layers("t-first"),
            (KVDone("t-first", [2**63 - 1]), ()),
        ],
        [(kv_begin("t-early", reply), ()), (KVDone("t-early", [1]), ())],
        [
            (kv_begin("t-twice", reply), ()),
            (kv_begin("t-twice", reply), ()),
            *layers("t-twice"),
            *layers("t-twice"),
            (KVAbort("t-twice"), ()),
        ],
        [(KVLayer("t-unknown", 0, LAYER), (layer_data(),)), (KVDone("t-unknown"), ())],
        [(kv_begin("t-reply", "not an ad"), ()), *layers("t-reply"), (KVDone("t-reply", [1]), ())],
        # a nack to a new address each time: the worker must not keep a socket for every one
        *[[(kv_begin("t-inproc", f"inproc://fz-{i}", num_layers=0), ())] for i in range(50)],
        *[
            [(kv_begin("t-flood", f"tcp://127.0.0.1:{i}", num_layers=0), ())]
            for i in range(1, 1200)
        ],
    ]


def send_transfer(peer: KVPeer, rid: str, first_token: int) -> None:
    peer.send(encode(kv_begin(rid, peer.address)))
    for i in range(2):
        peer.send(encode(KVLayer(rid, i, LAYER), layer_data(seed=i)))
    peer.send(encode(KVDone(rid, [first_token])))


def test_kv_inbox_survives_junk(router, colocated):
    peer = KVPeer(colocated.hello.kv_address)
    try:
        send_transfer(peer, "kv-before", 42)
        assert peer.expect(KVAck, "kv-before").ok
        before = collect(router, colocated, "kv-before")
        valid = send_junk(peer.send, kv_samples(peer.address), seed=11)
        transfers = hostile_transfers(peer.address)
        for transfer in transfers:
            for msg, tensors in transfer:
                peer.send(encode(msg, *tensors))
        print(f"then {len(transfers)} hostile transfers")
        router.expect(colocated, Heartbeat)
        send_transfer(peer, "kv-after", 42)
        assert peer.expect(KVAck, "kv-after").ok
        assert collect(router, colocated, "kv-after") == before
        for msg in valid:  # a sender ends what it began (a stall would end at kv_timeout_s)
            if isinstance(msg, KVBegin):
                peer.send(encode(KVAbort(msg.request_id)))
        router.expect(colocated, Heartbeat, where=lambda m: m.num_inflight_kv == 0)
        colocated.check_alive()
        assert colocated.count("malformed message on the KV socket") > 0
    finally:
        peer.close()


# -- (d) a prefill worker's KV ack inboxes -----------------------------------------------------


def ack_samples() -> list:
    begin = kv_begin("req-x", "tcp://127.0.0.1:1")
    real = [KVAck("req-x", True), KVAck("req-x", False, "no room"), KVDone("req-x"), begin]
    return [(m, ()) for m in real] + [(KVAck("req-x", True), (layer_data(),))]


def prefill_samples() -> list:
    """What the router may send a prefill worker, and hostile PrefillRequests."""
    ok = Params(max_tokens=2)
    real = [
        PrefillRequest("req-y", [1, 2], ok, 0, "d", "tcp://127.0.0.1:1", "tcp"),
        AbortRequest("req-y"),
        GenerateRequest("req-x", [1, 2, 3], ok, 0),
    ]
    hostile = [
        PrefillRequest("p-transport", [1], ok, 0, "d", "tcp://127.0.0.1:1", "pigeon"),
        PrefillRequest("p-address", [1], ok, 0, "d", "not an address", "tcp"),
        PrefillRequest("p-inproc", [1], ok, 0, "d", "inproc://nowhere", "shm"),
        PrefillRequest("p-ids", [10**6], ok, 0, "d", "tcp://127.0.0.1:1", "tcp"),
        PrefillRequest("p-nan", [1], Params(2, temperature=float("nan")), 0, "d", "x", "tcp"),
    ]
    return [(m, ()) for m in real + hostile]


def test_ack_inboxes_survive_junk(router, prefill, colocated):
    decode = KVPeer()  # stands in for a decode worker: the prefill worker's KV lands here
    try:
        reply = {}
        for transport in ("tcp", "shm"):
            rid = f"cap-{transport}"
            req = PrefillRequest(rid, [5, 6, 7], GREEDY, 0, "fz-d", decode.address, transport)
            router.send(prefill.wid, encode(req))
            reply[rid] = decode.expect(KVBegin, rid).reply_address
        for i, address in enumerate(reply.values()):
            sender = KVPeer(address)
            send_junk(sender.send, ack_samples(), seed=100 + i, n=NUM_JUNK // 2)
            sender.close()
        for rid, address in reply.items():  # a real nack still settles the transfer
            sender = KVPeer(address)
            sender.send(encode(KVAck(rid, False, "refused by the test")))
            is_it = lambda m, rid=rid: m.request_id == rid
            assert router.expect(prefill, RequestFailed, where=is_it).retryable
            sender.close()
        router.expect(prefill, Heartbeat, where=lambda m: m.num_inflight_kv == 0)
        prefill.check_alive()
        assert prefill.count("malformed message on the KV reply socket") > 0
    finally:
        decode.close()
    send_junk(lambda f: router.send(prefill.wid, f), prefill_samples(), seed=13)  # its DEALER
    expected = generate(router, colocated, "ref", [5, 6, 7])
    for transport in ("tcp", "shm"):  # prefill -> decode, end to end, KV acked by the worker
        rid = f"pd-{transport}"
        kv_address = colocated.hello.kv_address
        req = PrefillRequest(rid, [5, 6, 7], GREEDY, 0, colocated.wid, kv_address, transport)
        router.send(prefill.wid, encode(req))
        is_it = lambda m, rid=rid: m.request_id == rid
        first = router.expect(prefill, TokenChunk, where=is_it)
        assert [*first.token_ids, *collect(router, colocated, rid)] == expected
    prefill.check_alive()
    colocated.check_alive()
