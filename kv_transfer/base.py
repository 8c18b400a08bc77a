"""The KV transfer interface (`KVSender` on the prefill side, `KVReceiver` on the decode side),
the events a receiver hands its worker, and the bookkeeping every transport shares.

Lifecycle of one transfer, seen from both ends:

    sender.begin(dest, KVBegin)       -> receiver.poll(): KVBeginEvent  (worker reserves blocks,
                                                                          or ack(ok=False))
    sender.send_layer(rid, i, kv) x L -> receiver.poll(): KVLayerEvent  (worker copies it in)
    sender.done(rid, [first_token])   -> receiver.poll(): KVDoneEvent   (worker: ack(ok=True))
    sender.poll_acks(): KVAck         <- the sender frees what it held (shm segment, budget)

Either side may end it early: `sender.abort` reaches the receiver as a KVAbortEvent; a receiver
that refuses, fails or times out a transfer sends KVAck(ok=False). Nothing waits: every call is
non-blocking, and a transfer that makes no progress for `timeout_s` comes out of `expired(now)`
on whichever side is waiting (`now` is `time.monotonic()`), which frees it there.
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch

from tideserve.protocol import KVAck, KVBegin, TensorMeta, meta_nbytes


class KVTransferError(RuntimeError):
    """A transport failure (bad address, socket error) that ends one transfer."""


class KVBackpressure(KVTransferError):
    """Too many bytes in flight: `begin` refused the transfer; retry when acks have come back."""


# -- receiver events ---------------------------------------------------------------------------


@dataclass(frozen=True)
class KVBeginEvent:
    msg: KVBegin


@dataclass(frozen=True)
class KVLayerEvent:
    """NOTE: `tensor` may be a view over a ZMQ frame or a shared-memory segment. It is only
    guaranteed valid until the next `poll()`: copy it into the cache right away."""

    request_id: str
    layer: int
    tensor: torch.Tensor  # [2, kvh, num_kv_tokens, hd], the dtype KVBegin announced


@dataclass(frozen=True)
class KVDoneEvent:
    request_id: str
    output_token_ids: tuple[int, ...] = ()  # tokens the sender sampled (a prefill's first token)


@dataclass(frozen=True)
class KVAbortEvent:
    """The transfer is over and settled with the sender (no ack needed): free its blocks."""

    request_id: str
    reason: str


KVEvent = KVBeginEvent | KVLayerEvent | KVDoneEvent | KVAbortEvent


# -- the interfaces ----------------------------------------------------------------------------


class Link(Protocol):
    """How messages travel between endpoints (ZMQ in tcp.py, in-process in fake.py): one inbox
    at `address`, and an outbox per peer address, made on first use."""

    address: str
    sockets: list

    def send(self, address: str, frames: list) -> None:
        """Queues one message without blocking; raises KVTransferError."""

    def recv(self, max_messages: int) -> list[list]:
        """Messages already in the inbox, at most `max_messages` (non-blocking)."""

    def drop(self, address: str) -> None:
        """Forgets the outbox to `address` and what is still queued in it."""

    def close(self) -> None: ...


class KVSender(abc.ABC):
    """Streams requests' KV to receivers, layer by layer, without blocking the caller."""

    reply_address: str  # where receivers send KVAck; put it in KVBegin.reply_address
    sockets: list  # zmq sockets to register in the worker's Poller for POLLIN

    @property
    @abc.abstractmethod
    def num_inflight(self) -> int:
        """Transfers begun and not yet settled (Heartbeat.num_inflight_kv)."""

    @abc.abstractmethod
    def begin(self, dest_address: str, msg: KVBegin) -> None:
        """Starts a transfer; raises KVBackpressure when `max_inflight_bytes` would be exceeded."""

    @abc.abstractmethod
    def send_layer(self, request_id: str, layer: int, kv: torch.Tensor) -> None:
        """Queues one layer [2, kvh, T, hd]; `kv` must not be modified in place afterwards.
        A no-op for a transfer that was settled meanwhile (nack, abort, expiry)."""

    @abc.abstractmethod
    def done(self, request_id: str, output_token_ids: list[int] = ()) -> None:
        """Every layer is sent; the ack is due within `timeout_s`."""

    @abc.abstractmethod
    def abort(self, request_id: str, reason: str) -> None:
        """Tells the receiver, forgets the transfer and frees what it held."""

    @abc.abstractmethod
    def poll_acks(self) -> list[KVAck]:
        """Acks that arrived (non-blocking); each settles and frees its transfer."""

    @abc.abstractmethod
    def expired(self, now: float) -> list[str]:
        """Request ids whose transfer made no progress and got no ack for `timeout_s`; freed."""

    @abc.abstractmethod
    def close(self) -> None:
        """Aborts what is in flight, frees every resource, closes the sockets."""


class KVReceiver(abc.ABC):
    """Receives KV on one bound address (tcp frames and shm notices alike) and acks it."""

    address: str  # where senders send KV (advertise it in Hello.kv_address)
    sockets: list  # zmq sockets to register in the worker's Poller for POLLIN

    @property
    @abc.abstractmethod
    def num_inflight(self) -> int:
        """Transfers begun and not yet settled by an ack, abort or failure."""

    @abc.abstractmethod
    def poll(self) -> list[KVEvent]:
        """Events that arrived (non-blocking); malformed frames are logged and dropped."""

    @abc.abstractmethod
    def ack(self, request_id: str, ok: bool, reason: str = "") -> None:
        """Answers the sender: ok after KVDoneEvent, or a refusal; a no-op once settled."""

    @abc.abstractmethod
    def expired(self, now: float) -> list[str]:
        """Request ids begun but stalled for `timeout_s`; already nacked to their sender."""

    @abc.abstractmethod
    def close(self) -> None:
        """Nacks unfinished transfers and closes the sockets."""


# -- bookkeeping -------------------------------------------------------------------------------


def transfer_nbytes(msg: KVBegin) -> int:
    return msg.num_layers * meta_nbytes(msg.layer)


@dataclass
class Outgoing:
    """One transfer on the sender, from begin until its ack, abort or expiry."""

    msg: KVBegin
    dest: str
    nbytes: int
    deadline: float
    is_done: bool = False


class SenderBook:
    """In-flight transfers, their byte budget and deadlines (no I/O)."""

    def __init__(self, max_inflight_bytes: int, timeout_s: float) -> None:
        if max_inflight_bytes <= 0 or timeout_s <= 0:
            raise ValueError("max_inflight_bytes and timeout_s must be positive")
        self.max_inflight_bytes = max_inflight_bytes
        self.timeout_s = timeout_s
        self.inflight_bytes = 0
        self.transfers: dict[str, Outgoing] = {}

    def open(self, msg: KVBegin, dest: str) -> Outgoing:
        rid = msg.request_id
        if rid in self.transfers:
            raise ValueError(f"request {rid}: a KV transfer is already in flight")
        nbytes = transfer_nbytes(msg)
        # NOTE: a transfer larger than the whole budget still goes when nothing else is in
        # flight, or it could never go at all.
        if self.transfers and self.inflight_bytes + nbytes > self.max_inflight_bytes:
            raise KVBackpressure(
                f"request {rid}: {nbytes} KV bytes would exceed max_inflight_bytes "
                f"{self.max_inflight_bytes} ({self.inflight_bytes} in flight in "
                f"{len(self.transfers)} transfers); retry after acks come back"
            )
        out = Outgoing(msg, dest, nbytes, time.monotonic() + self.timeout_s)
        self.transfers[rid] = out
        self.inflight_bytes += nbytes
        return out

    def touch(self, rid: str, is_done: bool = False) -> None:
        out = self.transfers[rid]
        out.deadline = time.monotonic() + self.timeout_s
        out.is_done = out.is_done or is_done

    def settle(self, rid: str) -> Outgoing | None:
        out = self.transfers.pop(rid, None)
        if out is not None:
            self.inflight_bytes -= out.nbytes
        return out

    def expired(self, now: float) -> list[Outgoing]:
        late = [rid for rid, out in self.transfers.items() if out.deadline < now]
        return [self.settle(rid) for rid in late]

    def has_dest(self, dest: str) -> bool:
        return any(out.dest == dest for out in self.transfers.values())


@dataclass
class Incoming:
    """One transfer on the receiver, from KVBegin until the worker's ack (or its failure)."""

    msg: KVBegin
    deadline: float
    layers: set[int] = field(default_factory=set)
    is_done: bool = False

    @property
    def layer_meta(self) -> TensorMeta:
        return self.msg.layer


class ReceiverBook:
    """Transfers under way or awaiting the worker's ack, and their deadlines (no I/O)."""

    def __init__(self, timeout_s: float) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.timeout_s = timeout_s
        self.transfers: dict[str, Incoming] = {}

    def open(self, msg: KVBegin) -> Incoming:
        inc = Incoming(msg, time.monotonic() + self.timeout_s)
        self.transfers[msg.request_id] = inc
        return inc

    def touch(self, inc: Incoming) -> None:
        inc.deadline = time.monotonic() + self.timeout_s

    def pop(self, rid: str) -> Incoming | None:
        return self.transfers.pop(rid, None)

    def expired(self, now: float) -> list[Incoming]:
        """Stalled transfers; one that is done only waits for its worker's ack, never expires."""
        late = [r for r, inc in self.transfers.items() if not inc.is_done and inc.deadline < now]
        return [self.transfers.pop(r) for r in late]
