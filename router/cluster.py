"""Membership and request dispatch: the router's ZMQ side.

Workers connect DEALER sockets to the router's ROUTER socket and say Hello; the router answers
Welcome and from then on sends them requests over the same socket (addressed by worker id).
Heartbeats update each worker's load; a worker silent for `heartbeat_timeout_s`, or one that
says Goodbye, is dropped. Tokens and failures arrive on the same socket and are routed to the
request's `Stream`, which the HTTP handler reads.

Failure: the requests a dropped worker held are re-dispatched to live workers as their prompt
plus the tokens already streamed (recompute), so the client's stream goes on where it was;
when no worker can take one right now it is parked and retried as workers join or free up,
for at most `redispatch_wait_s`. Each dispatch of a request has its own wire id
(`<id>`, then `<id>~1`, `<id>~2`, ...): messages about an older dispatch, from a worker that was
dropped and comes back, are recognised as stale, dropped, and answered with an abort. A
dropped worker that speaks again is told to `Rejoin` (drop everything, say Hello).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec
import zmq
import zmq.asyncio

from tideserve.policy.migration import DECODE_ROLES, DecodeLoad, RunningRequest, plan
from tideserve.policy.padg import Instance, place
from tideserve.policy.padg import join as padg_join
from tideserve.policy.padg import leave as padg_leave
from tideserve.policy.routing import Route, WorkerView, blocks_for, choose_kv_transport, route
from tideserve.protocol import (
    AbortRequest,
    CancelMigration,
    GenerateRequest,
    Goodbye,
    Heartbeat,
    Hello,
    HostReplica,
    Message,
    MigrateRequest,
    MigrationDone,
    MigrationFailed,
    ModuleCommand,
    Params,
    PrefillRequest,
    ProtocolError,
    Rejoin,
    RequestFailed,
    SetLimits,
    SwitchRole,
    TokenBatch,
    TokenChunk,
    Welcome,
    decode,
    encode,
)
from tideserve.security import (
    CurveKeys,
    make_server,
    start_authenticator,
    warn_if_exposed,
    zmq_host,
)

log = logging.getLogger(__name__)


@dataclass
class Worker:
    hello: Hello
    last_seen: float
    stats: Heartbeat | None = None
    state: str = "ready"  # as the worker reports it
    pending_tokens: int = 0  # prompt tokens dispatched and not yet reported back
    pending_blocks: int = 0  # KV blocks of dispatches whose KV has not landed yet
    draining: bool = False  # the router gives it no new work (scale-in, role switch)
    evacuate: bool = False  # draining by migration: its requests move to other workers
    registered_at: float = field(default_factory=time.time)  # wall clock, for the autoscaler
    first_token_at: float | None = None  # when it first served a token (wall clock)

    @property
    def effective_state(self) -> str:
        return "draining" if self.draining else self.state

    @property
    def worker_id(self) -> str:
        return self.hello.worker_id

    def view(self) -> WorkerView:
        h, s = self.hello, self.stats
        used = s.kv_blocks_used if s else 0
        queued = s.queued_prefill_tokens if s else 0
        return WorkerView(
            worker_id=h.worker_id,
            role=h.role,
            state=self.effective_state,
            queued_prefill_tokens=queued + self.pending_tokens,
            kv_blocks_free=h.num_kv_blocks - used - self.pending_blocks,
            kv_blocks_total=h.num_kv_blocks,
            block_size=h.block_size,
            max_model_len=h.max_model_len,
        )

    def as_json(self, requests: int = 0) -> dict:
        h, s = self.hello, self.stats
        return {
            "id": h.worker_id,
            "role": h.role,
            "address": h.kv_address or h.host,
            "host": h.host,
            "state": self.effective_state,
            "device": h.device,
            "pid": h.pid,
            "load": {
                "waiting": s.num_waiting if s else 0,
                "running": s.num_running if s else 0,
                "queued_prefill_tokens": s.queued_prefill_tokens if s else 0,
                "inflight_kv": s.num_inflight_kv if s else 0,
            },
            "kv_blocks_used": s.kv_blocks_used if s else 0,
            "kv_blocks_total": h.num_kv_blocks,
            "max_num_seqs": s.max_num_seqs if s else 0,
            "gpu": _gpu_json(s.gpu) if s is not None and s.gpu is not None else None,
            "layers": [list(r) for r in s.layers] if s else [],  # [] = the whole model
            "replicas": [_replica_json(r) for r in s.replicas] if s else [],
            "requests": requests,  # the router's requests that still need it
            "started_at": h.started_at,
            "engine_loaded_at": h.engine_loaded_at,
            "engine_load_s": h.engine_load_s,
            "registered_at": self.registered_at,
            "first_token_at": self.first_token_at,
        }


def _check_module_command(hb: Heartbeat | None, cmd: ModuleCommand, wid: str) -> None:
    """ValueError (a message for the operator) unless `cmd` fits the worker's layers as its
    last heartbeat reports them; the worker checks again when it runs it."""
    layers = [tuple(r) for r in hb.layers] if hb else []
    if not layers:
        raise ValueError(f"worker {wid} does not run layer stages (start it with --layer-stages)")
    own = {(r.start, r.end): r for r in hb.replicas if not r.head_id}  # not those it hosts
    want = (cmd.start, cmd.end)
    remote = bool(cmd.target) and cmd.target != wid
    if cmd.action == "replicate" or (cmd.action == "migrate" and remote):
        # migrate onto another worker: a share-1.0 replica there, then the local copy is freed
        if want not in layers:
            raise ValueError(f"{cmd.action} takes a whole stage; worker {wid} has stages {layers}")
        if want in own:
            raise ValueError(f"layers {list(want)} on worker {wid} already have a replica")
        if remote and cmd.start == 0:
            raise ValueError("layers on another worker need hidden states in: not layer 0")
    elif cmd.action == "unreplicate":
        if want not in own:
            raise ValueError(f"layers {list(want)} on worker {wid} have no replica")
        if cmd.target and own[want].host_id != cmd.target:
            raise ValueError(f"the replica of {list(want)} is on {own[want].host_id}, "
                             f"not {cmd.target}")  # fmt: skip
    else:
        at_edge = any(
            (a < cmd.start and cmd.end == b and i + 1 < len(layers))
            or (cmd.start == a and cmd.end < b and i > 0)
            for i, (a, b) in enumerate(layers)
        )
        if not at_edge:
            raise ValueError(
                f"migrate moves layers at a stage's inner edge; worker {wid} has stages {layers}"
            )


def _replica_json(r) -> dict:
    out = {"layers": [r.start, r.end], "host": r.host_id, "share": r.share, "seqs": r.num_seqs}
    if r.head_id:  # hosted here for another worker
        out.update({"for": r.head_id, "kv_bytes": r.kv_bytes})
    return out


MAX_HOSTED_REPLICAS = 1  # replicas of other workers' layers one worker may host at a time


def _check_replica_host(w: Worker | None, target: str, wid: str) -> None:
    """ValueError unless `target` can host a replica of `wid`'s layers now: a registered,
    ready decode or colocated worker that is not already hosting its share."""
    if w is None:
        raise ValueError(f"target {target} is not a registered worker")
    if w.effective_state != "ready" or w.stats is None:
        raise ValueError(f"target {target} is not ready ({w.effective_state})")
    if w.hello.role not in ("decode", "colocated"):
        raise ValueError(f"target {target} is a {w.hello.role} worker: it cannot host a replica")
    hosted = [r for r in w.stats.replicas if r.head_id]
    if len(hosted) >= MAX_HOSTED_REPLICAS:
        raise ValueError(f"target {target} already hosts a replica (for {hosted[0].head_id})")


def _gpu_json(g) -> dict:
    """A worker's GpuStats; power and temperature only where NVML reports them."""
    out = {
        "utilization_pct": g.utilization_pct,
        "memory_used_bytes": g.memory_used_bytes,
        "memory_total_bytes": g.memory_total_bytes,
    }
    if g.power_w >= 0:
        out["power_w"] = g.power_w
    if g.temperature_c >= 0:
        out["temperature_c"] = g.temperature_c
    return out


@dataclass
class Stream:
    """One request's path through the cluster, and the events for its HTTP handler."""

    request_id: str
    prompt_token_ids: list[int]
    params: Params
    priority: int
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    prefill: str | None = None
    target: str | None = None
    output_token_ids: list[int] = field(default_factory=list)  # handed to the handler so far
    dispatches: int = 0
    wire_id: str = ""  # the id the current dispatch travels under
    dispatched_len: int = 0  # prompt tokens of the current dispatch (prompt + output so far)
    kv_landed: bool = False
    kv_transport: str = ""  # how the current dispatch's KV travels to its target ("": none)
    got_token: bool = False  # the current dispatch has produced a token
    got_first: bool = False  # ... and its prefill worker's first token has arrived
    held: list[TokenChunk] = field(default_factory=list)  # decode tokens that overtook it
    migrating_to: str | None = None  # a live migration to this worker is under way
    migrated_held: list[TokenChunk] = field(default_factory=list)  # its tokens before commit
    tried: set[str] = field(default_factory=set)  # workers that failed this request
    parked_until: float | None = None  # waiting for capacity to re-dispatch, until then
    waiting: bool = False  # admitted, no token yet (kept by the HTTP handler)
    admitted_at: float = field(default_factory=time.monotonic)

    @property
    def num_tokens_out(self) -> int:
        return len(self.output_token_ids)


@dataclass(frozen=True)
class PadgConfig:
    ttft_slo_s: float = 2.0  # rolling activation: the TTFT a placement must meet
    n_max: int = 4  # a macro instance larger than this splits in two
    n_min: int = 2  # two smaller than this merge


class NoCapacity(Exception):
    """No ready worker can take the request."""


class Cluster:
    def __init__(
        self,
        address: str,
        heartbeat_timeout_s: float,
        max_redispatch: int,
        kv_transports: tuple[str, ...],
        redispatch_wait_s: float = 30.0,
        migration: bool = False,
        padg: PadgConfig | None = None,
        *,
        curve: CurveKeys | None = None,
    ) -> None:
        self.address = address
        self.curve = curve  # None: plaintext, any process that reaches the socket may join
        self.authenticator = None
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.max_redispatch = max_redispatch
        self.kv_transports = kv_transports
        self.redispatch_wait_s = redispatch_wait_s
        self.migration = migration  # balance decode load by moving running requests
        self.padg = padg or PadgConfig()
        self.groups: list[list[str]] = []  # macro instances of partial-mode workers
        self.active: dict[int, str] = {}  # macro instance -> its prefill-active worker
        self.workers: dict[str, Worker] = {}
        self.streams: dict[str, Stream] = {}  # request id -> stream
        self.wire: dict[str, str] = {}  # wire id of a live dispatch -> request id
        self.parked: dict[str, Stream] = {}  # request id -> stream waiting to be re-dispatched
        self.events: collections.Counter[str] = collections.Counter()  # for /metrics
        self.kv_transfers: collections.Counter[str] = collections.Counter()  # landed, by transport
        self._rejoin_asked: dict[str, float] = {}  # worker id -> when it was told to rejoin
        self.migrations: dict[str, tuple[str, str, float]] = {}  # wire id -> (src, dst, since)
        self.on_migration_pause: Callable[[float], None] = lambda s: None  # for /metrics
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted worker takes its id back
        if curve is not None:
            make_server(self.sock, curve)
        self._tasks: list[asyncio.Task] = []
        self.handlers = {
            Hello: self.handle_hello,
            Heartbeat: self.handle_heartbeat,
            Goodbye: self.handle_goodbye,
            TokenChunk: self.handle_tokens,
            TokenBatch: self.handle_token_batch,
            RequestFailed: self.handle_failed,
            MigrationDone: self.handle_migration_done,
            MigrationFailed: self.handle_migration_failed,
            HostReplica: self.handle_host_replica,
        }

    async def start(self) -> None:
        if self.curve is not None:
            self.authenticator = start_authenticator(self.ctx, self.curve)
        warn_if_exposed("the worker socket", zmq_host(self.address), bool(self.curve), "CURVE")
        self.sock.bind(self.address)
        self._tasks = [
            asyncio.create_task(self._recv_loop()),
            asyncio.create_task(self._reap_loop()),
            asyncio.create_task(self._migration_loop()),
        ]

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.sock.close(0)
        if self.authenticator is not None:
            self.authenticator.stop()
        self.ctx.term()

    # -- views ---------------------------------------------------------------------------------

    def ready(self, role: str) -> list[Worker]:
        return [w for w in self.workers.values() if w.hello.role == role and w.state == "ready"]

    @property
    def is_ready(self) -> bool:
        if self.ready("colocated") or self.ready("partial"):
            return True
        return bool(self.ready("prefill") and self.ready("decode"))

    # -- partial disaggregation: macro instances, rolling activation ------------------------

    def _instances(self, num_tokens: int, exclude: frozenset[str]) -> dict[str, Instance]:
        out = {}
        for wid, w in self.workers.items():
            if w.hello.role != "partial":
                continue
            st, v = w.stats, w.view()
            out[wid] = Instance(
                worker_id=wid,
                ready=v.state == "ready" and v.max_model_len > num_tokens and wid not in exclude,
                free_blocks=v.kv_blocks_free,
                block_size=v.block_size,
                queued_prefill_tokens=v.queued_prefill_tokens,
                min_slack_s=st.min_slack_s if st and st.min_slack_s >= 0 else None,
                prefill_s_per_token=(st.prefill_s_per_token if st else 0) or 2e-3,
                decode_step_s=(st.decode_step_s if st else 0) or 0.05,
            )
        return out

    def _place_partial(self, num_tokens: int, exclude: frozenset[str]) -> Route | None:
        instances = self._instances(num_tokens, exclude)
        if not instances:
            return None
        p = place(self.groups, self.active, instances, num_tokens, self.padg.ttft_slo_s)
        if p is None:
            return None
        if self.active.get(p.group) != p.active:
            if p.rolled:
                self.events["activation_rolled"] += 1
            self.active[p.group] = p.active
        return Route(None, p.worker_id)

    def _regroup(self, joined: str | None = None, left: str | None = None) -> None:
        if joined is not None:
            self.groups = padg_join(self.groups, joined, self.padg.n_max)
        if left is not None:
            self.groups = padg_leave(self.groups, left, self.padg.n_min, self.padg.n_max)
        self.active = {g: ws[0] for g, ws in enumerate(self.groups)}

    def macro_of(self, worker_id: str) -> tuple[int | None, bool]:
        for g, ws in enumerate(self.groups):
            if worker_id in ws:
                return g, self.active.get(g) == worker_id
        return None, False

    @property
    def max_model_len(self) -> int | None:
        lens = [w.hello.max_model_len for w in self.workers.values()]
        return min(lens) if lens else None

    # -- dispatch --------------------------------------------------------------------------------

    def submit(self, stream: Stream) -> None:
        """Sends the request to the workers the policy picks; raises NoCapacity."""
        self.streams[stream.request_id] = stream
        try:
            self._dispatch(stream)
        except BaseException:
            self._forget(stream)
            raise

    def _dispatch(self, s: Stream, exclude: frozenset[str] | None = None) -> None:
        """Sends `s` (its prompt plus the tokens it already has) under a new wire id."""
        prompt = s.prompt_token_ids + s.output_token_ids
        excluded = frozenset(s.tried) if exclude is None else exclude
        r = self._place_partial(len(prompt), excluded)
        if r is None:
            views = [w.view() for w in self.workers.values()]
            r = route(views, len(prompt), exclude=excluded)
        if r is None:
            raise NoCapacity("no ready worker can take this request")
        self.wire.pop(s.wire_id, None)
        s.wire_id = s.request_id if s.dispatches == 0 else f"{s.request_id}~{s.dispatches}"
        self.wire[s.wire_id] = s.request_id
        s.prefill, s.target, s.kv_landed = r.prefill, r.target, r.prefill is None
        s.got_token = s.got_first = False
        s.held, s.parked_until = [], None
        s.dispatches += 1
        s.dispatched_len = n = len(prompt)
        params = s.params
        if s.output_token_ids:  # a recompute: what is left to generate
            k = len(s.output_token_ids)
            params = msgspec.structs.replace(
                params,
                max_tokens=max(1, params.max_tokens - k),
                min_tokens=max(0, params.min_tokens - k),
            )
        target = self.workers[r.target]
        if r.prefill is None:
            target.pending_tokens += n
            self._send(r.target, GenerateRequest(s.wire_id, prompt, params, s.priority))
            return
        prefill = self.workers[r.prefill]
        prefill.pending_tokens += n
        target.pending_blocks += blocks_for(n + 1, target.hello.block_size)
        transport = s.kv_transport = self._transport(prefill.hello, target.hello)
        self._send(
            r.prefill,
            PrefillRequest(
                s.wire_id,
                prompt,
                params,
                s.priority,
                r.target,
                target.hello.kv_address,
                transport,
            ),
        )

    def _transport(self, src: Hello, dst: Hello) -> str:
        offered = [t for t in dst.kv_transports if t in self.kv_transports] or ["tcp"]
        src_offered = [t for t in src.kv_transports if t in self.kv_transports]
        return choose_kv_transport(src.host, dst.host, offered, src_offered, src.device, dst.device)

    def abort(self, request_id: str) -> None:
        """Stops a request on every worker that may hold it; idempotent."""
        s = self.streams.get(request_id)
        if s is None:
            return
        self._forget(s)
        self._release_pending(s)
        self._end_migration(s, "aborted")
        for wid in {s.prefill, s.target, s.migrating_to} - {None}:
            if wid in self.workers:
                self._send(wid, AbortRequest(s.wire_id))

    def _forget(self, s: Stream) -> None:
        self.streams.pop(s.request_id, None)
        self.parked.pop(s.request_id, None)
        self.wire.pop(s.wire_id, None)

    def _release_pending(self, s: Stream) -> None:
        n = s.dispatched_len
        if not s.got_token and s.prefill in self.workers:
            w = self.workers[s.prefill]
            w.pending_tokens = max(0, w.pending_tokens - n)
        if s.target in self.workers:
            w = self.workers[s.target]
            if not s.kv_landed:
                w.pending_blocks = max(0, w.pending_blocks - blocks_for(n + 1, w.hello.block_size))
            if s.prefill is None and not s.got_token:
                w.pending_tokens = max(0, w.pending_tokens - n)

    def _send(self, worker_id: str, msg: Message) -> None:
        """Queues `msg` for the worker; a send that fails (the worker is gone) is logged."""
        what = type(msg).__name__

        def check(fut: asyncio.Future) -> None:
            if not fut.cancelled() and fut.exception() is not None:
                log.warning("could not send %s to %s: %s", what, worker_id, fut.exception())

        try:
            fut = self.sock.send_multipart([worker_id.encode(), *encode(msg)], copy=False)
        except zmq.ZMQError as e:
            log.warning("could not send %s to %s: %s", what, worker_id, e)
            return
        fut.add_done_callback(check)

    # -- live migration --------------------------------------------------------------------

    def migrate(self, request_id: str, to_worker: str, why: str = "requested") -> None:
        """Starts moving a decoding request to `to_worker`; KeyError for an unknown request or
        worker, ValueError when it cannot move now."""
        s = self.streams[request_id]
        dst = self.workers[to_worker]
        src = self.workers.get(s.target or "")
        if src is None or src.hello.role not in DECODE_ROLES:
            raise ValueError(f"request {request_id} is not decoding on a worker")
        if not s.kv_landed or not s.got_token or (s.prefill is not None and not s.got_first):
            raise ValueError(f"request {request_id} has not started decoding yet")
        if s.migrating_to is not None:
            raise ValueError(f"request {request_id} is already moving to {s.migrating_to}")
        if to_worker == s.target:
            raise ValueError(f"request {request_id} already runs on {to_worker}")
        if dst.hello.role != src.hello.role or dst.effective_state != "ready":
            raise ValueError(f"{to_worker} is not a ready {src.hello.role} worker")
        transport = self._transport(src.hello, dst.hello)
        s.migrating_to = to_worker
        self.migrations[s.wire_id] = (s.target, to_worker, time.monotonic())
        self.events["migration_started"] += 1
        log.info("request %s: migrating %s -> %s (%s)", request_id, s.target, to_worker, why)
        self._send(s.target, MigrateRequest(s.wire_id, to_worker, dst.hello.kv_address, transport))

    async def _migration_loop(self) -> None:
        """Once a second: balance decode load (when on) and empty evacuated workers."""
        while True:
            await asyncio.sleep(1.0)
            if self.migration or any(w.evacuate for w in self.workers.values()):
                self.rebalance()

    def rebalance(self) -> list:
        loads, reqs = [], []
        for w in self.workers.values():
            st, h = w.stats, w.hello
            if h.role not in DECODE_ROLES:
                continue
            queued = blocks_for(st.queued_prefill_tokens, h.block_size) if st else 0
            loads.append(
                DecodeLoad(
                    w.worker_id, h.role, w.effective_state == "ready", w.evacuate,
                    h.num_kv_blocks - (st.kv_blocks_used if st else 0) - w.pending_blocks,
                    queued, st.num_running if st else 0,
                )
            )  # fmt: skip
        for s in self.streams.values():
            w = self.workers.get(s.target or "")
            if w is None or not (s.kv_landed and s.got_token):  # colocated: still prefilling
                continue
            if s.prefill is not None and not s.got_first:
                continue
            n = len(s.prompt_token_ids) + s.num_tokens_out
            reqs.append(
                RunningRequest(
                    s.request_id, s.target, blocks_for(n, w.hello.block_size), s.priority,
                    s.migrating_to is not None,
                )
            )  # fmt: skip
        moves = plan(loads, reqs, balance=self.migration)
        for m in moves:
            try:
                self.migrate(m.request_id, m.dst, m.reason)
            except (KeyError, ValueError) as e:
                log.debug("not migrating %s: %s", m.request_id, e)
        return moves

    def _end_migration(self, s: Stream, reason: str) -> None:
        if s.migrating_to is None:
            return
        self.migrations.pop(s.wire_id, None)
        s.migrating_to, s.migrated_held = None, []

    def handle_migration_done(self, msg: MigrationDone) -> None:
        s = self.streams.get(self.wire.get(msg.request_id, ""))
        self.migrations.pop(msg.request_id, None)
        if s is None or s.migrating_to != msg.dest_worker_id or s.target != msg.worker_id:
            return  # finished or moved meanwhile; the destination was told
        s.target, s.migrating_to = msg.dest_worker_id, None
        held, s.migrated_held = s.migrated_held, []
        self.events["migrated"] += 1
        self.on_migration_pause(msg.pause_s)
        log.info(
            "request %s: migrated to %s in %d stages, paused %.1f ms",
            s.request_id, msg.dest_worker_id, msg.num_stages, msg.pause_s * 1e3,
        )  # fmt: skip
        for m in held:
            if s.request_id in self.streams:
                self.handle_tokens(m)

    def handle_migration_failed(self, msg: MigrationFailed) -> None:
        src_dst = self.migrations.pop(msg.request_id, None)
        self.events["migration_failed"] += 1
        log.info("request %s: migration failed: %s", msg.request_id, msg.reason)
        if src_dst and src_dst[1] in self.workers:  # drop whatever stages it received
            self._send(src_dst[1], CancelMigration(msg.request_id))
        s = self.streams.get(self.wire.get(msg.request_id, ""))
        if s is not None and s.target == msg.worker_id:
            s.migrating_to, s.migrated_held = None, []

    # -- admin: scale-in, role switch, batch caps ---------------------------------------------

    def requests_on(self, worker_id: str) -> int:
        """Requests that still need this worker (a prefill that handed off is free of them)."""
        n = 0
        for s in self.streams.values():
            if s.target == worker_id:
                n += 1
            elif s.prefill == worker_id and not (s.kv_landed and s.got_first):
                n += 1
        return n

    def drain(self, worker_id: str, on: bool = True, migrate: bool = False) -> Worker:
        """Stops (or resumes) giving the worker new work; `migrate`: also move its running
        requests to other workers (evacuate). Raises KeyError for an unknown id."""
        w = self.workers[worker_id]
        if w.draining != on or w.evacuate != (on and migrate):
            w.draining, w.evacuate = on, on and migrate
            how = " (its requests migrate away)" if w.evacuate else ""
            log.info("worker %s %s%s", worker_id, "draining" if on else "back in service", how)
        return w

    def set_limits(self, worker_id: str, max_num_seqs: int) -> None:
        self.workers[worker_id]  # KeyError for an unknown id
        self._send(worker_id, SetLimits(max_num_seqs))

    def change_modules(self, worker_id: str, cmd: ModuleCommand) -> None:
        """Sends a layer change to an elastic worker; ValueError when its last heartbeat shows
        it cannot do it (no layer stages, or no such stage/replica/edge)."""
        w = self.workers[worker_id]
        _check_module_command(w.stats, cmd, worker_id)
        if cmd.action in ("replicate", "migrate") and cmd.target and cmd.target != worker_id:
            _check_replica_host(self.workers.get(cmd.target), cmd.target, worker_id)
        self._send(worker_id, cmd)

    def drop_layers(self, wid: str, partner: str, drop: bool = True) -> dict[str, list[int]]:
        """Parameter dropping (KunServe) over two elastic workers with the same two stages:
        `wid` keeps the first stage, `partner` the second, each runs the other's half as a
        replica on its partner (drop); or both take their dropped half back (restore).
        ValueError (409) unless the last heartbeats show the pair can. The layers each keeps."""
        w = self.workers[wid]
        p = self.workers.get(partner)
        if p is None:
            raise ValueError(f"target {partner} is not a registered worker")
        for x in (w, p):
            if x.effective_state != "ready" or x.stats is None:
                raise ValueError(f"worker {x.worker_id} is not ready ({x.effective_state})")
        lw = [tuple(r) for r in w.stats.layers]
        lp = [tuple(r) for r in p.stats.layers]
        if drop:
            if len(lw) != 2 or lw != lp:
                raise ValueError(f"drop needs two workers with the same two layer stages; "
                                 f"{wid} has {lw}, {partner} has {lp}")  # fmt: skip
            if w.stats.replicas or p.stats.replicas:
                raise ValueError("drop needs both workers without replicas (own or hosted)")
            keep = {wid: lw[0], partner: lw[1]}
        else:
            halves = sorted(lw + lp)
            if len(lw) != 1 or len(lp) != 1 or halves[0][0] != 0 or halves[0][1] != halves[1][0]:
                raise ValueError(f"restore needs {wid} and {partner} dropped as a pair; "
                                 f"they have {lw} and {lp}")  # fmt: skip
            keep = {wid: lw[0], partner: lp[0]}
        for x, other in ((wid, partner), (partner, wid)):
            a, b = keep[x]
            self._send(x, ModuleCommand("drop" if drop else "restore", a, b, 1.0, other))
        return {x: list(r) for x, r in keep.items()}

    def handle_host_replica(self, msg: HostReplica) -> None:
        """The hot worker's half of a replica on another worker: pass it to the host."""
        if msg.host_id not in self.workers:
            log.warning("%s asks %s to host a replica: no such worker", msg.worker_id, msg.host_id)
            return
        self._send(msg.host_id, msg)

    def switch_role(self, worker_id: str, role: str) -> None:
        """Asks a drained, idle worker to take `role`; ValueError when it is not drained yet."""
        w = self.workers[worker_id]
        busy = self.requests_on(worker_id) or (
            w.stats and (w.stats.num_running or w.stats.num_waiting)
        )
        if not w.draining or busy:
            raise ValueError(f"worker {worker_id} must be drained and idle to switch roles")
        self._send(worker_id, SwitchRole(role))

    # -- incoming ------------------------------------------------------------------------------

    async def _recv_loop(self) -> None:
        while True:
            frames = await self.sock.recv_multipart(copy=False)
            ident = bytes(frames[0].buffer).decode(errors="replace")
            try:
                msg, _ = decode(frames[1:])
            except ProtocolError as e:
                log.warning("dropping a malformed message from %r: %s", ident, e)
                if "protocol version" in str(e):
                    self.sock.send_multipart([frames[0].bytes, *encode(Welcome(False, str(e)))])
                continue
            handler = self.handlers.get(type(msg))
            if handler is None:
                log.warning("unexpected %s from %r", type(msg).__name__, ident)
                continue
            if getattr(msg, "worker_id", ident) != ident:
                what = type(msg).__name__
                log.warning("dropping a %s from %r for worker %r", what, ident, msg.worker_id)
                continue
            if not isinstance(msg, Hello) and ident not in self.workers:
                if isinstance(msg, Heartbeat):  # a dropped worker is back: it must start over
                    self._ask_to_rejoin(ident)
                continue
            if ident in self.workers:
                self.workers[ident].last_seen = time.monotonic()
            try:
                handler(msg)
            except Exception:  # NOTE: this loop is how the router hears workers: it must not die
                log.exception("dropping a %s from %r that failed", type(msg).__name__, ident)

    def _ask_to_rejoin(self, ident: str) -> None:
        """Once a second at most: a worker back from a partition flushes many heartbeats."""
        now = time.monotonic()
        if now - self._rejoin_asked.get(ident, -1e9) < 1.0:
            return
        self._rejoin_asked[ident] = now
        if len(self._rejoin_asked) > 10_000:  # bounded, whatever a peer sends
            self._rejoin_asked = {ident: now}
        self._send(ident, Rejoin("this router had dropped you: say Hello again"))

    def handle_hello(self, msg: Hello) -> None:
        old = self.workers.get(msg.worker_id)
        if old is not None and old.hello.pid != msg.pid:  # restarted before we noticed it died
            log.warning("worker %s restarted (pid %d -> %d)", msg.worker_id, old.hello.pid, msg.pid)
            self._drop(msg.worker_id)
            old = None
        self.workers[msg.worker_id] = Worker(msg, time.monotonic())
        self._send(msg.worker_id, Welcome(True))
        in_group = self.macro_of(msg.worker_id)[0] is not None
        if msg.role == "partial" and not in_group:
            self._regroup(joined=msg.worker_id)
        elif msg.role != "partial" and in_group:  # switched roles
            self._regroup(left=msg.worker_id)
        if old is None:
            log.info("worker %s (%s) joined from %s", msg.worker_id, msg.role, msg.host)
            self.events["worker_joined"] += 1
        self._retry_parked()

    def handle_heartbeat(self, msg: Heartbeat) -> None:
        w = self.workers[msg.worker_id]
        w.stats, w.state = msg, msg.state
        w.pending_tokens = 0  # the heartbeat's own queue now counts what was dispatched
        if self.parked:
            self._retry_parked()

    def handle_goodbye(self, msg: Goodbye) -> None:
        log.info("worker %s left: %s", msg.worker_id, msg.reason)
        self._drop(msg.worker_id)

    def _current(self, wire_id: str, worker_id: str) -> Stream | None:
        """The stream a worker's message is about, or None when it is stale: an older
        dispatch, a finished request, or a worker the request no longer runs on."""
        s = self.streams.get(self.wire.get(wire_id, ""))
        if s is None or worker_id not in (s.prefill, s.target, s.migrating_to):
            return None
        return s

    def handle_token_batch(self, msg: TokenBatch) -> None:
        for chunk in msg.chunks:
            if chunk.worker_id != msg.worker_id:
                log.warning("dropping a chunk of %r sent by %r", chunk.worker_id, msg.worker_id)
                continue
            try:
                self.handle_tokens(chunk)
            except Exception:  # NOTE: one request's bad chunk must not drop the others
                log.exception("dropping a TokenChunk for %s that failed", chunk.request_id)

    def handle_tokens(self, msg: TokenChunk) -> None:
        s = self._current(msg.request_id, msg.worker_id)
        if s is None:
            if msg.finish_reason is None and msg.worker_id in self.workers:
                self._send(msg.worker_id, AbortRequest(msg.request_id))  # free what it holds
            return
        if msg.worker_id == s.migrating_to:  # the destination resumed before the source's
            s.migrated_held.append(msg)  # MigrationDone (after its last token) came in
            return
        if msg.worker_id == s.target and not s.kv_landed:
            s.kv_landed = True
            if s.prefill is not None:  # its first token comes only after the KV has landed
                self.kv_transfers[s.kv_transport] += 1
            w = self.workers.get(s.target)
            if w is not None and s.prefill is not None:
                w.pending_blocks = max(
                    0, w.pending_blocks - blocks_for(s.dispatched_len + 1, w.hello.block_size)
                )
        if s.prefill is not None and not s.got_first:
            if not msg.is_first:  # the decode worker's tokens came through a faster path than
                s.held.append(msg)  # the prefill worker's first token: wait for it
                return
            s.got_first = True
            self._deliver(s, msg)
            for m in s.held:
                if s.request_id in self.streams:
                    self._deliver(s, m)
            s.held = []
            return
        self._deliver(s, msg)

    def _deliver(self, s: Stream, msg: TokenChunk) -> None:
        w = self.workers.get(msg.worker_id)
        if w is not None and w.first_token_at is None:
            w.first_token_at = time.time()
        s.got_token = True
        s.output_token_ids.extend(msg.token_ids)
        if msg.finish_reason is not None:
            self._forget(s)
            if msg.is_first and s.target in self.workers:
                self._release_pending(s)  # ended at its first token: the decode never started
        s.queue.put_nowait(msg)

    def handle_failed(self, msg: RequestFailed) -> None:
        s = self._current(msg.request_id, msg.worker_id)
        if s is None:
            return
        self._reroute_or_fail(s, msg.message, msg.retryable, msg.worker_id)

    def _reroute_or_fail(
        self, s: Stream, reason: str, retryable: bool, culprit: str | None
    ) -> None:
        """Moves a request its workers cannot finish to others (recomputing the tokens it
        has), parks it while none can take it, or fails it once its retries are spent."""
        self._release_pending(s)
        for wid in {s.prefill, s.target, s.migrating_to} - {None, culprit}:
            if wid in self.workers:
                self._send(wid, AbortRequest(s.wire_id))
        self._end_migration(s, "the request moved")
        s.prefill = s.target = None
        if retryable and s.dispatches <= self.max_redispatch:
            if culprit:
                s.tried.add(culprit)
            try:
                self._dispatch(s)
                self.events["redispatched"] += 1
                log.info(
                    "request %s re-dispatched with %d tokens so far: %s",
                    s.request_id,
                    s.num_tokens_out,
                    reason,
                )
                return
            except NoCapacity:
                s.parked_until = time.monotonic() + self.redispatch_wait_s
                self.events["parked"] += 1
                self.parked[s.request_id] = s
                self.wire.pop(s.wire_id, None)
                log.warning(
                    "request %s waits for a worker (at most %.0f s): %s",
                    s.request_id,
                    self.redispatch_wait_s,
                    reason,
                )
                return
        self._fail(s, reason, retryable, culprit)

    def _fail(self, s: Stream, reason: str, retryable: bool, culprit: str | None) -> None:
        self.events["failed"] += 1
        self._forget(s)
        s.queue.put_nowait(RequestFailed(s.request_id, culprit or "", reason, retryable))

    def _retry_parked(self) -> None:
        now = time.monotonic()
        for s in list(self.parked.values()):
            try:  # the workers it failed on may be back, restarted: try them too
                self._dispatch(s, exclude=frozenset())
            except NoCapacity:
                if now > s.parked_until:
                    self._fail(
                        s, f"no worker could take it in {self.redispatch_wait_s:.0f} s", True, None
                    )
                continue
            self.parked.pop(s.request_id, None)
            self.events["redispatched"] += 1
            log.info("request %s re-dispatched after waiting", s.request_id)

    # -- failure detection ---------------------------------------------------------------------

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_timeout_s / 4)
            now = time.monotonic()
            for wid, w in list(self.workers.items()):
                if now - w.last_seen > self.heartbeat_timeout_s:
                    log.warning("worker %s missed its heartbeats: dropped", wid)
                    self._drop(wid)
            if self.parked:
                self._retry_parked()

    def _drop(self, worker_id: str) -> None:
        if self.workers.pop(worker_id, None) is None:
            return
        self.events["worker_dropped"] += 1
        if self.macro_of(worker_id)[0] is not None:
            self._regroup(left=worker_id)
        for s in list(self.streams.values()):
            if s.migrating_to == worker_id:  # the destination died: the source keeps it
                if s.target in self.workers:
                    self._send(s.target, CancelMigration(s.wire_id))
                self._end_migration(s, f"the destination {worker_id} left")
            if worker_id in (s.prefill, s.target):
                handed_off = s.prefill == worker_id and s.kv_landed and s.got_first
                if not handed_off:
                    self._reroute_or_fail(s, f"worker {worker_id} left", True, worker_id)
