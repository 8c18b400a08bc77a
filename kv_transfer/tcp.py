"""The tcp transport: KV over ZMQ, PUSH (one per peer, connected lazily) -> PULL (bound).

`ZmqLink` is one endpoint: a bound PULL inbox plus a cached PUSH outbox per peer address. A
sender's link receives acks and sends KV; a receiver's link receives KV and sends acks; the shm
transport rides the same link with small notices instead of tensor frames. Every send is
non-blocking: the data outboxes have no high-water mark (the sender bounds its bytes in flight
itself), so a send only fails for a bad address, and a full ack queue drops the ack (the sender
then times out). A KVLayer travels as [header, raw tensor frame], zero-copy: ZMQ holds a
reference to the tensor's buffer until the bytes are on the wire.
"""

from __future__ import annotations

import logging
import socket

import numpy as np
import zmq

from kv_transfer.base import KVTransferError
from tideserve.protocol import KVBegin, KVLayer, TensorMeta
from tideserve.security import CurveKeys, make_client, make_server, warn_if_exposed

log = logging.getLogger(__name__)

_WILDCARD_HOSTS = ("0.0.0.0", "*", "::", "")
# NOTE: peers name the address to answer (KVBegin.reply_address): a socket kept for every name
# a hostile peer sends would exhaust the file descriptors, so the least recently used goes
MAX_OUTBOXES = 128


class ZmqLink:
    """A bound PULL inbox (`address`) and lazily connected PUSH outboxes, one per peer. With
    `curve` the inbox is a CURVE server and the outboxes its clients; the context must run an
    authenticator (tideserve.security.start_authenticator), or the inbox admits no one."""

    def __init__(
        self,
        ctx: zmq.Context,
        bind_host: str = "127.0.0.1",
        port: int = 0,
        advertise_host: str | None = None,
        send_hwm: int = 0,
        linger_ms: int = 200,
        curve: CurveKeys | None = None,
    ) -> None:
        self.ctx = ctx
        self.curve = curve
        self.send_hwm = send_hwm  # messages queued per peer; 0 = unbounded
        self.linger_ms = linger_ms  # how long close() lets queued messages (aborts) drain
        self.inbox = ctx.socket(zmq.PULL)
        self.inbox.setsockopt(zmq.RCVHWM, 0)
        self.inbox.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            make_server(self.inbox, curve)
        warn_if_exposed("a KV socket", bind_host, curve is not None, "CURVE")
        self.address = self._bind(bind_host, port, advertise_host)
        self.sockets = [self.inbox]
        self._outboxes: dict[str, zmq.Socket] = {}

    def _bind(self, host: str, port: int, advertise_host: str | None) -> str:
        is_v6 = ":" in host
        if is_v6:
            self.inbox.setsockopt(zmq.IPV6, 1)
        where = f"tcp://{f'[{host}]' if is_v6 else host or '*'}:{port or '*'}"
        try:
            self.inbox.bind(where)
        except zmq.ZMQError as e:
            self.inbox.close(0)
            raise KVTransferError(f"cannot bind the KV socket at {where}: {e}") from None
        bound_port = self.inbox.getsockopt(zmq.LAST_ENDPOINT).decode().rsplit(":", 1)[1]
        shown = advertise_host or (socket.gethostname() if host in _WILDCARD_HOSTS else host)
        return f"tcp://{f'[{shown}]' if ':' in shown else shown}:{bound_port}"

    def send(self, address: str, frames: list) -> None:
        """Queues one multipart message for `address`; raises KVTransferError, never blocks."""
        sock = self._outboxes.pop(address, None) or self._connect(address)
        self._outboxes[address] = sock  # most recently used last
        try:
            sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            raise KVTransferError(f"the send queue to {address} is full") from None
        except zmq.ZMQError as e:
            raise KVTransferError(f"cannot send to {address}: {e}") from None

    def _connect(self, address: str) -> zmq.Socket:
        if not address.startswith("tcp://"):  # NOTE: an inproc peer that never binds is held
            raise KVTransferError(f"not a tcp:// address: {address!r}")  # until the context ends
        while len(self._outboxes) >= MAX_OUTBOXES:  # what it still queues is dropped
            self._outboxes.pop(next(iter(self._outboxes))).close(0)
        try:
            sock = self.ctx.socket(zmq.PUSH)
        except zmq.ZMQError as e:  # out of file descriptors or sockets
            raise KVTransferError(f"cannot open a socket to {address!r}: {e}") from None
        sock.setsockopt(zmq.SNDHWM, self.send_hwm)
        sock.setsockopt(zmq.LINGER, self.linger_ms)
        if address.startswith("tcp://["):
            sock.setsockopt(zmq.IPV6, 1)
        if self.curve is not None:
            make_client(sock, self.curve)
        try:
            sock.connect(address)
        except zmq.ZMQError as e:
            sock.close(0)
            raise KVTransferError(f"cannot connect to {address!r}: {e}") from None
        self._outboxes[address] = sock
        return sock

    def recv(self, max_messages: int) -> list[list[zmq.Frame]]:
        """Up to `max_messages` messages already queued in the inbox (non-blocking)."""
        out = []
        while len(out) < max_messages:
            try:
                out.append(self.inbox.recv_multipart(flags=zmq.NOBLOCK, copy=False))
            except zmq.Again:
                break
        return out

    def drop(self, address: str) -> None:
        """Closes the outbox to `address`, discarding what is still queued (a dead peer)."""
        sock = self._outboxes.pop(address, None)
        if sock is not None:
            sock.close(0)

    def close(self) -> None:
        for sock in self._outboxes.values():
            sock.close(self.linger_ms)
        self._outboxes.clear()
        self.inbox.close(0)


class InlinePayload:
    """Sender side of tcp: each layer's bytes ride in the message as their own frame (flat:
    the shape is in the header, and a 1-D view also encodes when it is empty)."""

    def open(self, msg: KVBegin) -> None:
        pass

    def layer(
        self, msg: KVBegin, layer: int, meta: TensorMeta, array: np.ndarray
    ) -> tuple[KVLayer, list[np.ndarray]]:
        return KVLayer(msg.request_id, layer, meta), [array.reshape(-1)]

    def release(self, request_id: str, reuse: bool = False) -> None:
        pass

    def close(self) -> None:
        pass
