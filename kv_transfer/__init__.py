"""KV-cache transfer between workers: one interface (`KVSender` / `KVReceiver`, see base.py),
five transports, picked per pair of workers by `choose_transport`:

    tcp   ZMQ PUSH -> PULL with zero-copy tensor frames; works across hosts     (tcp.py)
    shm   a POSIX shared-memory segment per transfer + notices over ZMQ; same host (shm.py)
    nccl  torch.distributed send/recv, GPU to GPU, a pair group made on demand    (dist.py)
    gloo  the same code on CPU tensors (tests it without a GPU)                   (dist.py)
    fake  in-process, for tests                                                  (fake.py)

    sender = make_sender("shm", ctx)              # prefill worker; acks at sender.reply_address
    receiver = make_receiver("tcp", ctx, port=0)  # decode worker; KV at receiver.address

A zmq receiver takes tcp frames and shm notices on the same address, whichever it was made for;
one made for gloo or nccl also joins the pairs senders offer.
With `curve=` (tideserve.security.CurveKeys) every inbox is a CURVE server and every outbox
its client; the context must run `start_authenticator`, or the inboxes admit no one.
"""

from __future__ import annotations

import zmq

from kv_transfer.base import (
    KVAbortEvent,
    KVBackpressure,
    KVBeginEvent,
    KVDoneEvent,
    KVEvent,
    KVLayerEvent,
    KVReceiver,
    KVSender,
    KVTransferError,
)
from kv_transfer.dist import DIST_BACKENDS, DistReceiver, DistSender, dist_available
from kv_transfer.fake import InProcLink
from kv_transfer.receiver import Receiver
from kv_transfer.sender import Sender
from kv_transfer.shm import SHM_PREFIX, ShmSegments
from kv_transfer.tcp import InlinePayload, ZmqLink
from tideserve.policy.routing import choose_kv_transport as choose_transport
from tideserve.security import CurveKeys

TRANSPORTS = ("tcp", "shm", "gloo", "nccl", "fake")

__all__ = [
    "KVAbortEvent",
    "KVBackpressure",
    "KVBeginEvent",
    "KVDoneEvent",
    "KVEvent",
    "KVLayerEvent",
    "KVReceiver",
    "KVSender",
    "KVTransferError",
    "SHM_PREFIX",
    "TRANSPORTS",
    "choose_transport",
    "dist_available",
    "make_receiver",
    "make_sender",
]


def make_sender(
    transport: str,
    ctx: zmq.Context | None = None,
    *,
    bind_host: str = "127.0.0.1",
    port: int = 0,
    advertise_host: str | None = None,
    timeout_s: float = 30.0,
    max_inflight_bytes: int = 1 << 30,
    shm_prefix: str = SHM_PREFIX,
    shm_pool_bytes: int = 256 << 20,
    curve: CurveKeys | None = None,
    device: str = "cpu",
    connect_timeout_s: float = 10.0,
) -> KVSender:
    """A sender whose ack socket binds at bind_host:port (0 = any free port). shm keeps acked
    segments up to `shm_pool_bytes` for reuse (0: unlink each one at its ack). gloo and nccl
    open a pair per destination (its TCPStore at bind_host; `device`: nccl's GPU), which must
    form within `connect_timeout_s`. With `curve`, ctx must run an authenticator
    (tideserve.security.start_authenticator)."""
    _check_transport(transport)
    link = _make_link(transport, ctx, bind_host, port, advertise_host, 0, curve)
    if transport in DIST_BACKENDS:
        return DistSender(
            link, transport, device, bind_host, advertise_host, max_inflight_bytes, timeout_s,
            connect_timeout_s,
        )  # fmt: skip
    if transport == "shm":
        payload = ShmSegments(shm_prefix, shm_pool_bytes)
    else:
        payload = InlinePayload()
    return Sender(link, payload, max_inflight_bytes=max_inflight_bytes, timeout_s=timeout_s)


def make_receiver(
    transport: str,
    ctx: zmq.Context | None = None,
    *,
    bind_host: str = "127.0.0.1",
    port: int = 0,
    advertise_host: str | None = None,
    timeout_s: float = 30.0,
    curve: CurveKeys | None = None,
    device: str = "cpu",
    connect_timeout_s: float = 10.0,
) -> KVReceiver:
    """A receiver bound at bind_host:port (0 = any free port); see `.address`. gloo and nccl
    receivers also join pairs (`device`: where nccl receives). With `curve`, ctx must run an
    authenticator (tideserve.security.start_authenticator)."""
    _check_transport(transport)
    link = _make_link(transport, ctx, bind_host, port, advertise_host, 10_000, curve)
    if transport in DIST_BACKENDS:
        return DistReceiver(
            link, transport, device, advertise_host or bind_host, timeout_s, connect_timeout_s
        )
    return Receiver(link, timeout_s=timeout_s)


def _check_transport(transport: str) -> None:
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown KV transport {transport!r}; choose one of {TRANSPORTS}")


def _make_link(transport, ctx, bind_host, port, advertise_host, send_hwm: int, curve):
    if transport == "fake":
        return InProcLink()
    ctx = ctx or zmq.Context.instance()
    return ZmqLink(ctx, bind_host, port, advertise_host, send_hwm=send_hwm, curve=curve)
