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

Migration onto another worker (`migrate` with a `target`, a whole stage that is not the first)
is the same handshake with share 1.0: on the hello every live sequence's KV of the range is
copied over, then this worker frees its weights and KV of it (a weightless shell stays), so the
target owns the range; `unreplicate` of the range reloads it here and brings the KV back.

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
        self.dropped: Dropped | None = None  # parameter dropping: the stage run by the partner
        self.moved: dict[int, bool] = {}  # migrated to another worker: stage -> weights freed

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
        if msg.action == "drop":
            self._drop(msg)
        elif msg.action == "restore":
            self._restore()
        elif msg.action == "replicate" and msg.target not in ("", self.wid):
            self._ask_host(ranges.index((msg.start, msg.end)), msg.target, msg.share)
        elif msg.action == "migrate" and msg.target not in ("", self.wid):
            self._migrate_out(ranges.index((msg.start, msg.end)), msg.target)
        elif msg.action == "replicate":
            self.runner.replicate(ranges.index((msg.start, msg.end)), seqs, msg.share)
        elif msg.action == "unreplicate":
            i = ranges.index((msg.start, msg.end))
            if self.moved.pop(i, False):  # migrated away: reload it here, then the KV comes back
                self._reload(i)
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

    def _ask_host(self, i: int, target: str, share: float) -> None:
        """Binds a link for a replica of stage i on `target` and asks it (through the
        router) to host one; `poll` attaches it when its hello comes."""

        stage = self.runner.stages[i]
        if self.send is None:
            raise ValueError("this worker cannot reach other workers")
        if i in self.runner.replicas or i in self.pending:
            raise ValueError(f"stage {i} already has a replica")
        if stage.layers.is_first:
            raise ValueError("a remote replica needs hidden states in: not the first stage")
        self._host(i, target, share, stage.kv.num_blocks)

    # -- migration of a whole stage onto another worker ------------------------------------------

    def _migrate_out(self, i: int, target: str) -> None:
        """Moves stage i to `target`: a replica there with share 1.0 (it loads only those
        layers; on its hello every live sequence's KV of them is copied over, `poll`), then this
        worker frees its copy of the weights and KV (`_free_stage`): ownership has switched.
        `unreplicate` of the range moves it back (`_reload`, then the KV returns)."""
        if self.dropped is not None:
            raise ValueError("layers are dropped: restore them first")
        self._ask_host(i, target, 1.0)
        self.moved[i] = False

    def _free_stage(self, i: int) -> None:
        """Stage i runs elsewhere for every sequence: a weightless shell on the meta device and
        a one-block KV cache here (its sampler, with its state, stays)."""
        import torch

        from tideserve.engine.stages import StageModel

        f, gone = self.runner.factory, self.runner.stages[i]
        with torch.device("meta"):
            shell = StageModel(f.cfg, 1, gone.layers)
        _swap(gone, shell, f.kv(gone.layers, 1))
        self.runner.kv = self.runner.stages[0].kv

    def _reload(self, i: int) -> None:
        """Stage i's weights again (only its layers, from the checkpoint) and a KV cache of the
        pool's size, before `unreplicate` copies the live sequences' KV back into it."""
        f, stage = self.runner.factory, self.runner.stages[i]
        nb = self.engine.scheduler.pool.num_blocks
        _swap(stage, f.model(stage.layers), f.kv(stage.layers, nb))
        self.runner.kv = self.runner.stages[0].kv

    def _host(self, i: int, target: str, share: float, nb: int, reuse: bool = False) -> None:
        from tideserve.roles.replica import ReplicaLink

        link = ReplicaLink("tcp", head_id=self.wid)
        r = self.runner.stages[i].layers
        self.pending[i] = (link, share, time.monotonic() + self.hello_timeout_s)
        ask = HostReplica(self.wid, target, r.start, r.end, share, nb, link.address,
                          link.kv_address, "tcp", reuse)  # fmt: skip
        self.send(ask)
        log.info("asked %s to host a replica of layers [%d, %d)", target, r.start, r.end)

    # -- parameter dropping (KunServe) across two workers ----------------------------------------

    def _drop(self, msg: ModuleCommand) -> None:
        """Keeps the stage [start, end); the other stage becomes a replica with share 1.0 on
        `msg.target` (the partner, computing with its own weights of that range: `reuse`). When
        it says hello (`poll`), every live sequence's KV of the dropped layers is copied to it,
        this worker frees its copy of those weights and its pool grows by the blocks (of all
        layers) that the freed bytes buy: `Dropped.extra`."""
        from tideserve.engine.elastic import weight_bytes

        ranges = self._layers()
        if self.dropped is not None or self.runner.replicas or self.pending:
            raise ValueError("already dropped, or a replica is on or pending")
        if len(ranges) != 2 or (msg.start, msg.end) not in ranges:
            raise ValueError(f"drop keeps one of two stages; this worker has {ranges}")
        if msg.target in ("", self.wid) or self.send is None:
            raise ValueError("drop needs a partner worker")
        i = 1 - ranges.index((msg.start, msg.end))
        f, stage = self.runner.factory, self.runner.stages[i]
        freed = weight_bytes(stage.model)
        extra = f.num_blocks(f.range(0, f.cfg.num_layers), freed)
        nb0 = stage.kv.num_blocks
        self.dropped = Dropped(i, msg.target, nb0, extra, freed)
        self._host(i, msg.target, 1.0, nb0 + extra, reuse=True)

    def _finish_drop(self) -> None:
        """The partner runs the dropped stage for every sequence: free its weights and KV here
        (the stage keeps a weightless shell on the meta device), grow the kept stage's cache
        and the block pool (new block ids after the old ones: no block moves)."""
        d, f = self.dropped, self.runner.factory
        gone = self.runner.stages[d.stage]
        self._free_stage(d.stage)
        kept = self.runner.stages[1 - d.stage]
        kv = f.kv(kept.layers, d.nb0 + d.extra)
        kv.tensor[:, :, :, : kept.kv.tensor.shape[3]].copy_(kept.kv.tensor)
        _swap(kept, kept.model, kv)
        self.runner.kv = self.runner.stages[0].kv
        pool = self.engine.scheduler.pool
        pool._free.extend(range(pool.num_blocks, pool.num_blocks + d.extra))
        pool.num_blocks += d.extra
        d.attached = True
        log.info("dropped layers %s (%d bytes): pool %d -> %d blocks", gone.layers, d.freed,
                 d.nb0, pool.num_blocks)  # fmt: skip

    def _restore(self) -> None:
        """Reloads the dropped layers (only those), copies every live sequence's KV of them
        back from the partner, closes the link, then shrinks the pool to its size before the
        drop: a sequence holding blocks past it is moved to free lower blocks (KV copied in
        this process), or, with no room, preempted (recomputed later)."""
        d = self.dropped
        if d is None:
            raise ValueError("no layers are dropped")
        self.dropped = None
        if not d.attached:  # no hello yet: nothing was dropped
            if d.stage in self.pending:
                self.pending.pop(d.stage)[0].close()
            return
        f, r = self.runner.factory, self.runner
        stage = r.stages[d.stage]
        nb = self.engine.scheduler.pool.num_blocks
        _swap(stage, f.model(stage.layers), f.kv(stage.layers, nb))
        rep = r.replicas[d.stage]
        r.unreplicate(d.stage)  # the KV of the dropped layers comes back
        rep.stage.close()
        rep.stage.link.close()
        self._shrink(d.nb0)
        log.info("restored layers %s from %s", stage.layers, d.partner)

    def _shrink(self, nb0: int) -> None:
        sched = self.engine.scheduler
        pool, bs = sched.pool, sched.pool.block_size
        stages = self.runner.stages
        low = [b for b in pool._free if b < nb0]
        for seq in list(self.engine.seqs.values()):
            high = [k for k, b in enumerate(seq.block_table) if b >= nb0]
            if not high:
                continue
            if len(high) <= len(low) or seq not in sched.running:
                for k in high[: len(low)]:
                    src, dst = seq.block_table[k], low.pop()
                    for st in stages:
                        t = st.kv.tensor
                        t[:, :, :, dst * bs : (dst + 1) * bs] = t[
                            :, :, :, src * bs : (src + 1) * bs
                        ]
                    pool._used.discard(src)
                    pool._used.add(dst)
                    pool._free.remove(dst)
                    pool._free.append(src)
                    seq.block_table[k] = dst
                continue
            sched.running.remove(seq)  # no room below nb0: recompute it later
            sched.release(seq)
            seq.num_computed_tokens = 0
            seq.num_preemptions += 1
            sched.add(seq)
        if any(b >= nb0 for b in pool._used):
            log.warning("blocks past %d still in use: the pool stays at %d", nb0, pool.num_blocks)
            return
        pool._free = type(pool._free)(b for b in pool._free if b < nb0)
        pool.num_blocks = nb0
        for st in stages:
            kv = self.runner.factory.kv(st.layers, nb0)
            kv.tensor.copy_(st.kv.tensor[:, :, :, : nb0 * bs])
            _swap(st, st.model, kv)
        self.runner.kv = stages[0].kv

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
                    self.moved.pop(i, None)
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
                self.moved.pop(i, None)
                continue
            log.info("replica of stage %d on %s attached", i, hello.worker_id)
            if i in self.moved:
                self._free_stage(i)
                self.moved[i] = True
                log.info("layers %s migrated to %s", self.runner.stages[i].layers, hello.worker_id)
            if self.dropped is not None and self.dropped.stage == i:
                self._finish_drop()

    def _layers(self, all_stages: bool = True) -> list[tuple[int, int]]:
        d = self.dropped
        gone = set() if all_stages else {k for k, freed in self.moved.items() if freed}
        if d is not None and d.attached and not all_stages:
            gone.add(d.stage)
        return [(s.layers.start, s.layers.end) for k, s in enumerate(self.runner.stages)
                if k not in gone]  # fmt: skip

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
        return {"layers": self._layers(all_stages=False), "replicas": self._replicas()}


class Dropped:
    """A drop in progress or done: stage `stage` runs on `partner`."""

    def __init__(self, stage: int, partner: str, nb0: int, extra: int, freed: int) -> None:
        self.stage, self.partner, self.nb0, self.extra, self.freed = (
            stage,
            partner,
            nb0,
            extra,
            freed,
        )
        self.attached = False  # the partner said hello and the weights are freed


def _swap(stage, model, kv) -> None:
    """Replaces a stage's model and KV cache in place (its sampler, with its state, stays)."""
    stage.model = stage.runner.model = model
    stage.kv = stage.runner.kv = kv


class ReplicaHost:
    """The target's side: replicas of other workers' layers, each on a thread of this process
    (`serve_replica`: its own weights for the range and a KV cache of the hot worker's pool
    size, both counted here). Any decode or colocated worker can host one."""

    def __init__(self, config, worker_id: str, engine=None) -> None:
        self.config = config  # EngineConfig: the same checkpoint as the hot worker's
        self.wid = worker_id
        self.engine = engine  # its own elastic engine: `reuse` computes with its stages' weights
        self.hosted: list[tuple[HostReplica, threading.Thread, list]] = []

    def handle_host_replica(self, msg: HostReplica) -> None:
        from tideserve.roles.replica import serve_replica

        servers: list = []  # the ReplicaServer, once loaded
        model = None
        if msg.reuse:  # parameter dropping: the partner's layers are one of this worker's stages
            stages = getattr(getattr(self.engine, "runner", None), "stages", [])
            want = (msg.start, msg.end)
            model = next((s.model for s in stages if (s.layers.start, s.layers.end) == want), None)
            if model is None:
                log.warning("cannot host %s's layers [%d, %d) with own weights: no such stage",
                            msg.worker_id, msg.start, msg.end)  # fmt: skip
                return

        def body() -> None:
            try:
                serve_replica(self.config, msg.start, msg.end, msg.num_kv_blocks,
                              msg.head_address, msg.head_kv_address, msg.transport, self.wid,
                              on_ready=servers.append, model=model)  # fmt: skip
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
