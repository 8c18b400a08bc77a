"""The gloo and nccl transports: KV bytes through torch.distributed point-to-point send/recv,
control messages over the same ZMQ link as tcp and shm.

Lifecycle of a pair (one sender endpoint -> one receiver endpoint), made on demand:

    sender.begin(dest, ...) with no pair to dest yet
        -> a TCPStore listens at the sender's bind host (port 0: any free one)
        -> KVPairOffer(pair_id, backend, store host:port, reply_address) over ZMQ
        -> each end's pair thread builds a 2-rank process group (sender rank 0) from the store
    sender.send_layer  -> the layer joins the pair's queue (the thread sends it), and a
                          KVDistLayer notice (pair, tag) goes over ZMQ at once
    receiver: notice   -> a recv into a fresh buffer joins its pair's queue; when it completes
                          the worker gets its KVLayerEvent. KVDone waits until every layer of
                          the transfer has arrived.
    either end closes  -> KVPairClose to the other; both drop the pair.
    a pair that fails (peer gone, a send or recv past `timeout_s`, a group that never forms
    within `connect_timeout_s`) fails every transfer on it: nacked on the sender, KVAbortEvent
    and nack on the receiver. The next begin to that peer makes a new pair, so workers join and
    leave without a global restart (no default process group, no world size).

NOTE: every KVDistLayer notice that reaches a receiver gets a recv posted, even for a transfer
that is unknown or already failed there (its bytes are dropped), so no send ever waits for a
recv that never comes; per pair, sends and recvs are posted in notice order, which nccl needs.
Each pair has one thread that posts its ops in order, up to PIPELINE_DEPTH ahead (the next
layer's send is on its way while the previous one completes), and waits on each in order:
gloo's Work only completes in `wait`, and the worker's loop must never block. A finished op
wakes the worker's poller through an inproc socket in `sockets`.
"""

from __future__ import annotations

import datetime
import itertools
import logging
import queue
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass

import torch
import zmq

from kv_transfer.base import (
    KVAbortEvent,
    KVBackpressure,
    KVEvent,
    KVLayerEvent,
    KVTransferError,
    Link,
)
from kv_transfer.receiver import Receiver
from kv_transfer.sender import MAX_ACKS_PER_POLL, Sender
from kv_transfer.tcp import InlinePayload
from tideserve.protocol import (
    MAX_TENSOR_BYTES,
    KVAck,
    KVDistLayer,
    KVDone,
    KVPairClose,
    KVPairOffer,
    ProtocolError,
    decode,
    encode,
    meta_nbytes,
)
from tideserve.tensor_frames import _TORCH, meta_of

log = logging.getLogger(__name__)

DIST_BACKENDS = ("gloo", "nccl")
_WILDCARD_HOSTS = ("0.0.0.0", "*", "::", "")
MAX_TAG = 1 << 30  # gloo slots are 32-bit; tags wrap long before that
CLOSE_WAIT_S = 2.0  # close(): how long each pair thread gets to finish its queued ops
PIPELINE_DEPTH = 4  # ops a pair thread posts ahead before it waits on the oldest
_wake_ids = itertools.count()


def dist_available(backend: str) -> bool:
    """Whether this process can form `backend` pairs (nccl also needs a CUDA device)."""
    import torch.distributed as dist

    if not dist.is_available():
        return False
    if backend == "gloo":
        return dist.is_gloo_available()
    if backend == "nccl":
        return dist.is_nccl_available() and torch.cuda.is_available()
    return False


def _check_backend(backend: str, device: torch.device) -> None:
    if backend not in DIST_BACKENDS:
        raise ValueError(f"unknown distributed KV backend {backend!r}; choose {DIST_BACKENDS}")
    if not dist_available(backend):
        raise ValueError(f"the {backend} KV transport is not available in this process")
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(f"the nccl KV transport needs a CUDA device, got {device}")


# -- one pair ----------------------------------------------------------------------------------


@dataclass
class Op:
    """One send or recv on a pair; `tensor` is the buffer (kept alive until the op is done)."""

    is_send: bool
    tag: int
    request_id: str
    layer: int
    tensor: torch.Tensor


class Pair:
    """One 2-rank process group and the thread that runs its sends and recvs, in order."""

    def __init__(
        self,
        pair_id: str,
        backend: str,
        rank: int,
        make_store,
        device: torch.device,
        peer: str,
        connect_timeout_s: float,
        op_timeout_s: float,
        wakeup: _Wakeup,
    ) -> None:
        self.pair_id = pair_id
        self.backend = backend
        self.rank = rank
        self.make_store = make_store  # () -> the store; called in the thread (it may block)
        self.store = None  # NOTE: kept for the pair's life: nccl reads it at its first op
        self.bind_host = ""  # gloo: the address this end listens at ("" = the host's name)
        self.device = device
        self.peer = peer  # the other end's ZMQ address (dest for a sender, reply for a receiver)
        self.connect_timeout_s = connect_timeout_s
        self.op_timeout_s = op_timeout_s
        self.next_tag = 0
        self.done: deque[Op] = deque()  # finished ops, oldest first (appended by the thread)
        self.error: str | None = None  # set once by the thread: the pair is dead
        self.is_ready = False
        self._ops: queue.SimpleQueue[Op | None] = queue.SimpleQueue()
        self._wake = (wakeup.ctx, wakeup.address)
        self._pg = None
        self._thread = threading.Thread(target=self._run, name=f"kv-{pair_id}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, op: Op) -> None:
        self._ops.put(op)

    def take_tag(self) -> int:
        tag, self.next_tag = self.next_tag, (self.next_tag + 1) % MAX_TAG
        return tag

    def close(self, wait_s: float = 0.0) -> None:
        """Stops the thread after the ops already queued, waiting up to `wait_s` for it (a
        closing process must let the group go before the interpreter does)."""
        self._ops.put(None)
        if wait_s and self._thread.is_alive():
            self._thread.join(wait_s)
        if not self._thread.is_alive():
            self.store = None

    # -- the pair's thread ---------------------------------------------------------------------

    def _run(self) -> None:
        ctx, address = self._wake
        wake = ctx.socket(zmq.PUSH)
        wake.setsockopt(zmq.LINGER, 0)
        wake.setsockopt(zmq.SNDHWM, 1)
        wake.connect(address)
        try:
            self._pg = self._form_group()
            self.is_ready = True
            self._run_ops(wake)
        except Exception as e:  # a peer gone, a timeout, a group that never formed
            self.error = f"{self.backend} pair {self.pair_id} with {self.peer} failed: {e}"
            log.warning("%s", self.error)
            _nudge(wake)
        finally:
            wake.close(0)
            self._pg = None

    def _form_group(self):
        import torch.distributed as dist

        self.store = self.make_store()
        timeout = datetime.timedelta(seconds=self.op_timeout_s)
        if self.backend == "gloo":
            opts = dist.ProcessGroupGloo._Options()
            opts._timeout = timeout
            if self.bind_host and self.bind_host not in _WILDCARD_HOSTS:
                device = dist.ProcessGroupGloo.create_device(hostname=self.bind_host)
            else:
                device = dist.ProcessGroupGloo.create_default_device()
            opts._devices = [device]
            return dist.ProcessGroupGloo(self.store, self.rank, 2, opts)
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        pg = dist.ProcessGroupNCCL(self.store, self.rank, 2, opts)
        torch.cuda.set_device(self.device)  # this thread's ops run on the worker's GPU
        return pg

    def _run_ops(self, wake: zmq.Socket) -> None:
        """Posts queued ops in order, up to PIPELINE_DEPTH ahead of the oldest unfinished one
        (layer i+1's send goes out while layer i's is on the wire), and finishes them in
        order; returns after the stop sentinel once every posted op is done."""
        posted: deque[tuple[Op, object]] = deque()  # posted, not waited on; oldest first
        stopping = False
        while posted or not stopping:
            if not stopping and len(posted) < PIPELINE_DEPTH:
                try:
                    op = self._ops.get(block=not posted)
                except queue.Empty:  # nothing more queued: wait on the oldest
                    op = None
                else:
                    stopping = op is None
                if op is not None:
                    posted.append((op, self._post(op)))
                    continue
            if posted:
                op, work = posted.popleft()
                self._wait(op, work)
                self.done.append(op)
                _nudge(wake)

    def _post(self, op: Op):
        peer = 1 - self.rank
        if op.is_send:
            return self._pg.send([op.tensor], peer, op.tag)
        return self._pg.recv([op.tensor], peer, op.tag)

    def _wait(self, op: Op, work) -> None:
        if self.backend == "gloo":
            work.wait(datetime.timedelta(seconds=self.op_timeout_s))
            return
        deadline = time.monotonic() + self.op_timeout_s  # nccl: poll its CUDA event
        while not work.is_completed():
            if time.monotonic() > deadline:
                raise TimeoutError(f"nccl op (tag {op.tag}) not done in {self.op_timeout_s}s")
            time.sleep(50e-6)


def _nudge(wake: zmq.Socket) -> None:
    try:
        wake.send(b"", zmq.NOBLOCK)
    except zmq.ZMQError:
        pass  # one wake-up already pending is enough


def _make_store(host: str, port: int, is_master: bool, timeout_s: float):
    import torch.distributed as dist

    return dist.TCPStore(
        host,
        port,
        2,
        is_master,
        timeout=datetime.timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )


class _Wakeup:
    """The inproc socket pair threads use to wake the worker's poller."""

    def __init__(self, ctx: zmq.Context) -> None:
        self.ctx = ctx
        self.address = f"inproc://kv-dist-wake-{next(_wake_ids)}"
        self.sock = ctx.socket(zmq.PULL)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(self.address)

    def drain(self) -> None:
        while True:
            try:
                self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return

    def close(self) -> None:
        self.sock.close(0)


def _link_ctx(link: Link) -> zmq.Context:
    ctx = getattr(link, "ctx", None)
    if ctx is None:
        raise ValueError("the gloo and nccl KV transports need a ZMQ link (not the fake one)")
    return ctx


# -- sender ------------------------------------------------------------------------------------


class DistSender(Sender):
    """A `Sender` whose layers go through a pair per destination, made on the first begin."""

    def __init__(
        self,
        link: Link,
        backend: str,
        device: torch.device | str = "cpu",
        bind_host: str = "127.0.0.1",
        advertise_host: str | None = None,
        max_inflight_bytes: int = 1 << 30,
        timeout_s: float = 30.0,
        connect_timeout_s: float = 10.0,
    ) -> None:
        super().__init__(link, InlinePayload(), max_inflight_bytes, timeout_s)
        self.backend = backend
        self.device = torch.device(device)
        _check_backend(backend, self.device)
        self.bind_host = bind_host
        self.store_host = advertise_host or bind_host
        self.connect_timeout_s = connect_timeout_s
        self.pairs: dict[str, Pair] = {}  # destination address -> its pair
        self._wakeup = _Wakeup(_link_ctx(link))
        self.sockets = [*link.sockets, self._wakeup.sock]

    def begin(self, dest_address: str, msg) -> None:
        self._pair_to(dest_address)
        super().begin(dest_address, msg)

    def send_layer(self, request_id: str, layer: int, kv: torch.Tensor) -> None:
        out = self.book.transfers.get(request_id)
        if out is None:
            log.debug("request %s: layer %d not sent, the transfer is settled", request_id, layer)
            return
        meta = meta_of(kv)
        if meta != out.msg.layer or not 0 <= layer < out.msg.num_layers:
            raise ValueError(
                f"request {request_id}: layer {layer} {meta} does not match KVBegin's "
                f"{out.msg.num_layers} layers of {out.msg.layer}"
            )
        pair = self.pairs.get(out.dest)
        if pair is None or pair.error:
            return  # the pair failed: poll_acks settles the transfer
        wire = "cpu" if self.backend == "gloo" else self.device
        tensor = kv.detach().to(wire).contiguous()
        tag = pair.take_tag()
        pair.submit(Op(True, tag, request_id, layer, tensor))
        if self._send(request_id, encode(KVDistLayer(request_id, layer, meta, pair.pair_id, tag))):
            self.book.touch(request_id)

    def poll_acks(self) -> list[KVAck]:
        self._wakeup.drain()
        acks = []
        for frames in self.link.recv(MAX_ACKS_PER_POLL):
            try:
                msg, raws = decode(frames)
            except ProtocolError as e:
                log.warning("dropped a malformed message on the KV reply socket: %s", e)
                continue
            if isinstance(msg, KVPairClose):
                self._close_pair(msg.pair_id, f"the receiver closed it: {msg.reason}")
            elif isinstance(msg, KVAck) and not raws:
                acks.extend(self._settle(msg))
            else:
                log.warning("dropped an unexpected %s on the KV reply socket", type(msg).__name__)
        for dest, pair in list(self.pairs.items()):
            pair.done.clear()  # sent: their tensors may go
            if pair.error:
                self._drop_pair(dest, pair.error)
        acks.extend(self._local_acks)
        self._local_acks = []
        return acks

    def close(self) -> None:
        for rid in list(self.book.transfers):
            self.abort(rid, "the sender is closing")
        for dest in list(self.pairs):
            self._drop_pair(dest, "the sender is closing", wait_s=CLOSE_WAIT_S)
        self._wakeup.close()
        self.payload.close()
        self.link.close()

    # -- helpers -------------------------------------------------------------------------------

    def _settle(self, ack: KVAck) -> list[KVAck]:
        if self.book.settle(ack.request_id) is None:
            log.info("request %s: late KV ack (ok=%s) ignored", ack.request_id, ack.ok)
            return []
        if not ack.ok:
            log.info("request %s: KV refused by the receiver: %s", ack.request_id, ack.reason)
        return [ack]

    def _pair_to(self, dest: str) -> Pair:
        pair = self.pairs.get(dest)
        if pair is not None and pair.error is None:
            return pair
        if pair is not None:
            self._drop_pair(dest, pair.error)
        pair_id = f"kvp-{secrets.token_hex(6)}"
        try:
            store = _make_store(self.bind_host, 0, True, self.connect_timeout_s)
        except (RuntimeError, OSError) as e:
            raise KVBackpressure(f"cannot open a {self.backend} KV pair to {dest}: {e}") from e
        offer = KVPairOffer(pair_id, self.backend, self.store_host, store.port, self.reply_address)
        try:
            self.link.send(dest, encode(offer))
        except KVTransferError as e:
            raise KVBackpressure(f"cannot offer a {self.backend} KV pair to {dest}: {e}") from e
        pair = Pair(
            pair_id, self.backend, 0, lambda: store, self.device, dest,
            self.connect_timeout_s, self.book.timeout_s, self._wakeup,
        )  # fmt: skip
        pair.bind_host = self.store_host
        pair.start()
        self.pairs[dest] = pair
        log.info("%s KV pair %s to %s offered", self.backend, pair_id, dest)
        return pair

    def _close_pair(self, pair_id: str, reason: str) -> None:
        for dest, pair in list(self.pairs.items()):
            if pair.pair_id == pair_id:
                self._drop_pair(dest, reason, tell=False)

    def _drop_pair(self, dest: str, reason: str, tell: bool = True, wait_s: float = 0.0) -> None:
        """Forgets the pair to `dest` and fails every transfer still on it."""
        pair = self.pairs.pop(dest, None)
        if pair is None:
            return
        if tell:
            _tell(self.link, dest, KVPairClose(pair.pair_id, reason))
        pair.close(wait_s)
        for rid, out in list(self.book.transfers.items()):
            if out.dest == dest:
                self.book.settle(rid)
                self._local_acks.append(KVAck(rid, False, f"KV pair failed: {reason}"))
                log.warning("request %s: KV transfer to %s failed: %s", rid, dest, reason)


# -- receiver ----------------------------------------------------------------------------------


class DistReceiver(Receiver):
    """A `Receiver` (tcp frames and shm notices still work on its address) that also joins the
    pairs senders offer and receives their layers through them."""

    def __init__(
        self,
        link: Link,
        backend: str,
        device: torch.device | str = "cpu",
        bind_host: str = "127.0.0.1",
        timeout_s: float = 30.0,
        connect_timeout_s: float = 10.0,
    ) -> None:
        super().__init__(link, timeout_s)
        self.backend = backend
        self.device = torch.device(device)
        _check_backend(backend, self.device)
        self.bind_host = bind_host
        self.connect_timeout_s = connect_timeout_s
        self.pairs: dict[str, Pair] = {}  # pair id -> pair
        self._pending: dict[str, int] = {}  # request id -> layers posted, not yet arrived
        self._held_done: dict[str, KVDone] = {}  # KVDone that came before its last layer
        self._events: list[KVEvent] = []  # aborts found while handling a message
        self._wakeup = _Wakeup(_link_ctx(link))
        self.sockets = [*link.sockets, self._wakeup.sock]
        self._handlers |= {
            KVPairOffer: self.handle_kv_pair_offer,
            KVPairClose: self.handle_kv_pair_close,
            KVDistLayer: self.handle_kv_dist_layer,
        }

    def poll(self) -> list[KVEvent]:
        events = super().poll()
        self._wakeup.drain()
        for pair_id, pair in list(self.pairs.items()):
            while pair.done:
                events.extend(self._arrived(pair.done.popleft()))
            if pair.error:
                self._drop_pair(pair_id, pair.error, tell=True)
        events.extend(self._events)
        self._events = []
        return events

    def ack(self, request_id: str, ok: bool, reason: str = "") -> None:
        if not ok:
            self._pending.pop(request_id, None)
            self._held_done.pop(request_id, None)
        super().ack(request_id, ok, reason)

    def expired(self, now: float) -> list[str]:
        late = super().expired(now)
        for rid in late:
            self._pending.pop(rid, None)
            self._held_done.pop(rid, None)
        return late

    def close(self) -> None:
        for pair_id in list(self.pairs):
            self._drop_pair(pair_id, "the receiver is closing", tell=True, wait_s=CLOSE_WAIT_S)
        super().close()
        self._wakeup.close()

    # -- handlers ------------------------------------------------------------------------------

    def handle_kv_pair_offer(self, msg: KVPairOffer, raws: list) -> None:
        if raws or msg.backend != self.backend:
            log.warning("refused a %s KV pair from %s: this receiver runs %s",
                        msg.backend, msg.reply_address, self.backend)  # fmt: skip
            reason = f"the receiver runs {self.backend}"
            _tell(self.link, msg.reply_address, KVPairClose(msg.pair_id, reason))
            return None
        for old_id, old in list(self.pairs.items()):  # the sender made a new pair
            if old.peer == msg.reply_address:
                self._drop_pair(old_id, "the sender replaced it", tell=False)
        host, port, timeout_s = msg.store_host, msg.store_port, self.connect_timeout_s
        pair = Pair(
            msg.pair_id, self.backend, 1, lambda: _make_store(host, port, False, timeout_s),
            self.device, msg.reply_address, timeout_s, self.book.timeout_s, self._wakeup,
        )  # fmt: skip
        pair.bind_host = self.bind_host
        pair.start()
        self.pairs[msg.pair_id] = pair
        log.info("%s KV pair %s from %s joining", self.backend, msg.pair_id, msg.reply_address)
        return None

    def handle_kv_pair_close(self, msg: KVPairClose, raws: list) -> None:
        self._drop_pair(msg.pair_id, f"the sender closed it: {msg.reason}", tell=False)
        return None

    def handle_kv_dist_layer(self, msg: KVDistLayer, raws: list) -> None:
        pair = self.pairs.get(msg.pair_id)
        if pair is None:
            log.warning("request %s: a layer on unknown KV pair %s dropped", msg.request_id,
                        msg.pair_id)  # fmt: skip
            return None
        nbytes = meta_nbytes(msg.tensor)  # ProtocolError for a bad dtype or shape
        dtype = _TORCH.get(msg.tensor.dtype)
        if nbytes > MAX_TENSOR_BYTES or dtype is None or raws:
            raise ProtocolError(f"a pair layer of {nbytes} bytes, {msg.tensor.dtype}")
        wire = "cpu" if self.backend == "gloo" else self.device
        buf = torch.empty(msg.tensor.shape, dtype=dtype, device=wire)
        pair.submit(Op(False, msg.tag, msg.request_id, msg.layer, buf))  # NOTE: always posted
        inc = self._known(msg)
        if inc is None or inc.is_done:
            return None  # its bytes are drained and dropped
        if not 0 <= msg.layer < inc.msg.num_layers or msg.layer in inc.layers:
            raise ProtocolError(f"unexpected layer {msg.layer} (of {inc.msg.num_layers})")
        if msg.tensor != inc.layer_meta:
            raise ProtocolError(f"layer {msg.layer} is {msg.tensor}, KVBegin said {inc.layer_meta}")
        inc.layers.add(msg.layer)
        self._pending[msg.request_id] = self._pending.get(msg.request_id, 0) + 1
        self.book.touch(inc)
        return None

    def handle_kv_done(self, msg: KVDone, raws: list):
        if self._pending.get(msg.request_id) and msg.request_id in self.book.transfers:
            self._held_done[msg.request_id] = msg  # its last layers are still on the wire
            return None
        return super().handle_kv_done(msg, raws)

    # -- helpers -------------------------------------------------------------------------------

    def _arrived(self, op: Op) -> list[KVEvent]:
        rid = op.request_id
        inc = self.book.transfers.get(rid)
        left = self._pending.get(rid, 0)
        if inc is None or left == 0 or op.layer not in inc.layers:
            return []  # drained bytes of a transfer that is gone
        self._pending[rid] = left - 1
        self.book.touch(inc)
        events: list[KVEvent] = [KVLayerEvent(rid, op.layer, op.tensor)]
        if left == 1:
            del self._pending[rid]
            held = self._held_done.pop(rid, None)
            if held is not None:
                try:
                    ev = super().handle_kv_done(held, [])
                except ValueError as e:
                    ev = self._fail(held, str(e))
                if ev is not None:
                    events.append(ev)
        return events

    def _drop_pair(self, pair_id: str, reason: str, tell: bool, wait_s: float = 0.0) -> None:
        """Forgets the pair; every unfinished transfer from its sender fails (nack + abort)."""
        pair = self.pairs.pop(pair_id, None)
        if pair is None:
            return
        if tell:
            _tell(self.link, pair.peer, KVPairClose(pair_id, reason))
        pair.close(wait_s)
        for rid, inc in list(self.book.transfers.items()):
            if inc.msg.reply_address == pair.peer and not inc.is_done:
                self._pending.pop(rid, None)
                self._held_done.pop(rid, None)
                self.book.pop(rid)
                self._nack(inc, f"KV pair failed: {reason}")
                self._events.append(KVAbortEvent(rid, f"KV pair failed: {reason}"))


def _tell(link: Link, address: str, msg: KVPairClose) -> None:
    try:
        link.send(address, encode(msg))
    except KVTransferError as e:
        log.debug("could not tell %s that pair %s closed: %s", address, msg.pair_id, e)
