"""What every worker process shares: its config, its link to the router, and its main loop.

A worker's life: build the engine -> connect a DEALER to the router and say `Hello` (wait for
`Welcome`) -> loop { poll sockets; handle each message through the worker's handler table;
run one engine step if there is work; publish the step's tokens; heartbeat every
`heartbeat_interval_s` } -> on SIGTERM/SIGINT abort what is left, say `Goodbye`, close.
Workers are single-threaded around a blocking engine step with sync ZMQ sockets: the engine
owns the CPU/GPU while it steps, and the poll between steps is the only wait.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec
import zmq

from tideserve import gpu_metrics
from tideserve.config import EngineConfig
from tideserve.policy.routing import parse_kv_transports
from tideserve.protocol import (
    PROTOCOL_VERSION,
    Goodbye,
    Heartbeat,
    Hello,
    Message,
    Params,
    ProtocolError,
    Rejoin,
    SetLimits,
    SwitchRole,
    Welcome,
    decode,
    encode,
)
from tideserve.security import CurveKeys, make_client

log = logging.getLogger(__name__)
DRAIN_SETTLE_S = 0.5  # after SIGTERM, an idle worker still listens this long before it stops


@dataclass(frozen=True)
class WorkerConfig:
    role: str  # prefill, decode or colocated
    router_address: str = "tcp://127.0.0.1:7100"  # the router's worker socket
    worker_id: str = ""  # unique name; "" = role-hostname-pid
    host: str = "127.0.0.1"  # address other workers use to reach this one (KV)
    kv_port: int = 0  # KV receiver port (decode/colocated); 0 = any free port
    kv_transports: tuple[str, ...] = ("shm", "tcp")  # offered by the receiver, best first
    served_model_name: str = ""  # the name clients use; "" = the model folder's name
    heartbeat_interval_s: float = 0.5
    connect_timeout_s: float = 30.0  # how long to wait for the router's Welcome
    kv_timeout_s: float = 30.0  # a KV transfer that does not complete in this time is aborted
    drain_timeout_s: float = 60.0  # SIGTERM: how long running requests may take to finish
    tpot_slo_s: float = 0.2  # partial mode: the TPOT target its prefill phases respect
    curve_keys: str = ""  # CURVE key directory for every ZMQ socket; "" = plaintext
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        if self.role not in ("prefill", "decode", "colocated", "partial"):
            raise ValueError(
                f"role must be prefill, decode, colocated or partial, got {self.role!r}"
            )
        if self.tpot_slo_s <= 0:
            raise ValueError("tpot_slo_s must be positive")
        parse_kv_transports(self.kv_transports)  # an unknown name is a ValueError
        if self.heartbeat_interval_s <= 0:
            raise ValueError("heartbeat_interval_s must be positive")

    @property
    def resolved_id(self) -> str:
        return self.worker_id or f"{self.role}-{socket.gethostname()}-{os.getpid()}"


def to_sampling_params(p: Params):
    from tideserve.engine.sequence import SamplingParams

    return SamplingParams(**msgspec.structs.asdict(p))


class RouterLink:
    """The worker's DEALER socket to the router (identity = worker id)."""

    def __init__(
        self, ctx: zmq.Context, address: str, worker_id: str, curve: CurveKeys | None = None
    ) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, worker_id.encode())
        self.sock.setsockopt(zmq.LINGER, 1000)
        if curve is not None:
            make_client(self.sock, curve)
        self.sock.connect(address)
        self.address = address
        self.is_curve = curve is not None

    def handshake(self, hello: Hello, timeout_s: float) -> None:
        self.hello = hello  # said again if the router ever asks this worker to Rejoin
        self._offer(hello)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.sock.poll(200):
                msg, _ = decode(self.sock.recv_multipart(copy=False))
                if isinstance(msg, Welcome):
                    if not msg.ok:
                        raise RuntimeError(f"router refused this worker: {msg.reason}")
                    return
            else:
                self._offer(hello)  # the router may have started after us
        hint = "; with CURVE, check the router has the same server key and authorizes ours"
        raise RuntimeError(
            f"no answer from the router at {self.address} in {timeout_s:.0f} s"
            + (hint if self.is_curve else "")
        )

    def send(self, msg: Message) -> None:
        self.sock.send_multipart(encode(msg), copy=False)

    def _offer(self, msg: Message) -> None:
        """Sends without blocking: a refused CURVE handshake leaves no connection to queue on."""
        try:
            self.sock.send_multipart(encode(msg), zmq.NOBLOCK, copy=False)
        except zmq.Again:
            pass

    def recv_all(self) -> list[Message]:
        out = []
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return out
            try:
                out.append(decode(frames)[0])
            except ProtocolError as e:
                log.warning("dropping a malformed message from the router: %s", e)


class WorkerLoop:
    """The loop skeleton; a worker supplies `handlers`, `step` and `stats`."""

    def __init__(
        self,
        cfg: WorkerConfig,
        link: RouterLink,
        handlers: dict[type, Callable],
        step: Callable[[], bool],
        stats: Callable[[], Heartbeat],
        extra_sockets: list[zmq.Socket] = (),
        on_poll: Callable[[], None] = lambda: None,
        drop_all: Callable[[], None] = lambda: None,
        engine=None,
        busy: Callable[[], bool] = lambda: False,
    ) -> None:
        self.cfg = cfg
        self.link = link
        self.handlers = {
            Rejoin: self._rejoin,
            Welcome: self._welcome,
            SetLimits: self._set_limits,
            SwitchRole: self._switch_role,
            **handlers,
        }
        self.drop_all = drop_all  # abandons every request (the router has moved them)
        self.engine = engine
        self.busy = busy  # holds requests or transfers: it may not switch roles
        self.switch_to: str | None = None  # set when run() returns to take another role
        self.draining = False  # SIGTERM: finish what is here, take nothing new, then stop
        self.drain_deadline = 0.0
        self.drain_settled_at = 0.0  # not idle-stopped before: requests may still be in flight
        self.step = step
        self.stats = stats
        self.on_poll = on_poll
        self.poller = zmq.Poller()
        for s in [link.sock, *extra_sockets]:
            self.poller.register(s, zmq.POLLIN)
        self.stopping = False
        self._next_beat = 0.0
        self._rejoin_sent_until = 0.0  # a rejoining Hello awaits its Welcome until then

    def install_signal_handlers(self) -> None:
        """SIGINT stops now (what is left moves to other workers); SIGTERM drains first: no
        new work, the requests here finish (at most `drain_timeout_s`), then stop. So any
        supervisor's stop (systemd, docker, kubernetes) is a drain-safe scale-in."""

        def stop(signum, frame):
            self.stopping = True

        def drain(signum, frame):
            if self.draining:
                self.stopping = True  # asked twice: stop now
                return
            self.draining = True
            self.drain_deadline = time.monotonic() + self.cfg.drain_timeout_s
            # NOTE: what the router sent before it heard of the drain may still be on the wire
            # (or, after a SIGSTOP, in this process's unread socket): an idle worker waits a
            # moment for it instead of leaving it to be re-dispatched.
            self.drain_settled_at = time.monotonic() + DRAIN_SETTLE_S
            self._next_beat = 0.0  # tell the router at once

        signal.signal(signal.SIGTERM, drain)
        signal.signal(signal.SIGINT, stop)

    @property
    def state(self) -> str:
        return "draining" if self.draining else "ready"

    def run(self) -> None:
        busy = False
        while not self.stopping:
            self.poller.poll(0 if busy else 20)
            for msg in self.link.recv_all():
                handler = self.handlers.get(type(msg))
                if handler is None:
                    log.warning("ignoring unexpected %s", type(msg).__name__)
                    continue
                try:
                    handler(msg)
                except Exception:  # NOTE: one bad request must not take the worker down
                    log.exception("dropping a %s that failed", type(msg).__name__)
            self.on_poll()
            busy = self.step()
            self.heartbeat()
            now = time.monotonic()
            idle = not self.busy() and now >= self.drain_settled_at
            if self.draining and (idle or now > self.drain_deadline):
                log.info("drained%s: stopping", "" if not self.busy() else " (timed out)")
                self.stopping = True

    def watch(self, sock: zmq.Socket) -> None:
        """Polls one more socket (one made after the loop started)."""
        self.poller.register(sock, zmq.POLLIN)

    def _rejoin(self, msg: Rejoin) -> None:
        # NOTE: the router asks once per heartbeat it heard while we were dropped (a partition
        # queues many). Those asks all come before the Welcome to our Hello, on this one
        # connection, so until it comes they are echoes: dropping the requests the router
        # gave us meanwhile (their KV comes by another path) would leave them hanging.
        if time.monotonic() < self._rejoin_sent_until:
            return
        log.warning("the router asks this worker to rejoin (%s): dropping all requests", msg.reason)
        self.drop_all()
        self.link.send(self.link.hello)
        self._rejoin_sent_until = time.monotonic() + self.cfg.connect_timeout_s  # then: lost

    def _set_limits(self, msg: SetLimits) -> None:
        if self.engine is None or msg.max_num_seqs < 1:
            log.warning("ignoring %s", msg)
            return
        sched = self.engine.scheduler
        if sched.config.max_num_seqs != msg.max_num_seqs:
            log.info("max_num_seqs %d -> %d", sched.config.max_num_seqs, msg.max_num_seqs)
            sched.config = dataclasses.replace(sched.config, max_num_seqs=msg.max_num_seqs)

    def _switch_role(self, msg: SwitchRole) -> None:
        if msg.role == self.cfg.role:
            return
        if self.busy():
            log.warning("not switching to %s: requests are still running here", msg.role)
            return
        log.info("switching role %s -> %s (the weights stay loaded)", self.cfg.role, msg.role)
        self.switch_to = msg.role
        self.stopping = True

    def _welcome(self, msg: Welcome) -> None:
        self._rejoin_sent_until = 0.0
        if msg.ok:
            log.info("rejoined the router")
        else:
            log.error("the router refused this worker: %s; stopping", msg.reason)
            self.stopping = True

    def heartbeat(self, layer: int = 0) -> None:
        """Sends a Heartbeat when one is due; also called between layers of a long step."""
        now = time.monotonic()
        if now >= self._next_beat:
            self.link.send(self.stats())
            self._next_beat = now + self.cfg.heartbeat_interval_s

    def say_goodbye(self, reason: str) -> None:
        try:
            self.link.send(Goodbye(self.cfg.resolved_id, reason))
        except zmq.ZMQError:
            pass


def make_hello(cfg: WorkerConfig, engine, kv_address: str, transports: tuple[str, ...]) -> Hello:
    import psutil

    return Hello(
        protocol_version=PROTOCOL_VERSION,
        worker_id=cfg.resolved_id,
        role=cfg.role,
        host=cfg.host,
        kv_address=kv_address,
        model=cfg.served_model_name or engine.model_path.name,
        num_kv_blocks=engine.num_total_blocks,
        block_size=engine.config.block_size,
        max_model_len=engine.max_model_len,
        device=str(engine.runner.device),
        pid=os.getpid(),
        kv_transports=transports,
        started_at=psutil.Process().create_time(),
        engine_loaded_at=getattr(engine, "loaded_at", 0.0),
        engine_load_s=getattr(engine, "load_s", 0.0),
    )


def engine_stats(cfg: WorkerConfig, engine, state: str, num_inflight_kv: int = 0) -> Heartbeat:
    sched = engine.scheduler
    queued = sum(s.num_tokens - s.num_computed_tokens for s in sched.waiting)
    queued += sum(s.num_tokens - s.num_computed_tokens for s in sched.running if s.is_prefill)
    return Heartbeat(
        worker_id=cfg.resolved_id,
        state=state,
        num_waiting=len(sched.waiting),
        num_running=len(sched.running),
        queued_prefill_tokens=queued,
        kv_blocks_used=engine.num_total_blocks - engine.num_free_blocks,
        kv_blocks_total=engine.num_total_blocks,
        num_inflight_kv=num_inflight_kv,
        max_num_seqs=sched.config.max_num_seqs,
        gpu=gpu_metrics.sample(str(engine.runner.device)),
    )
