"""Module elasticity inside one worker (`--layer-stages N`): its engine runs the model as N
layer stages over an `ElasticRunner`, and the router's `ModuleCommand` changes them.

A command's life: the router checks it against the worker's last heartbeat and sends it ->
the worker loop hands it to `handle_module_command` between two engine steps -> the runner
replicates a stage (the KV of the sequences handed over is copied first), hands a replica's
sequences back, or moves a layer range to the neighbouring stage -> the next heartbeat's
`layers` and `replicas` show the result. A command the runner refuses is logged and changes
nothing; no request is touched either way. Without a `target` the replica lives in this process
(its own weights and KV cache for the range) and `LayerReplica.host_id` is this worker.

Onto another worker (`ModuleCommand.target`), a handshake through the router:

    hot worker (ModuleController)           router                 target (ReplicaHost)
    binds a ReplicaLink, sends
    HostReplica(its addresses)       ->     forwards it      ->    serve_replica on a thread:
                                                                   loads [a, b), a KV cache of
    between steps: polls the link    <-------- StageHello -------  the hot worker's pool size
    for the hello, then replicate(
      ..., remote=) (KV copied in)
    unreplicate: KV copied back,
    StageClose                       -------------------------->   the thread ends; its
                                                                   heartbeat drops the replica

The hot worker gives up (and closes its link) when no hello comes within `hello_timeout_s`; the
replica thread ends on its own when the hot worker goes quiet. The target's heartbeat lists what
it hosts in `replicas` with `head_id` (whose layers) and `kv_bytes` (its cache's size).
"""

from __future__ import annotations

import logging
import threading
import time

from tideserve.protocol import HostReplica, LayerReplica, ModuleCommand

log = logging.getLogger(__name__)


def build_engine(config):
    """The worker's engine: the plain one, or with `layer_stages` an elastic pipeline of that
    many stages of (nearly) equal layer counts."""
    from tideserve.engine.engine import LLMEngine

    if not config.layer_stages:
        return LLMEngine.from_config(config)
    import torch

    from tideserve.engine.elastic import build_elastic_engine
    from tideserve.engine.engine import resolve_model_path
    from tideserve.engine.model_config import ModelConfig

    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    num_layers = ModelConfig.from_dir(resolve_model_path(config.model)).num_layers
    return build_elastic_engine(config, stage_ranges(num_layers, config.layer_stages))


def stage_ranges(num_layers: int, num_stages: int) -> list[tuple[int, int]]:
    """[start, end) of each of `num_stages` contiguous stages; earlier ones take the remainder."""
    if not 1 <= num_stages <= num_layers:
        raise ValueError(f"layer_stages must be in 1..{num_layers} (the model's layers)")
    q, r = divmod(num_layers, num_stages)
    bounds = [0]
    for i in range(num_stages):
        bounds.append(bounds[-1] + q + (i < r))
    return list(zip(bounds, bounds[1:]))


class ModuleController:
    """Carries out `ModuleCommand`s on an elastic engine and reports its layers."""

    def __init__(self, engine, worker_id: str, send=None, hello_timeout_s: float = 120.0) -> None:
        self.engine = engine
        self.runner = engine.runner
        self.wid = worker_id
        self.send = send  # to the router (HostReplica); None: no replicas on other workers
        self.hello_timeout_s = hello_timeout_s
        self.pending: dict[int, tuple] = {}  # stage -> (link, share, deadline): awaiting hello

    def handle_module_command(self, msg: ModuleCommand) -> None:
        try:
            self._apply(msg)
        except (ValueError, KeyError) as e:
            log.warning("refusing %s on %s: %s", msg, self.wid, e)
            return
        log.info("layers now %s, replicas %s", self.report()["layers"], self._replicas())

    def _apply(self, msg: ModuleCommand) -> None:
        ranges = self._layers()
        seqs = list(self.engine.seqs.values())
        if msg.action == "replicate" and msg.target not in ("", self.wid):
            self._ask_host(ranges.index((msg.start, msg.end)), msg)
        elif msg.action == "replicate":
            self.runner.replicate(ranges.index((msg.start, msg.end)), seqs, msg.share)
        elif msg.action == "unreplicate":
            i = ranges.index((msg.start, msg.end))
            if i in self.pending and i not in self.runner.replicas:  # no hello yet: give up
                self.pending.pop(i)[0].close()
                return
            rep = self.runner.replicas.get(i)
            self.runner.unreplicate(i)
            if rep is not None and hasattr(rep.stage, "link"):  # on another worker: end it
                rep.stage.close()
                rep.stage.link.close()
        else:
            src = next((i for i, (a, b) in enumerate(ranges) if a <= msg.start < b), None)
            if src is None:
                raise ValueError(f"layer {msg.start} is in no stage of {ranges}")
            dst = src + 1 if msg.end == ranges[src][1] else src - 1
            if not 0 <= dst < len(ranges):
                raise ValueError(f"layers [{msg.start}, {msg.end}) have no neighbouring stage")
            self.runner.migrate(src, dst, msg.start, msg.end, seqs)

    def _ask_host(self, i: int, msg: ModuleCommand) -> None:
        """Binds a link for a replica of stage i on `msg.target` and asks it (through the
        router) to host one; `poll` attaches it when its hello comes."""
        from tideserve.roles.replica import ReplicaLink

        stage = self.runner.stages[i]
        if self.send is None:
            raise ValueError("this worker cannot reach other workers")
        if i in self.runner.replicas or i in self.pending:
            raise ValueError(f"stage {i} already has a replica")
        if stage.layers.is_first:
            raise ValueError("a remote replica needs hidden states in: not the first stage")
        link = ReplicaLink("tcp", head_id=self.wid)
        r = stage.layers
        self.pending[i] = (link, msg.share, time.monotonic() + self.hello_timeout_s)
        nb = stage.kv.num_blocks
        ask = HostReplica(self.wid, msg.target, r.start, r.end, msg.share, nb, link.address,
                          link.kv_address, "tcp")  # fmt: skip
        self.send(ask)
        log.info("asked %s to host a replica of layers [%d, %d)", msg.target, r.start, r.end)

    def poll(self) -> None:
        """Between steps: attaches a remote replica whose hello came (its sequences' KV of the
        range is copied over first); drops one that never said hello."""
        from tideserve.protocol import StageHello, decode
        from tideserve.roles.replica import RemoteReplica

        for i, (link, share, deadline) in list(self.pending.items()):
            hello = None
            for frames in link.link.recv(16) if link.link.inbox.poll(0) else []:
                msg, _ = decode(frames)
                if isinstance(msg, StageHello):
                    hello = msg
            if hello is None:
                if time.monotonic() > deadline:
                    log.warning("no replica of stage %d said hello: giving up", i)
                    self.pending.pop(i)
                    link.close()
                continue
            del self.pending[i]
            remote = RemoteReplica(link, hello, self.runner.stages[-1].layers.num_layers)
            try:
                self.runner.replicate(i, list(self.engine.seqs.values()), share, remote=remote)
            except (ValueError, KeyError) as e:
                log.warning("refusing the replica from %s: %s", hello.worker_id, e)
                remote.close()
                link.close()
                continue
            log.info("replica of stage %d on %s attached", i, hello.worker_id)

    def _layers(self) -> list[tuple[int, int]]:
        return [(s.layers.start, s.layers.end) for s in self.runner.stages]

    def _replicas(self) -> list[LayerReplica]:
        out = []
        for i in sorted(self.runner.replicas):
            rep = self.runner.replicas[i]
            r = rep.stage.layers
            live = sum(not s.is_finished for s in rep.offloaded.values())
            hello = getattr(rep.stage, "hello", None)  # a replica in another process
            host = hello.worker_id if hello is not None else self.wid
            out.append(LayerReplica(r.start, r.end, host, rep.share, live))
        return out

    def report(self) -> dict:
        """The heartbeat's `layers` and `replicas` fields."""
        return {"layers": self._layers(), "replicas": self._replicas()}


class ReplicaHost:
    """The target's side: replicas of other workers' layers, each on a thread of this process
    (`serve_replica`: its own weights for the range and a KV cache of the hot worker's pool
    size, both counted here). Any decode or colocated worker can host one."""

    def __init__(self, config, worker_id: str) -> None:
        self.config = config  # EngineConfig: the same checkpoint as the hot worker's
        self.wid = worker_id
        self.hosted: list[tuple[HostReplica, threading.Thread, list]] = []

    def handle_host_replica(self, msg: HostReplica) -> None:
        from tideserve.roles.replica import serve_replica

        servers: list = []  # the ReplicaServer, once loaded

        def body() -> None:
            try:
                serve_replica(self.config, msg.start, msg.end, msg.num_kv_blocks,
                              msg.head_address, msg.head_kv_address, msg.transport, self.wid,
                              on_ready=servers.append)  # fmt: skip
            except BaseException as e:  # noqa: BLE001 - a thread: log, never take the worker down
                log.warning("replica of %s's layers [%d, %d) ended: %r",
                            msg.worker_id, msg.start, msg.end, e)  # fmt: skip
            else:
                log.info("replica of %s's layers [%d, %d) closed", msg.worker_id, msg.start,
                         msg.end)  # fmt: skip

        t = threading.Thread(target=body, name=f"replica-{msg.worker_id}", daemon=True)
        self.hosted.append((msg, t, servers))
        t.start()
        log.info("hosting a replica of %s's layers [%d, %d)", msg.worker_id, msg.start, msg.end)

    def report(self) -> list[LayerReplica]:
        """What it hosts now (ended threads are forgotten)."""
        self.hosted = [h for h in self.hosted if h[1].is_alive()]
        out = []
        for msg, _, servers in self.hosted:
            n, kv_bytes = 0, 0
            if servers:
                n = len(servers[0].seqs)
                t = servers[0].stage.kv.tensor
                kv_bytes = t.numel() * t.element_size()
            out.append(LayerReplica(msg.start, msg.end, self.wid, msg.share, n, msg.worker_id,
                                    kv_bytes))  # fmt: skip
        return out
