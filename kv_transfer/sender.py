"""`Sender`: the KVSender every transport uses, composed of a link (how messages travel: ZMQ,
or in-process for tests) and a payload (how a layer's bytes travel: inline frames, or a
shared-memory segment with a notice).

A transfer lives in the book from `begin` until it settles: an ack from the receiver (ok or
not), `abort`, expiry, or a send that failed. A failed send never raises into the caller (it
runs inside the model's forward pass): it settles the transfer and comes out of `poll_acks` as
a KVAck(ok=False) of our own. Settling frees the payload and the byte budget at once.
"""

from __future__ import annotations

import logging
from typing import Protocol

import numpy as np
import torch

from kv_transfer.base import KVBackpressure, KVSender, KVTransferError, Link, SenderBook
from tideserve.protocol import (
    KVAbort,
    KVAck,
    KVBegin,
    KVDone,
    KVLayer,
    ProtocolError,
    TensorMeta,
    decode,
    encode,
)
from tideserve.tensor_frames import to_frame

log = logging.getLogger(__name__)

MAX_ACKS_PER_POLL = 1024


class SenderPayload(Protocol):
    """How a layer's bytes travel (tcp.InlinePayload, shm.ShmSegments)."""

    def open(self, msg: KVBegin) -> None:
        """Allocates what the transfer needs; raises OSError or KVBackpressure."""

    def layer(
        self, msg: KVBegin, layer: int, meta: TensorMeta, array: np.ndarray
    ) -> tuple[KVLayer, list[np.ndarray]]:
        """The KVLayer message and the raw frames that follow it."""

    def release(self, request_id: str, reuse: bool = False) -> None:
        """Frees the transfer's buffer; `reuse`: the receiver has read it all (an ok ack)."""

    def close(self) -> None: ...


class Sender(KVSender):
    def __init__(
        self,
        link: Link,
        payload: SenderPayload,
        max_inflight_bytes: int = 1 << 30,
        timeout_s: float = 30.0,
    ) -> None:
        self.link = link
        self.payload = payload
        self.book = SenderBook(max_inflight_bytes, timeout_s)
        self.reply_address = link.address
        self.sockets = link.sockets
        self._local_acks: list[KVAck] = []  # transfers that failed on this side

    @property
    def num_inflight(self) -> int:
        return len(self.book.transfers)

    @property
    def inflight_bytes(self) -> int:
        return self.book.inflight_bytes

    def begin(self, dest_address: str, msg: KVBegin) -> None:
        rid = msg.request_id
        if msg.reply_address != self.reply_address:
            raise ValueError(
                f"request {rid}: KVBegin.reply_address is {msg.reply_address!r}, but this "
                f"sender's acks arrive at {self.reply_address!r}"
            )
        self.book.open(msg, dest_address)
        try:
            self.payload.open(msg)
        except OSError as e:  # out of shared memory or file descriptors: retry later
            self.book.settle(rid)
            raise KVBackpressure(f"request {rid}: cannot allocate the KV buffer: {e}") from e
        except BaseException:
            self.book.settle(rid)
            raise
        log.debug("request %s: KV transfer to %s begins", rid, dest_address)
        self._send(rid, encode(msg))

    def send_layer(self, request_id: str, layer: int, kv: torch.Tensor) -> None:
        out = self.book.transfers.get(request_id)
        if out is None:
            log.debug("request %s: layer %d not sent, the transfer is settled", request_id, layer)
            return
        meta, array = to_frame(kv)
        if meta != out.msg.layer or not 0 <= layer < out.msg.num_layers:
            raise ValueError(
                f"request {request_id}: layer {layer} {meta} does not match KVBegin's "
                f"{out.msg.num_layers} layers of {out.msg.layer}"
            )
        notice, arrays = self.payload.layer(out.msg, layer, meta, array)
        if self._send(request_id, encode(notice, *arrays)):
            self.book.touch(request_id)

    def done(self, request_id: str, output_token_ids: list[int] = ()) -> None:
        if request_id not in self.book.transfers:
            log.debug("request %s: KVDone not sent, the transfer is settled", request_id)
            return
        if self._send(request_id, encode(KVDone(request_id, list(output_token_ids)))):
            self.book.touch(request_id, is_done=True)

    def abort(self, request_id: str, reason: str) -> None:
        out = self.book.settle(request_id)
        if out is None:
            return
        self.payload.release(request_id)
        log.info("request %s: KV transfer aborted: %s", request_id, reason)
        self._tell(out.dest, KVAbort(request_id, reason))

    def poll_acks(self) -> list[KVAck]:
        acks, self._local_acks = self._local_acks, []
        for frames in self.link.recv(MAX_ACKS_PER_POLL):
            try:
                msg, raws = decode(frames)
            except ProtocolError as e:
                log.warning("dropped a malformed message on the KV reply socket: %s", e)
                continue
            if not isinstance(msg, KVAck) or raws:
                log.warning("dropped an unexpected %s on the KV reply socket", type(msg).__name__)
                continue
            if self.book.settle(msg.request_id) is None:
                log.info("request %s: late KV ack (ok=%s) ignored", msg.request_id, msg.ok)
                continue
            self.payload.release(msg.request_id, reuse=msg.ok)
            if not msg.ok:
                log.info("request %s: KV refused by the receiver: %s", msg.request_id, msg.reason)
            acks.append(msg)
        return acks

    def expired(self, now: float) -> list[str]:
        late = self.book.expired(now)
        for out in late:
            rid = out.msg.request_id
            self.payload.release(rid)
            log.warning(
                "request %s: no KV ack from %s within %.1fs; transfer dropped",
                rid,
                out.dest,
                self.book.timeout_s,
            )
            if self.book.has_dest(out.dest):
                self._tell(out.dest, KVAbort(rid, "the sender timed out waiting for the ack"))
            else:
                self.link.drop(out.dest)  # a dead peer: discard what is still queued for it
        return [out.msg.request_id for out in late]

    def close(self) -> None:
        for rid in list(self.book.transfers):
            self.abort(rid, "the sender is closing")
        self.payload.close()
        self.link.close()

    # -- helpers -------------------------------------------------------------------------------

    def _send(self, request_id: str, frames: list) -> bool:
        out = self.book.transfers[request_id]
        try:
            self.link.send(out.dest, frames)
            return True
        except KVTransferError as e:
            self.book.settle(request_id)
            self.payload.release(request_id)
            log.error("request %s: KV transfer to %s failed: %s", request_id, out.dest, e)
            self._local_acks.append(KVAck(request_id, False, f"KV send failed: {e}"))
            return False

    def _tell(self, dest: str, msg: KVAbort) -> None:
        try:
            self.link.send(dest, encode(msg))
        except KVTransferError as e:
            log.warning("request %s: could not tell %s: %s", msg.request_id, dest, e)
