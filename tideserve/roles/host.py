"""A worker process: one engine and one router link, serving one role after another.

run_worker: load the CURVE keys and the engine -> connect to the router -> loop { build the
role (its KV endpoints are made once, on first need: senders for prefill, a receiver for
decode/colocated) -> Hello under that role -> run until stopped or told to `SwitchRole` } ->
Goodbye, close. A role switch keeps the weights and the KV cache allocation; the router only
asks a drained worker, and a busy one refuses.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from tideserve.worker import RouterLink, WorkerConfig, make_hello

log = logging.getLogger(__name__)


class KVEndpoints:
    """The worker's KV sockets, each made the first time a role needs it."""

    def __init__(self, cfg: WorkerConfig, ctx, keys, device: str = "cpu") -> None:
        self.cfg, self.ctx, self.keys, self.device = cfg, ctx, keys, device
        self._senders = None
        self._receiver = None
        self.transports = offered_transports(cfg.kv_transports, device)

    def senders(self) -> dict:
        from kv_transfer import make_sender

        if self._senders is None:
            cfg = self.cfg
            dist = [t for t in self.transports if t in ("nccl", "gloo")]
            self._senders = {
                t: make_sender(
                    t,
                    self.ctx,
                    bind_host=cfg.host,
                    timeout_s=cfg.kv_timeout_s,
                    curve=self.keys,
                    device=self.device,
                )  # fmt: skip
                for t in ("tcp", "shm", *dist)
            }
        return self._senders

    def receiver(self):
        from kv_transfer import make_receiver

        if self._receiver is None:
            cfg = self.cfg
            self._receiver = make_receiver(
                self.transports[0],
                self.ctx,
                bind_host=cfg.host,
                port=cfg.kv_port,
                timeout_s=cfg.kv_timeout_s,
                curve=self.keys,
                device=self.device,
            )
        return self._receiver

    def close(self) -> None:
        for s in (self._senders or {}).values():
            s.close()
        if self._receiver is not None:
            self._receiver.close()


def offered_transports(configured: tuple[str, ...], device: str) -> tuple[str, ...]:
    """The KV transports this worker offers, best first: the configured ones it can run, with
    nccl first on a CUDA worker where NCCL is available (the router picks nccl only when both
    ends offer it). A worker's receiver takes tcp and shm whatever else it offers."""
    offered = [t for t in configured if t in ("nccl", "gloo", "shm", "tcp")]
    if device.startswith("cuda") and "nccl" not in offered:
        offered.insert(0, "nccl")
    if any(t in ("nccl", "gloo") for t in offered):
        from kv_transfer import dist_available

        offered = [t for t in offered if t not in ("nccl", "gloo") or dist_available(t)]
        if "nccl" in offered and not device.startswith("cuda"):
            offered.remove("nccl")
    return tuple(offered) or ("tcp",)


def build_role(cfg: WorkerConfig, engine, link: RouterLink, kv: KVEndpoints):
    """(the role's worker object, its Hello; a prefill worker's lists what it can send)."""
    if cfg.role == "prefill":
        from tideserve.roles.prefill import PrefillWorker

        hello = make_hello(cfg, engine, "", kv.transports)
        return PrefillWorker(cfg, engine, link, kv.senders()), hello
    from tideserve.roles.decode import DecodeWorker

    receiver = kv.receiver()
    hello = make_hello(cfg, engine, receiver.address, kv.transports)
    return DecodeWorker(cfg, engine, link, receiver, kv.senders), hello


def run_worker(cfg: WorkerConfig) -> None:
    import zmq

    from tideserve.roles.modules import build_engine
    from tideserve.security import load_curve_keys, start_authenticator

    cfg = dataclasses.replace(cfg, worker_id=cfg.resolved_id)  # the id outlives role switches
    keys = load_curve_keys(cfg.curve_keys)  # before the engine loads: a bad dir fails fast
    t0 = time.time()
    if cfg.engine.layer_stages and cfg.role != "colocated":
        raise ValueError("--layer-stages needs --role colocated (its KV never leaves a worker)")
    engine = build_engine(cfg.engine)
    engine.loaded_at = time.time()
    engine.load_s = engine.loaded_at - t0
    ctx = zmq.Context()
    auth = start_authenticator(ctx, keys) if keys else None
    link = RouterLink(ctx, cfg.router_address, cfg.worker_id, keys)
    kv = KVEndpoints(cfg, ctx, keys, str(engine.runner.device))
    worker = None
    try:
        while True:
            worker, hello = build_role(cfg, engine, link, kv)
            worker.loop.install_signal_handlers()
            link.handshake(hello, cfg.connect_timeout_s)
            log.info("%s ready as %s%s", cfg.worker_id, cfg.role,
                     f": KV at {hello.kv_address}" if hello.kv_address else "")  # fmt: skip
            worker.loop.run()
            if worker.loop.switch_to is None:
                break
            cfg = dataclasses.replace(cfg, role=worker.loop.switch_to)
    finally:
        for rid in list(engine.seqs):
            engine.abort(rid)
        if worker is not None:
            worker.loop.say_goodbye("stopping")
        kv.close()
        if auth is not None:
            auth.stop()
        ctx.destroy(linger=500)
