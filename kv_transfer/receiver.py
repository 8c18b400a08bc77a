"""`Receiver`: the KVReceiver every transport uses. One bound address takes tcp frames and shm
notices alike (a KVLayer with `shm_name` set lives in shared memory; otherwise its bytes are
the next frame), so one decode worker serves same-host and remote prefill workers at once.

A transfer lives in the book from KVBegin until it settles: the worker's `ack` (after
KVDoneEvent, or a refusal), a KVAbort from the sender, or a failure found here (a layer that
does not match KVBegin, a missing layer at KVDone, an unreadable segment, a stall past
`timeout_s`). A failure found here nacks the sender itself and hands the worker a KVAbortEvent,
so the worker frees its blocks the same way whoever ended the transfer; acking it again
afterwards is a harmless no-op. Anything that does not decode is logged and dropped.
"""

from __future__ import annotations

import logging

from kv_transfer.base import (
    Incoming,
    KVAbortEvent,
    KVBeginEvent,
    KVDoneEvent,
    KVEvent,
    KVLayerEvent,
    KVReceiver,
    KVTransferError,
    Link,
    ReceiverBook,
)
from kv_transfer.shm import ShmAttachments
from tideserve.protocol import (
    MAX_TENSOR_BYTES,
    KVAbort,
    KVAck,
    KVBegin,
    KVDone,
    KVLayer,
    ProtocolError,
    decode,
    encode,
    meta_nbytes,
)
from tideserve.tensor_frames import from_frame

log = logging.getLogger(__name__)

MAX_MESSAGES_PER_POLL = 1024
MAX_LAYERS = 4096


class Receiver(KVReceiver):
    def __init__(self, link: Link, timeout_s: float = 30.0) -> None:
        self.link = link
        self.book = ReceiverBook(timeout_s)
        self.shm = ShmAttachments()
        self.address = link.address
        self.sockets = link.sockets
        self._handlers = {
            KVBegin: self.handle_kv_begin,
            KVLayer: self.handle_kv_layer,
            KVDone: self.handle_kv_done,
            KVAbort: self.handle_kv_abort,
        }

    @property
    def num_inflight(self) -> int:
        return len(self.book.transfers)

    def poll(self) -> list[KVEvent]:
        self.shm.sweep()
        events = []
        for frames in self.link.recv(MAX_MESSAGES_PER_POLL):
            try:
                msg, raws = decode(frames)
            except ProtocolError as e:
                log.warning("dropped a malformed message on the KV socket: %s", e)
                continue
            handler = self._handlers.get(type(msg))
            if handler is None:
                log.warning("dropped an unexpected %s on the KV socket", type(msg).__name__)
                continue
            try:
                event = handler(msg, raws)
            except (ValueError, OSError) as e:  # ProtocolError is a ValueError
                event = self._fail(msg, str(e))
            if event is not None:
                events.append(event)
        return events

    def ack(self, request_id: str, ok: bool, reason: str = "") -> None:
        inc = self.book.transfers.get(request_id)
        if inc is None:
            log.debug("request %s: ack(ok=%s) for a settled transfer ignored", request_id, ok)
            return
        if ok and not inc.is_done:
            raise ValueError(f"request {request_id}: ack(ok=True) before KVDone")
        self.book.pop(request_id)
        self.shm.release(request_id)
        self._send_ack(inc.msg.reply_address, KVAck(request_id, ok, reason))

    def expired(self, now: float) -> list[str]:
        late = self.book.expired(now)
        for inc in late:
            rid = inc.msg.request_id
            self.shm.release(rid)
            log.warning(
                "request %s: KV transfer stalled (%d of %d layers) for %.1fs; dropped",
                rid,
                len(inc.layers),
                inc.msg.num_layers,
                self.book.timeout_s,
            )
            self._nack(inc, "KV transfer timed out at the receiver")
        return [inc.msg.request_id for inc in late]

    def close(self) -> None:
        for inc in list(self.book.transfers.values()):
            if not inc.is_done:
                self._nack(inc, "the receiver is closing")
        self.book.transfers.clear()
        self.shm.close()
        self.link.close()

    # -- handlers ------------------------------------------------------------------------------

    def handle_kv_begin(self, msg: KVBegin, raws: list) -> KVBeginEvent | None:
        rid = msg.request_id
        if rid in self.book.transfers:
            log.warning("request %s: duplicate KVBegin dropped", rid)
            return None
        if raws or not 0 < msg.num_layers <= MAX_LAYERS:
            raise ProtocolError(f"KVBegin with {msg.num_layers} layers and {len(raws)} frames")
        if any(d < 0 for d in msg.layer.shape):
            raise ProtocolError(f"negative dimension in layer shape {msg.layer.shape}")
        try:
            nbytes = meta_nbytes(msg.layer)
        except TypeError:
            raise ProtocolError(f"unknown dtype {msg.layer.dtype!r}") from None
        if nbytes > MAX_TENSOR_BYTES:
            raise ProtocolError(f"a layer of {nbytes} bytes exceeds {MAX_TENSOR_BYTES}")
        self.book.open(msg)
        return KVBeginEvent(msg)

    def handle_kv_layer(self, msg: KVLayer, raws: list) -> KVLayerEvent | None:
        inc = self._known(msg)
        if inc is None:
            return None
        if inc.is_done:
            log.warning("request %s: layer %d after KVDone dropped", msg.request_id, msg.layer)
            return None
        if not 0 <= msg.layer < inc.msg.num_layers or msg.layer in inc.layers:
            raise ProtocolError(f"unexpected layer {msg.layer} (of {inc.msg.num_layers})")
        if msg.tensor != inc.layer_meta:
            raise ProtocolError(f"layer {msg.layer} is {msg.tensor}, KVBegin said {inc.layer_meta}")
        if msg.shm_name:
            if raws:
                raise ProtocolError("an shm layer notice carries a tensor frame")
            tensor = self.shm.view(msg)
        else:
            if len(raws) != 1:
                raise ProtocolError(f"a tcp layer needs one tensor frame, got {len(raws)}")
            tensor = from_frame(msg.tensor, raws[0])
        inc.layers.add(msg.layer)
        self.book.touch(inc)
        return KVLayerEvent(msg.request_id, msg.layer, tensor)

    def handle_kv_done(self, msg: KVDone, raws: list) -> KVDoneEvent | None:
        inc = self._known(msg)
        if inc is None:
            return None
        if inc.is_done:
            log.warning("request %s: duplicate KVDone dropped", msg.request_id)
            return None
        if len(inc.layers) != inc.msg.num_layers:
            raise ProtocolError(f"KVDone after {len(inc.layers)} of {inc.msg.num_layers} layers")
        inc.is_done = True
        self.shm.release(msg.request_id)
        return KVDoneEvent(msg.request_id, tuple(msg.output_token_ids))

    def handle_kv_abort(self, msg: KVAbort, raws: list) -> KVAbortEvent | None:
        inc = self._known(msg)
        if inc is None:
            return None
        self.book.pop(msg.request_id)
        self.shm.release(msg.request_id)
        if inc.is_done:
            log.info("request %s: KVAbort after KVDone ignored: %s", msg.request_id, msg.reason)
            return None
        log.info("request %s: KV transfer aborted by the sender: %s", msg.request_id, msg.reason)
        return KVAbortEvent(msg.request_id, msg.reason or "aborted by the sender")

    # -- helpers -------------------------------------------------------------------------------

    def _known(self, msg) -> Incoming | None:
        inc = self.book.transfers.get(msg.request_id)
        if inc is None:
            log.debug("request %s: %s for no transfer dropped", msg.request_id, type(msg).__name__)
        return inc

    def _fail(self, msg, reason: str) -> KVAbortEvent | None:
        rid = msg.request_id
        log.warning("request %s: bad %s: %s", rid, type(msg).__name__, reason)
        inc = self.book.pop(rid)
        if inc is None:
            if isinstance(msg, KVBegin) and msg.reply_address:
                self._send_ack(msg.reply_address, KVAck(rid, False, f"bad KVBegin: {reason}"))
            return None
        self.shm.release(rid)
        self._nack(inc, reason)
        return KVAbortEvent(rid, reason)

    def _nack(self, inc: Incoming, reason: str) -> None:
        self._send_ack(inc.msg.reply_address, KVAck(inc.msg.request_id, False, reason))

    def _send_ack(self, address: str, ack: KVAck) -> None:
        try:
            self.link.send(address, encode(ack))
        except KVTransferError as e:
            log.warning("request %s: could not send the KV ack: %s", ack.request_id, e)
