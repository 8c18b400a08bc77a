"""The decode worker (FuDG) and the colocated worker (NoDG, `--role colocated`).

Decode lifecycle of a request: KVBegin (reserve blocks; no room -> KVAck(ok=False)) -> KVLayer
x num_layers (copied into the cache as they arrive) -> KVDone with the prefill's first token
(join the running batch, KVAck ok) -> one TokenChunk per step -> TokenChunk with finish_reason.
An AbortRequest, a KVAbort or a transfer that stalls past `kv_timeout_s` frees the blocks.
A colocated worker also takes GenerateRequest and runs the whole request itself. Either role
moves running requests to another decode worker, and takes them in, on the router's
MigrateRequest (tideserve/roles/migration.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import msgspec

from kv_transfer import (
    KVAbortEvent,
    KVBeginEvent,
    KVDoneEvent,
    KVLayerEvent,
    KVTransferError,
)
from tideserve.engine.engine import LLMEngine
from tideserve.protocol import (
    AbortRequest,
    CancelMigration,
    GenerateRequest,
    HostReplica,
    MigrateRequest,
    ModuleCommand,
    RequestFailed,
    TokenBatch,
    TokenChunk,
)
from tideserve.roles.migration import MigrationSink, MigrationSource
from tideserve.roles.phases import PhaseController
from tideserve.worker import (
    RouterLink,
    WorkerConfig,
    WorkerLoop,
    engine_stats,
    to_sampling_params,
)

log = logging.getLogger(__name__)
ABORTED_TTL_S = 60.0


class DecodeWorker:
    def __init__(
        self,
        cfg: WorkerConfig,
        engine: LLMEngine,
        link: RouterLink,
        receiver,
        senders: Callable[[], dict] | None = None,
    ) -> None:
        self.cfg = cfg
        self.wid = cfg.resolved_id
        self.engine = engine
        self.link = link
        self.receiver = receiver
        self.importing: set[str] = set()
        self.aborted: dict[str, float] = {}  # request id -> when; late KV for these is refused
        self.migration = MigrationSource(engine, link, self.wid, self._senders)
        self.sink = MigrationSink(engine, receiver, cfg.kv_timeout_s)
        self._make_senders = senders
        self._watching = False
        handlers = {
            AbortRequest: self.handle_abort,
            MigrateRequest: self.migration.start,
            CancelMigration: self.handle_cancel_migration,
        }
        if cfg.role in ("colocated", "partial"):
            handlers[GenerateRequest] = self.handle_generate
        self.phases = PhaseController(engine, cfg.tpot_slo_s) if cfg.role == "partial" else None
        self.modules = None
        if hasattr(engine.runner, "replicas"):  # an elastic engine (--layer-stages)
            from tideserve.roles.modules import ModuleController

            self.modules = ModuleController(engine, self.wid, link.send)
            handlers[ModuleCommand] = self.modules.handle_module_command
        from tideserve.roles.modules import ReplicaHost

        self.hosting = ReplicaHost(cfg.engine, self.wid, engine)  # other workers' layers
        handlers[HostReplica] = self.hosting.handle_host_replica
        self.loop = WorkerLoop(
            cfg,
            link,
            handlers,
            self.step,
            self.stats,
            receiver.sockets,
            self.poll_kv,
            self.drop_all,
            engine,
            lambda: engine.has_unfinished() or bool(self.importing) or self.migration.active,
        )

    def _senders(self) -> dict:
        """The KV senders migrations go out through, made (and polled) on first use."""
        if self._make_senders is None:
            raise KVTransferError("this worker cannot send KV")
        senders = self._make_senders()
        if not self._watching:
            self._watching = True
            for s in senders.values():
                for sock in s.sockets:
                    self.loop.watch(sock)
        return senders

    # -- router messages ---------------------------------------------------------------------

    def handle_generate(self, msg: GenerateRequest) -> None:
        try:
            params = to_sampling_params(msg.params)
            self.engine.add_request(msg.request_id, msg.prompt_token_ids, params, msg.priority)
        except (ValueError, TypeError) as e:
            self.link.send(RequestFailed(msg.request_id, self.wid, str(e)))

    def handle_cancel_migration(self, msg: CancelMigration) -> None:
        """On the source: keep the request here. On the destination: drop what arrived."""
        self.migration.cancel(msg.request_id, "cancelled by the router", tell_router=False)
        if msg.request_id in self.sink.incoming:
            self.sink.drop(msg.request_id)

    def handle_abort(self, msg: AbortRequest) -> None:
        if self.phases is not None:
            self.phases.forget(msg.request_id)
        self.migration.cancel(msg.request_id, "aborted", tell_router=False)
        if msg.request_id in self.sink.incoming:
            self.sink.drop(msg.request_id)
        self.aborted[msg.request_id] = time.monotonic()
        self.importing.discard(msg.request_id)
        self.engine.abort(msg.request_id)

    def drop_all(self) -> None:
        self.migration.cancel_all("the worker rejoined the router")
        for rid in list(self.sink.incoming):
            self.sink.drop(rid)
        for rid in list(self.importing):  # a refusing ack lets the sender free it now
            self._fail_import(rid, "the decode worker rejoined the router")
        for rid in list(self.engine.seqs):
            self.handle_abort(AbortRequest(rid))

    # -- KV from prefill workers -------------------------------------------------------------

    def poll_kv(self) -> None:
        for ev in self.receiver.poll():
            try:
                self._handle_kv(ev)
            except (KeyError, ValueError) as e:
                rid = getattr(ev, "request_id", None) or ev.msg.request_id
                log.warning("request %s: dropping KV event %s: %s", rid, type(ev).__name__, e)
                self._fail_import(rid, str(e))
        now = time.monotonic()
        for rid in self.receiver.expired(now):
            log.warning("request %s: KV transfer timed out", rid)
            if self.sink.owns(rid):
                self.sink.abort(rid)
                self.receiver.ack(rid, False, "KV transfer timed out")
                continue
            self._fail_import(rid, "KV transfer timed out")
        self.sink.expire(now)
        self.migration.poll()
        if self.modules is not None:
            self.modules.poll()  # a remote replica's hello: attach it between steps
        for rid, t in list(self.aborted.items()):
            if now - t > ABORTED_TTL_S:
                del self.aborted[rid]

    def _handle_kv(self, ev) -> None:
        if self._handle_migration(ev):
            return
        if isinstance(ev, KVBeginEvent):
            m = ev.msg
            if m.request_id in self.aborted:
                self.receiver.ack(m.request_id, False, "aborted")
                return
            params = to_sampling_params(m.params)
            ok = self.engine.begin_import(
                m.request_id,
                m.prompt_token_ids,
                m.output_token_ids,
                m.num_kv_tokens,
                params,
                m.priority,
            )
            if ok:
                self.importing.add(m.request_id)
            else:
                self.receiver.ack(m.request_id, False, "no free KV blocks on the decode worker")
        elif isinstance(ev, KVLayerEvent):
            if ev.request_id in self.importing:
                self.engine.import_kv_layer(ev.request_id, ev.layer, ev.tensor)
        elif isinstance(ev, KVDoneEvent):
            if ev.request_id in self.importing:
                self.importing.discard(ev.request_id)
                self.engine.finish_import(ev.request_id, list(ev.output_token_ids))
                self.receiver.ack(ev.request_id, True)
        elif isinstance(ev, KVAbortEvent):
            if ev.request_id in self.importing:
                self.importing.discard(ev.request_id)
                self.engine.abort(ev.request_id)

    def _handle_migration(self, ev) -> bool:
        """A stage of a request migrating here; False for anything else."""
        if isinstance(ev, KVBeginEvent):
            if not ev.msg.migration_of:
                return False
            if ev.msg.migration_of in self.aborted:
                self.receiver.ack(ev.msg.request_id, False, "aborted")
                return True
            try:
                self.sink.begin(ev.msg, to_sampling_params(ev.msg.params))
            except (KeyError, ValueError) as e:
                self.receiver.ack(ev.msg.request_id, False, str(e))
            return True
        rid = ev.request_id
        if not self.sink.owns(rid):
            return False
        if isinstance(ev, KVLayerEvent):
            self.sink.layer(rid, ev.layer, ev.tensor)
        elif isinstance(ev, KVDoneEvent):
            self.sink.done(rid)
        elif isinstance(ev, KVAbortEvent):
            self.sink.abort(rid)
        return True

    def _fail_import(self, rid: str, reason: str) -> None:
        if rid in self.importing:
            self.importing.discard(rid)
            self.engine.abort(rid)
        self.receiver.ack(rid, False, reason)

    # -- the step ------------------------------------------------------------------------------

    def step(self) -> bool:
        if not self.engine.has_unfinished():
            return False
        if self.phases is not None:
            outs = self.phases.step(self.loop.heartbeat)
        else:
            outs = self.engine.step(on_layer=self.loop.heartbeat)
        chunks = [
            TokenChunk(
                request_id=out.request_id,
                worker_id=self.wid,
                token_ids=out.new_token_ids,
                finish_reason=out.finish_reason,
                num_prompt_tokens=out.num_prompt_tokens,
                logprobs=out.new_logprobs or None,
            )
            for out in outs
        ]
        if len(chunks) == 1:
            self.link.send(chunks[0])
        elif chunks:  # one message per step, not one per request
            self.link.send(TokenBatch(self.wid, chunks))
        return True

    def stats(self):
        hb = engine_stats(self.cfg, self.engine, self.loop.state, len(self.importing))
        if self.phases is not None:
            hb = msgspec.structs.replace(hb, **self.phases.report())
        if self.modules is not None:
            hb = msgspec.structs.replace(hb, **self.modules.report())
        hosted = self.hosting.report()
        if hosted:
            hb = msgspec.structs.replace(hb, replicas=[*hb.replicas, *hosted])
        return hb
