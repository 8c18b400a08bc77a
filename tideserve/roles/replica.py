"""A replica of one pipeline stage in another process (CoCoServe across processes): the
`ElasticRunner` of a worker hands part of its batch's compute for a layer range [a, b) to a
replica process that loads only those layers' weights and keeps their KV for the sequences
offloaded to it.

    head (the hot worker)                        replica process (`serve_replica`)
    ReplicaLink: control inbox, KV sender,       load layers [a, b), a KV cache of the head's
      KV receiver; the caller starts the           pool size (same block ids), bind a KV
      replica process with its two addresses       receiver + a control inbox -> StageHello
    replicate(i, seqs, share, stage=remote):
      per handed-over sequence: its KV of [a, b) -> StageKV(into) + a kv_transfer
    each step: the offloaded rows' hidden states (a kv_transfer) + StageStep  -> [a, b)
      (submitted before the primary computes the rest, so both processes compute at once)
                                                 <- the output rows (hidden states, or on the
                                                    last stage logits) as a kv_transfer
                                                    + StageResult (no tokens)
    unreplicate(i): StageKV(out) per sequence    <- its KV of [a, b) as a kv_transfer, then the
      -> imported into the primary's cache          sequence is forgotten
    close(): StageClose                          -> the process exits 0 when it holds no
                                                    sequence (its `seqs` mirror is empty)

The replica runs control messages strictly in the order they came (a step or a KV import
waits for its tensors), so a step never reads KV that has not been imported yet. Blocks live in
the head's pool only: the replica cannot leak one. A replica that loads its layers cannot be a
first stage; one over weights the host already holds (`serve_replica(model=)`, parameter
dropping) can: the head then sends the rows' token ids (int64) instead of hidden states.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque

import torch
import zmq

from kv_transfer import KVBeginEvent, KVDoneEvent, KVLayerEvent, make_receiver, make_sender
from kv_transfer.base import KVAbortEvent
from kv_transfer.tcp import ZmqLink
from tideserve.config import EngineConfig
from tideserve.engine.engine import resolve_device, resolve_model_path
from tideserve.engine.kv_cache import KVCache
from tideserve.engine.loader import resolve_dtype
from tideserve.engine.model_config import ModelConfig
from tideserve.engine.scheduler import ScheduledSeq, SchedulerOutput
from tideserve.engine.sequence import Sequence
from tideserve.engine.stages import LayerRange, Stage, build_stage, stage_config
from tideserve.protocol import (
    PROTOCOL_VERSION,
    Params,
    StageClose,
    StageHello,
    StageItem,
    StageKV,
    StageRelease,
    StageResult,
    StageStep,
    decode,
    encode,
)
from tideserve.roles.migration import params_of
from tideserve.roles.stage import send_tensors
from tideserve.worker import to_sampling_params

log = logging.getLogger(__name__)


class _Inbox:
    """Whole kv_transfers as they arrive on a receiver: transfer id -> its layers, once done."""

    def __init__(self, receiver) -> None:
        self.receiver = receiver
        self.partial: dict[str, dict[int, torch.Tensor]] = {}
        self.done: dict[str, list[torch.Tensor]] = {}

    def poll(self) -> None:
        for ev in self.receiver.poll():
            if isinstance(ev, KVLayerEvent):  # NOTE: the view dies on the next poll
                self.partial.setdefault(ev.request_id, {})[ev.layer] = ev.tensor.clone()
            elif isinstance(ev, KVDoneEvent):
                layers = self.partial.pop(ev.request_id, {})
                self.done[ev.request_id] = [layers[j] for j in sorted(layers)]
                self.receiver.ack(ev.request_id, True)
            elif isinstance(ev, KVAbortEvent):
                self.partial.pop(ev.request_id, None)
            elif not isinstance(ev, KVBeginEvent):
                log.warning("unexpected KV event %s", type(ev).__name__)


# -- the head's side --------------------------------------------------------------------------


class _Pending:
    def __init__(self, remote: RemoteReplica, tid: str) -> None:
        self.remote, self.tid = remote, tid

    def result(self) -> torch.Tensor:
        return self.remote.collect(self.tid)


class RemoteReplica:
    """What `ElasticRunner.replicate(..., stage=...)` takes as a replica: a stage's layer range in
    another process. `submit` sends rows out (compute overlaps the primary's), `copy_in` and
    `copy_out` move sequences' KV of the range over kv_transfer."""

    def __init__(self, link: ReplicaLink, hello: StageHello, num_layers: int) -> None:
        self.link, self.hello = link, hello
        self.layers = LayerRange(hello.start, hello.end, num_layers)
        self.num_kv_blocks = hello.num_kv_blocks
        self.num_steps = 0
        self.moved_bytes = 0
        self._ids = itertools.count()
        self._results: dict[str, StageResult] = {}
        self._sent_to: set[str] = set()  # requests the replica may mirror

    def _tid(self, kind: str) -> str:
        return f"{self.link.head_id}-{self.hello.worker_id}-{kind}{next(self._ids)}"

    def _control(self, msg) -> None:
        self.link.link.send(self.hello.control_address, encode(msg))

    def submit(self, plan: SchedulerOutput, hidden: torch.Tensor) -> _Pending:
        """Sends the rows of `plan` (decodes then prefills, decodes sorted as `prepare` does)."""
        plan.decodes.sort(key=lambda d: d.start)
        tid = self._tid("mb")
        send_tensors(self.link.sender, self.hello.kv_address, tid, self.link.head_id, [hidden])
        items = [
            StageItem(
                it.seq.request_id, it.start, it.num_tokens, it.sample, list(it.seq.block_table),
                params_of(it.seq),
            )
            for it in plan.decodes + plan.prefills
        ]  # fmt: skip
        self._sent_to.update(i.request_id for i in items)
        self._control(StageStep(tid, items, len(plan.decodes)))
        self.num_steps += 1
        return _Pending(self, tid)

    def forward(self, plan: SchedulerOutput, hidden: torch.Tensor, layer_hook=None):
        return self.submit(plan, hidden).result()

    def collect(self, tid: str) -> torch.Tensor:
        """The replica's output rows for transfer `tid` (waits up to the link's timeout)."""
        link = self.link
        deadline = time.monotonic() + link.timeout_s
        while tid not in self._results or tid not in link.inbox.done:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no output for {tid} from replica {self.hello.worker_id}")
            link.pump(self._results)
            result = self._results.get(tid)
            if result is not None and result.error:
                self._results.pop(tid)
                raise RuntimeError(f"replica {self.hello.worker_id} failed {tid}: {result.error}")
        self._results.pop(tid)
        return link.inbox.done.pop(tid)[0]

    def copy_in(self, kv: KVCache, layer0: int, seqs: list[Sequence]) -> int:
        """Sends the sequences' KV of the replica's layers (the primary's cache `kv`, its layers
        from `layer0`); the replica imports it before any later step. Bytes sent."""
        moved = 0
        for seq in seqs:
            n = seq.num_computed_tokens
            if not n:
                continue
            slots = kv.slots(seq.block_table, n)
            layers = [kv.export_layer(layer0 + j, slots) for j in range(self.layers.size)]
            tid = self._tid("kvin")
            send_tensors(self.link.sender, self.hello.kv_address, tid, self.link.head_id, layers)
            self._sent_to.add(seq.request_id)
            self._control(StageKV(tid, seq.request_id, list(seq.block_table), n, True))
            moved += sum(t.numel() * t.element_size() for t in layers)
        self.moved_bytes += moved
        return moved

    def copy_out(self, kv: KVCache, layer0: int, seqs: list[Sequence]) -> int:
        """Brings the sequences' KV of the range back into `kv` and makes the replica forget
        every sequence it was sent. Bytes received."""
        wanted = {}
        for seq in seqs:
            n = seq.num_computed_tokens
            if not n:
                continue
            tid = self._tid("kvout")
            self._control(StageKV(tid, seq.request_id, list(seq.block_table), n, False))
            wanted[tid] = kv.slots(seq.block_table, n)
        moved = 0
        inbox = self.link.inbox
        deadline = time.monotonic() + self.link.timeout_s
        while wanted:
            if time.monotonic() > deadline:
                raise TimeoutError(f"replica {self.hello.worker_id} did not send back KV")
            self.link.pump(self._results)
            for tid in [t for t in wanted if t in inbox.done]:
                slots = wanted.pop(tid)
                for j, t in enumerate(inbox.done.pop(tid)):
                    kv.import_layer(layer0 + j, slots, t)
                    moved += t.numel() * t.element_size()
        self._control(StageRelease(sorted(self._sent_to)))
        self._sent_to.clear()
        self.moved_bytes += moved
        return moved

    def close(self) -> None:
        """Tells the replica process to exit (after what it was sent before)."""
        self._control(StageClose("replica removed"))
        self.link.settle()


class ReplicaLink:
    """The head's endpoints for its remote replicas: a control inbox (`address`), a KV sender
    (rows and KV out) and a KV receiver (`kv_address`: rows and KV back). Start a replica
    process with `serve_replica(..., link.address, link.kv_address)`, then `connect`."""

    def __init__(self, transport: str = "tcp", head_id: str = "head", timeout_s: float = 60.0):
        self.head_id, self.timeout_s = head_id, timeout_s
        self.ctx = zmq.Context.instance()
        self.link = ZmqLink(self.ctx)
        self.sender = make_sender(transport, self.ctx)
        self.receiver = make_receiver(transport, self.ctx)
        self.inbox = _Inbox(self.receiver)

    @property
    def address(self) -> str:
        return self.link.address

    @property
    def kv_address(self) -> str:
        return self.receiver.address

    def connect(self, num_layers: int, timeout_s: float | None = None) -> RemoteReplica:
        """Waits for a replica process's StageHello."""
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        while time.monotonic() < deadline:
            if self.link.inbox.poll(100):
                for frames in self.link.recv(16):
                    msg, _ = decode(frames)
                    if isinstance(msg, StageHello):
                        return RemoteReplica(self, msg, num_layers)
        raise TimeoutError("no replica process said hello")

    def pump(self, results: dict[str, StageResult]) -> None:
        """One round of I/O: acks, arriving tensors, StageResults."""
        self.sender.poll_acks()
        self.inbox.poll()
        if self.link.inbox.poll(5):
            for frames in self.link.recv(64):
                msg, _ = decode(frames)
                if isinstance(msg, StageResult):
                    results[msg.transfer_id] = msg

    def settle(self, timeout_s: float = 5.0) -> None:
        """Waits (bounded) until every transfer this head sent has been acked."""
        deadline = time.monotonic() + timeout_s
        while self.sender.num_inflight and time.monotonic() < deadline:
            self.pump({})

    def close(self) -> None:
        self.sender.close()
        self.receiver.close()
        self.link.close()


# -- the replica process's side ---------------------------------------------------------------


class ReplicaServer:
    """Runs a head's offloaded rows through this process's layer range and keeps their KV."""

    def __init__(self, stage: Stage, receiver, sender, link: ZmqLink, head_address: str,
                 head_kv_address: str, worker_id: str) -> None:  # fmt: skip
        self.stage, self.link, self.sender = stage, link, sender
        self.receiver, self.inbox = receiver, _Inbox(receiver)
        self.head_address, self.head_kv_address = head_address, head_kv_address
        self.worker_id = worker_id
        self.queue: deque = deque()  # StageStep / StageKV, run strictly in order
        self.seqs: dict[str, Sequence] = {}  # mirrors of the sequences it holds KV for
        self.is_closed = False

    def hello(self) -> None:
        r = self.stage.layers
        msg = StageHello(
            PROTOCOL_VERSION, self.worker_id, r.start, r.end, self.stage.kv.num_blocks,
            self.receiver.address, self.link.address,
        )  # fmt: skip
        self.link.send(self.head_address, encode(msg))

    def serve(self, idle_timeout_s: float = 120.0) -> None:
        poller = zmq.Poller()
        for sock in self.receiver.sockets + self.link.sockets + self.sender.sockets:
            poller.register(sock, zmq.POLLIN)
        last = time.monotonic()
        while not (self.is_closed and not self.queue):
            if not poller.poll(100) and time.monotonic() - last > idle_timeout_s:
                raise TimeoutError("the head went quiet")
            last = time.monotonic()
            self.sender.poll_acks()
            self.inbox.poll()
            for frames in self.link.recv(64):
                msg, _ = decode(frames)
                if isinstance(msg, (StageStep, StageKV)):
                    self.queue.append(msg)
                elif isinstance(msg, StageRelease):
                    for rid in msg.request_ids:
                        self.seqs.pop(rid, None)
                elif isinstance(msg, StageClose):
                    self.is_closed = True
            while self.queue and self._ready(self.queue[0]):
                self._run(self.queue.popleft())
        deadline = time.monotonic() + 5.0  # let the head ack what was sent back
        while self.sender.num_inflight and time.monotonic() < deadline:
            self.sender.poll_acks()
            time.sleep(0.005)

    def _ready(self, msg) -> bool:
        return (isinstance(msg, StageKV) and not msg.into) or msg.transfer_id in self.inbox.done

    def _seq(self, rid: str, params: Params | None = None) -> Sequence:
        seq = self.seqs.get(rid)
        if seq is None:
            seq = Sequence(rid, [], to_sampling_params(params or Params(1)))
            self.seqs[rid] = seq
        return seq

    def _run(self, msg) -> None:
        kv = self.stage.kv
        if isinstance(msg, StageKV) and msg.into:
            self._seq(msg.request_id)
            slots = kv.slots(msg.block_table, msg.num_tokens)
            for j, t in enumerate(self.inbox.done.pop(msg.transfer_id)):
                kv.import_layer(j, slots, t)
        elif isinstance(msg, StageKV):
            self.seqs.pop(msg.request_id, None)
            slots = kv.slots(msg.block_table, msg.num_tokens)
            layers = [kv.export_layer(j, slots) for j in range(self.stage.layers.size)]
            send_tensors(self.sender, self.head_kv_address, msg.transfer_id, self.worker_id,
                          layers)  # fmt: skip
        else:
            self._step(msg, self.inbox.done.pop(msg.transfer_id)[0])

    def _step(self, step: StageStep, hidden: torch.Tensor) -> None:
        plan = SchedulerOutput([], [], [])
        for n, item in enumerate(step.items):
            seq = self._seq(item.request_id, item.params)
            seq.block_table = item.block_table
            it = ScheduledSeq(seq, item.start, item.num_tokens, item.sample)
            (plan.decodes if n < step.num_decodes else plan.prefills).append(it)
        try:
            out = self.stage.forward(plan, hidden)  # [T, hidden], or last: [N, vocab] logits
            send_tensors(self.sender, self.head_kv_address, step.transfer_id, self.worker_id,
                          [out])  # fmt: skip
            msg = StageResult(step.transfer_id, [])
        except Exception as e:  # noqa: BLE001 - the head fails the step, this process lives on
            log.exception("rows %s failed", step.transfer_id)
            msg = StageResult(step.transfer_id, [], [], error=str(e))
        self.link.send(self.head_address, encode(msg))

    def close(self) -> None:
        self.sender.close()
        self.receiver.close()
        self.link.close()


def spawn_replica(
    link: ReplicaLink,
    config: EngineConfig,
    start: int,
    end: int,
    num_blocks: int,
    transport: str = "tcp",
    worker_id: str = "replica-1",
    timeout_s: float = 60.0,
):
    """Starts a replica process of layers [start, end) for `link`'s head and waits for its
    hello: (the `RemoteReplica` to pass to `ElasticRunner.replicate`, the process)."""
    import multiprocessing as mp

    num_layers = ModelConfig.from_dir(resolve_model_path(config.model)).num_layers
    args = (config, start, end, num_blocks, link.address, link.kv_address, transport, worker_id)
    proc = mp.get_context("spawn").Process(target=serve_replica, args=args, daemon=True)
    proc.start()
    try:
        return link.connect(num_layers, timeout_s), proc
    except BaseException:
        proc.kill()
        raise


def serve_replica(
    config: EngineConfig,
    start: int,
    end: int,
    num_blocks: int,
    head_address: str,
    head_kv_address: str,
    transport: str = "tcp",
    worker_id: str = "replica-1",
    on_ready=None,
    model=None,
) -> None:
    """A replica process's body: load only layers [start, end) with a KV cache of `num_blocks`
    (the head's pool), say hello, serve until closed. Exits 1 if it still held sequences.
    Also runs on a thread of a worker (`roles/modules.py`'s `ReplicaHost`): `on_ready(server)`
    is called with the `ReplicaServer` before the hello. `model`: a `StageModel` of exactly
    [start, end) this process already holds (parameter dropping: the host's own stage), used
    instead of loading; then a first stage is allowed (the head sends token ids in)."""
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    path = resolve_model_path(config.model)
    cfg = ModelConfig.from_dir(path)
    device = resolve_device(config.device)
    resolve_dtype(config.dtype, cfg, device)
    layers = LayerRange(start, end, cfg.num_layers)
    if model is not None:
        if model.layer_range != layers:
            raise ValueError(f"the host's {model.layer_range} is not layers [{start}, {end})")
        dtype = next(model.parameters()).dtype
        kv = KVCache(stage_config(cfg, layers), num_blocks, config.block_size, dtype, device)
        stage = Stage(model, kv, device)
    else:
        if layers.is_first:
            raise ValueError("a remote replica needs hidden states in: not the first stage")
        max_len = config.max_model_len or cfg.max_context
        stage = build_stage(config, cfg, path, layers, num_blocks, device, max_len)
    ctx = zmq.Context.instance()
    server = ReplicaServer(
        stage, make_receiver(transport, ctx), make_sender(transport, ctx), ZmqLink(ctx),
        head_address, head_kv_address, worker_id,
    )  # fmt: skip
    try:
        if on_ready is not None:
            on_ready(server)
        server.hello()
        server.serve()
    finally:
        server.close()
    if server.seqs:
        log.error("replica closed holding %d sequences", len(server.seqs))
        raise SystemExit(1)
