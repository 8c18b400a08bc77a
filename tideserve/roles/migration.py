"""Live migration of a running request between decode workers (Llumnix), both ends.

The source (`MigrationSource`) moves a request in stages over kv_transfer, each stage one
transfer (`<id>#m<k>`) whose KVBegin says which request it moves (`migration_of`), where its
KV starts (`token_offset`) and whether it is the last (`final`):

    stage 0      the KV computed so far, while the request keeps decoding here
    stage 1..    the KV written meanwhile, each sent once the previous one is acked
    last stage   when at most `final_tokens` are left (or after `max_stages`): pause the
                 request, send the rest; the destination joins it to its batch and acks;
                 the source frees it and tells the router (MigrationDone, after its last
                 TokenChunk on the same socket), which switches the stream to the destination

Pre-allocate -> copy -> commit, with an abort at every step: a destination without room
refuses a stage (nothing changes here: the request goes on, the router hears
MigrationFailed); a request that finishes, is aborted or preempted meanwhile cancels its
migration (KVAbort frees the destination's blocks); a stage that times out cancels it too.
Blocks are freed on whichever side does not keep the request.

The destination (`MigrationSink`) imports stages into one sequence (begin_import, then
extend_import), commits on the final stage's KVDone, and drops a half-moved request whose
next stage does not come within the KV timeout.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kv_transfer import KVBackpressure, KVTransferError
from tideserve.engine.sequence import SequenceStatus
from tideserve.protocol import (
    KVBegin,
    MigrateRequest,
    MigrationDone,
    MigrationFailed,
    Params,
)
from tideserve.tensor_frames import meta_of

log = logging.getLogger(__name__)


def params_of(seq) -> Params:
    p = seq.params
    return Params(**{f: getattr(p, f) for f in Params.__struct_fields__})


@dataclass
class _Outgoing:
    request_id: str
    dest: str
    address: str
    transport: str
    preemptions: int
    started: float
    sent: int = 0  # KV positions the destination has (or has in flight)
    stage: int = 0  # stages sent
    inflight: str = ""  # transfer id of the stage awaiting its ack
    final_sent: bool = False
    paused_at: float = 0.0


class MigrationSource:
    def __init__(
        self,
        engine,
        link,
        worker_id: str,
        senders: Callable[[], dict],
        final_tokens: int = 32,
        max_stages: int = 4,
    ) -> None:
        self.engine = engine
        self.link = link
        self.wid = worker_id
        self.senders = senders  # transport -> KVSender, made on first use
        self.final_tokens = final_tokens  # at most this many left: pause and send the rest
        self.max_stages = max_stages
        self.out: dict[str, _Outgoing] = {}  # request id -> migration
        self.by_transfer: dict[str, str] = {}  # stage transfer id -> request id
        self.done_pauses: list[float] = []  # pause of each committed migration (stats)

    @property
    def active(self) -> bool:
        return bool(self.out)

    def start(self, msg: MigrateRequest) -> None:
        rid = msg.request_id
        seq = self.engine.seqs.get(rid)
        why = None
        if seq is None or seq.is_finished:
            why = "the request is not running here"
        elif seq.status is not SequenceStatus.RUNNING or seq.is_prefill:
            why = f"the request is not decoding ({seq.status.value})"
        elif rid in self.out:
            why = "the request is already migrating"
        elif msg.kv_transport not in self.senders():
            why = f"unknown KV transport {msg.kv_transport!r}"
        if why:
            self.link.send(MigrationFailed(rid, self.wid, why))
            return
        self.out[rid] = _Outgoing(
            rid, msg.dest_worker_id, msg.dest_kv_address, msg.kv_transport,
            seq.num_preemptions, time.monotonic(),
        )  # fmt: skip
        log.info("request %s: migrating to %s", rid, msg.dest_worker_id)
        self._advance(self.out[rid])

    def cancel(self, rid: str, reason: str, tell_router: bool = True) -> None:
        out = self.out.pop(rid, None)
        if out is None:
            return
        if out.inflight:
            self.by_transfer.pop(out.inflight, None)
            self.senders()[out.transport].abort(out.inflight, reason)
        if rid in self.engine.seqs:
            self.engine.resume(rid)  # a no-op unless its last stage had paused it
        log.info("request %s: migration to %s cancelled: %s", rid, out.dest, reason)
        if tell_router:
            self.link.send(MigrationFailed(rid, self.wid, reason))

    def cancel_all(self, reason: str) -> None:
        for rid in list(self.out):
            self.cancel(rid, reason, tell_router=False)

    def poll(self) -> None:
        """Acks and timeouts of stages in flight; the next stage of each migration."""
        if not self.out:
            return
        now = time.monotonic()
        for sender in self.senders().values():
            for ack in sender.poll_acks():
                self._on_ack(ack.request_id, ack.ok, ack.reason)
            for tid in sender.expired(now):
                self._on_ack(tid, False, "a migration stage timed out")
        for out in list(self.out.values()):
            if out.final_sent:
                continue  # paused here, committed there: only the ack decides now
            seq = self.engine.seqs.get(out.request_id)
            if seq is None or seq.is_finished:
                self.cancel(out.request_id, "the request finished")
            elif seq.num_preemptions != out.preemptions:
                self.cancel(out.request_id, "the request was preempted")
            elif not out.inflight:
                self._advance(out)

    def _on_ack(self, tid: str, ok: bool, reason: str) -> None:
        rid = self.by_transfer.pop(tid, None)
        out = self.out.get(rid) if rid else None
        if out is None or out.inflight != tid:
            return
        out.inflight = ""
        if not ok:
            self.cancel(rid, f"the destination refused: {reason}")
            return
        if out.final_sent:  # committed: the destination runs it now
            del self.out[rid]
            self.engine.abort(rid)
            pause = time.monotonic() - out.paused_at
            self.done_pauses.append(pause)
            self.link.send(MigrationDone(rid, self.wid, out.dest, out.stage, pause))
            log.info(
                "request %s: migrated to %s in %d stages, paused %.1f ms",
                rid, out.dest, out.stage, pause * 1e3,
            )  # fmt: skip

    def _advance(self, out: _Outgoing) -> None:
        rid = out.request_id
        seq = self.engine.seqs.get(rid)
        if seq is None or seq.is_finished:
            self.cancel(rid, "the request finished")
            return
        if seq.status is not SequenceStatus.RUNNING or seq.num_preemptions != out.preemptions:
            self.cancel(rid, "the request was preempted")
            return
        left = seq.num_computed_tokens - out.sent
        final = left <= self.final_tokens or out.stage >= self.max_stages - 1
        if final:
            self.engine.pause(rid)
            out.paused_at = time.monotonic()
        try:
            self._send_stage(out, seq, final)
        except (KVBackpressure, KVTransferError, OSError, ValueError) as e:
            self.cancel(rid, f"could not send a stage: {e}")

    def _send_stage(self, out: _Outgoing, seq, final: bool) -> None:
        rid, start, end = out.request_id, out.sent, seq.num_computed_tokens
        n_layers = self.engine.model_config.num_layers
        layers = [self.engine.export_kv_layer(rid, i, start, end) for i in range(n_layers)]
        sender = self.senders()[out.transport]
        tid = f"{rid}#m{out.stage}"
        begin = KVBegin(
            request_id=tid,
            src_worker_id=self.wid,
            reply_address=sender.reply_address,
            prompt_token_ids=list(seq.prompt_token_ids),
            output_token_ids=list(seq.output_token_ids),
            num_kv_tokens=end,
            params=params_of(seq),
            priority=seq.priority,
            num_layers=n_layers,
            layer=meta_of(layers[0]),
            migration_of=rid,
            token_offset=start,
            final=final,
        )
        sender.begin(out.address, begin)
        for i, kv in enumerate(layers):
            sender.send_layer(tid, i, kv)
        sender.done(tid, [])
        out.inflight, out.sent, out.final_sent = tid, end, final
        out.stage += 1
        self.by_transfer[tid] = rid


@dataclass
class _Incoming:
    request_id: str
    last_seen: float
    stages: dict[str, tuple[int, bool]] = field(default_factory=dict)  # tid -> (offset, final)


class MigrationSink:
    """The destination's side: stages of migrated requests into the engine."""

    def __init__(self, engine, receiver, timeout_s: float) -> None:
        self.engine = engine
        self.receiver = receiver
        self.timeout_s = timeout_s
        self.incoming: dict[str, _Incoming] = {}  # request id -> half-moved request
        self.by_transfer: dict[str, str] = {}  # stage transfer id -> request id

    def owns(self, tid: str) -> bool:
        return tid in self.by_transfer

    def begin(self, m: KVBegin, params) -> None:
        rid, tid = m.migration_of, m.request_id
        inc = self.incoming.get(rid)
        if m.token_offset == 0 and inc is None:
            ok = self.engine.begin_import(
                rid, m.prompt_token_ids, m.output_token_ids, m.num_kv_tokens, params, m.priority
            )
            if ok:
                inc = self.incoming[rid] = _Incoming(rid, time.monotonic())
        elif inc is not None and m.token_offset > 0:
            ok = self.engine.extend_import(rid, m.output_token_ids, m.num_kv_tokens)
        else:
            raise ValueError(f"migration stage {tid} does not follow the stages before it")
        if not ok:
            self.receiver.ack(tid, False, "no free KV blocks on the destination")
            self.drop(rid)
            return
        inc.stages[tid] = (m.token_offset, m.final)
        inc.last_seen = time.monotonic()
        self.by_transfer[tid] = rid

    def layer(self, tid: str, layer: int, tensor) -> None:
        rid = self.by_transfer[tid]
        offset, _ = self.incoming[rid].stages[tid]
        self.engine.import_kv_layer(rid, layer, tensor, start=offset)

    def done(self, tid: str) -> None:
        rid = self.by_transfer.pop(tid)
        inc = self.incoming[rid]
        _, final = inc.stages.pop(tid)
        inc.last_seen = time.monotonic()
        if final:
            del self.incoming[rid]
            self.engine.finish_import(rid, ())
        self.receiver.ack(tid, True)

    def abort(self, tid: str) -> None:
        rid = self.by_transfer.pop(tid, None)
        if rid is not None:
            self.drop(rid)

    def drop(self, rid: str) -> None:
        inc = self.incoming.pop(rid, None)
        if inc is not None:
            for tid in inc.stages:
                self.by_transfer.pop(tid, None)
        self.engine.abort(rid)

    def expire(self, now: float) -> None:
        """Half-moved requests whose next stage never came (the source died)."""
        for rid, inc in list(self.incoming.items()):
            if now - inc.last_seen > self.timeout_s:
                log.warning("request %s: migration stalled; dropping what arrived", rid)
                self.drop(rid)
