"""Membership and request dispatch: the router's ZMQ side.

Workers connect DEALER sockets to the router's ROUTER socket and say Hello; the router answers
Welcome and from then on sends them requests over the same socket (addressed by worker id).
Heartbeats update each worker's load; a worker silent for `heartbeat_timeout_s`, or one that
says Goodbye, is dropped and the requests it held are re-dispatched (if no token reached the
client yet) or failed. Tokens and failures arrive on the same socket and are routed to the
request's `Stream`, which the HTTP handler reads.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import zmq
import zmq.asyncio

from tideserve.policy.routing import WorkerView, blocks_for, choose_kv_transport, route
from tideserve.protocol import (
    AbortRequest,
    GenerateRequest,
    Goodbye,
    Heartbeat,
    Hello,
    Message,
    Params,
    PrefillRequest,
    ProtocolError,
    RequestFailed,
    TokenChunk,
    Welcome,
    decode,
    encode,
)

log = logging.getLogger(__name__)


@dataclass
class Worker:
    hello: Hello
    last_seen: float
    stats: Heartbeat | None = None
    state: str = "ready"
    pending_tokens: int = 0  # prompt tokens dispatched and not yet reported back
    pending_blocks: int = 0  # KV blocks of dispatches whose KV has not landed yet

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
            state=self.state,
            queued_prefill_tokens=queued + self.pending_tokens,
            kv_blocks_free=h.num_kv_blocks - used - self.pending_blocks,
            kv_blocks_total=h.num_kv_blocks,
            block_size=h.block_size,
            max_model_len=h.max_model_len,
        )

    def as_json(self) -> dict:
        h, s = self.hello, self.stats
        return {
            "id": h.worker_id,
            "role": h.role,
            "address": h.kv_address or h.host,
            "host": h.host,
            "state": self.state,
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
        }


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
    num_tokens_out: int = 0  # tokens already handed to the handler
    dispatches: int = 0
    kv_landed: bool = False
    tried: set[str] = field(default_factory=set)


class NoCapacity(Exception):
    """No ready worker can take the request."""


class Cluster:
    def __init__(
        self,
        address: str,
        heartbeat_timeout_s: float,
        max_redispatch: int,
        kv_transports: tuple[str, ...],
    ) -> None:
        self.address = address
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.max_redispatch = max_redispatch
        self.kv_transports = kv_transports
        self.workers: dict[str, Worker] = {}
        self.streams: dict[str, Stream] = {}
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._tasks: list[asyncio.Task] = []
        self.handlers = {
            Hello: self.handle_hello,
            Heartbeat: self.handle_heartbeat,
            Goodbye: self.handle_goodbye,
            TokenChunk: self.handle_tokens,
            RequestFailed: self.handle_failed,
        }

    async def start(self) -> None:
        self.sock.bind(self.address)
        self._tasks = [
            asyncio.create_task(self._recv_loop()),
            asyncio.create_task(self._reap_loop()),
        ]

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.sock.close(0)
        self.ctx.term()

    # -- views ---------------------------------------------------------------------------------

    def ready(self, role: str) -> list[Worker]:
        return [w for w in self.workers.values() if w.hello.role == role and w.state == "ready"]

    @property
    def is_ready(self) -> bool:
        return bool(self.ready("colocated")) or bool(self.ready("prefill") and self.ready("decode"))

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
        except NoCapacity:
            self.streams.pop(stream.request_id, None)
            raise

    def _dispatch(self, s: Stream) -> None:
        views = [w.view() for w in self.workers.values()]
        r = route(views, len(s.prompt_token_ids), exclude=frozenset(s.tried))
        if r is None:
            raise NoCapacity("no ready worker can take this request")
        s.prefill, s.target, s.kv_landed = r.prefill, r.target, r.prefill is None
        s.dispatches += 1
        target = self.workers[r.target]
        n = len(s.prompt_token_ids)
        if r.prefill is None:
            target.pending_tokens += n
            self._send(
                r.target, GenerateRequest(s.request_id, s.prompt_token_ids, s.params, s.priority)
            )
            return
        prefill = self.workers[r.prefill]
        prefill.pending_tokens += n
        target.pending_blocks += blocks_for(n + 1, target.hello.block_size)
        transport = self._transport(prefill.hello, target.hello)
        self._send(
            r.prefill,
            PrefillRequest(
                s.request_id,
                s.prompt_token_ids,
                s.params,
                s.priority,
                r.target,
                target.hello.kv_address,
                transport,
            ),
        )

    def _transport(self, src: Hello, dst: Hello) -> str:
        offered = [t for t in dst.kv_transports if t in self.kv_transports] or ["tcp"]
        return choose_kv_transport(src.host, dst.host, offered)

    def abort(self, request_id: str) -> None:
        """Stops a request on every worker that may hold it; idempotent."""
        s = self.streams.pop(request_id, None)
        if s is None:
            return
        self._release_pending(s)
        for wid in {s.prefill, s.target} - {None}:
            if wid in self.workers:
                self._send(wid, AbortRequest(request_id))

    def _release_pending(self, s: Stream) -> None:
        n = len(s.prompt_token_ids)
        if s.num_tokens_out == 0 and s.prefill in self.workers:
            w = self.workers[s.prefill]
            w.pending_tokens = max(0, w.pending_tokens - n)
        if s.target in self.workers:
            w = self.workers[s.target]
            if not s.kv_landed:
                w.pending_blocks = max(0, w.pending_blocks - blocks_for(n + 1, w.hello.block_size))
            if s.prefill is None and s.num_tokens_out == 0:
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
            if not isinstance(msg, Hello) and ident not in self.workers:
                continue  # a dropped worker still talking; it must say Hello again
            if ident in self.workers:
                self.workers[ident].last_seen = time.monotonic()
            handler(msg)

    def handle_hello(self, msg: Hello) -> None:
        known = msg.worker_id in self.workers
        self.workers[msg.worker_id] = Worker(msg, time.monotonic())
        self._send(msg.worker_id, Welcome(True))
        if not known:
            log.info("worker %s (%s) joined from %s", msg.worker_id, msg.role, msg.host)

    def handle_heartbeat(self, msg: Heartbeat) -> None:
        w = self.workers[msg.worker_id]
        w.stats, w.state = msg, msg.state
        w.pending_tokens = 0  # the heartbeat's own queue now counts what was dispatched

    def handle_goodbye(self, msg: Goodbye) -> None:
        log.info("worker %s left: %s", msg.worker_id, msg.reason)
        self._drop(msg.worker_id)

    def handle_tokens(self, msg: TokenChunk) -> None:
        s = self.streams.get(msg.request_id)
        if s is None:
            return
        if msg.worker_id == s.target and not s.kv_landed:
            s.kv_landed = True
            w = self.workers.get(s.target)
            if w is not None and s.prefill is not None:
                w.pending_blocks = max(
                    0,
                    w.pending_blocks - blocks_for(len(s.prompt_token_ids) + 1, w.hello.block_size),
                )
        s.num_tokens_out += len(msg.token_ids)
        if msg.finish_reason is not None:
            self.streams.pop(msg.request_id, None)
            if msg.is_first and s.target in self.workers:
                self._release_pending(s)  # ended at its first token: the decode never started
        s.queue.put_nowait(msg)

    def handle_failed(self, msg: RequestFailed) -> None:
        s = self.streams.get(msg.request_id)
        if s is None:
            return
        self._reroute_or_fail(s, msg.message, msg.retryable, msg.worker_id)

    def _reroute_or_fail(
        self, s: Stream, reason: str, retryable: bool, culprit: str | None
    ) -> None:
        self._release_pending(s)
        for wid in {s.prefill, s.target} - {None, culprit}:
            if wid in self.workers:
                self._send(wid, AbortRequest(s.request_id))
        if retryable and s.num_tokens_out == 0 and s.dispatches <= self.max_redispatch:
            if culprit:
                s.tried.add(culprit)
            try:
                self._dispatch(s)
                log.info("request %s re-dispatched: %s", s.request_id, reason)
                return
            except NoCapacity:
                pass
        self.streams.pop(s.request_id, None)
        s.queue.put_nowait(RequestFailed(s.request_id, culprit or "", reason, retryable))

    # -- failure detection ---------------------------------------------------------------------

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_timeout_s / 4)
            now = time.monotonic()
            for wid, w in list(self.workers.items()):
                if now - w.last_seen > self.heartbeat_timeout_s:
                    log.warning("worker %s missed its heartbeats: dropped", wid)
                    self._drop(wid)

    def _drop(self, worker_id: str) -> None:
        if self.workers.pop(worker_id, None) is None:
            return
        for s in list(self.streams.values()):
            if worker_id in (s.prefill, s.target):
                handed_off = s.prefill == worker_id and s.kv_landed
                if not handed_off:
                    self._reroute_or_fail(s, f"worker {worker_id} left", True, worker_id)
