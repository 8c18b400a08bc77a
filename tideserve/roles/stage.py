"""A layer-sharded pipeline across processes: the head owns the scheduler and the first layer
range; a stage worker owns the last range and samples.

    stage worker: load layers [start, L), bind a KV receiver + a control inbox
                  -> StageHello (its range, KV blocks, addresses) to the head
    head:         pool = min(own blocks, the stage's); each engine step:
                  split the plan into micro-batches; for each: run the head's layers,
                  send the hidden states as a one-layer kv_transfer (tcp frames or a shm
                  segment) + StageStep (the items: ids, positions, block tables, params)
                  -> the stage runs micro-batch k while the head computes k + 1
    stage worker: hidden states + StageStep -> its layers -> sample -> StageResult
    head:         collects every StageResult, the scheduler applies the tokens;
                  a finished request -> StageRelease; StageClose at the end.

Blocks live in the head's pool only (the stage's cache uses the same block ids), so a stage
cannot leak blocks; it keeps no per-request state beyond its sampler's, which StageRelease
drops. Nothing waits forever: a StageResult that does not come within `timeout_s` raises.
"""

from __future__ import annotations

import logging
import time

import torch
import zmq

from kv_transfer import KVBeginEvent, KVDoneEvent, KVLayerEvent, make_receiver, make_sender
from kv_transfer.base import KVAbortEvent
from kv_transfer.tcp import ZmqLink
from tideserve.config import EngineConfig
from tideserve.engine.block_pool import BlockPool
from tideserve.engine.engine import LLMEngine, _extra_eos, resolve_device, resolve_model_path
from tideserve.engine.loader import resolve_dtype
from tideserve.engine.model_config import ModelConfig
from tideserve.engine.sampler import SampleResult
from tideserve.engine.scheduler import ScheduledSeq, Scheduler, SchedulerConfig, SchedulerOutput
from tideserve.engine.sequence import Sequence
from tideserve.engine.stages import LayerRange, Stage, build_stage, sampling_rows, stage_kv_blocks
from tideserve.protocol import (
    PROTOCOL_VERSION,
    KVBegin,
    Params,
    StageClose,
    StageHello,
    StageItem,
    StageRelease,
    StageResult,
    StageStep,
    decode,
    encode,
)
from tideserve.roles.migration import params_of
from tideserve.tensor_frames import meta_of
from tideserve.worker import to_sampling_params

log = logging.getLogger(__name__)


def send_tensors(sender, dest: str, tid: str, src_id: str, tensors: list[torch.Tensor]) -> None:
    """One kv_transfer `tid` whose layers are `tensors` (all of one shape): how hidden states,
    rows and a range's KV travel between stage, replica and head processes."""
    t0 = tensors[0]
    begin = KVBegin(
        tid, src_id, sender.reply_address, [], [], t0.shape[-2] if t0.dim() > 2 else t0.shape[0],
        Params(1), 0, len(tensors), meta_of(t0),
    )  # fmt: skip
    sender.begin(dest, begin)
    for j, t in enumerate(tensors):
        sender.send_layer(tid, j, t.contiguous())
    sender.done(tid)


def split_plan(plan: SchedulerOutput, n: int) -> list[SchedulerOutput]:
    """Up to `n` micro-batches of the step, each item going to the one with the fewest tokens
    so far (decodes and prefill chunks alike); empty ones are left out."""
    mbs = [SchedulerOutput([], [], []) for _ in range(max(1, n))]
    tokens = [0] * len(mbs)
    for group in ("decodes", "prefills"):
        for it in getattr(plan, group):
            k = tokens.index(min(tokens))
            getattr(mbs[k], group).append(it)
            tokens[k] += it.num_tokens
    return [mb for mb in mbs if not mb.is_empty]


# -- the head's side --------------------------------------------------------------------------


class _RemoteSampler:
    """The engine forgets a finished request's sampler state: on the stage that samples."""

    def __init__(self, remote: RemoteStage) -> None:
        self.remote = remote

    def forget(self, request_id: str) -> None:
        self.remote.release([request_id])


class RemoteStage:
    """The last layer range, in a stage worker: micro-batches go out, results come back."""

    def __init__(self, hello: StageHello, link: ZmqLink, sender, head_id: str, timeout_s: float):
        self.hello, self.link, self.sender = hello, link, sender
        self.head_id, self.timeout_s = head_id, timeout_s
        self.results: dict[str, StageResult] = {}
        self.num_sent = 0

    def submit(self, mb: SchedulerOutput, hidden: torch.Tensor) -> str:
        """Sends one micro-batch (its items after the head sorted them) and its hidden states."""
        self.num_sent += 1
        tid = f"{self.head_id}-mb{self.num_sent}"
        send_tensors(self.sender, self.hello.kv_address, tid, self.head_id, [hidden])
        items = [
            StageItem(
                it.seq.request_id, it.start, it.num_tokens, it.sample, list(it.seq.block_table),
                params_of(it.seq),
            )
            for it in mb.decodes + mb.prefills
        ]  # fmt: skip
        step = StageStep(tid, items, len(mb.decodes))  # a 1-token prefill is not a decode
        self.link.send(self.hello.control_address, encode(step))
        return tid

    def collect(self, tid: str) -> StageResult:
        deadline = time.monotonic() + self.timeout_s
        while tid not in self.results:
            self.sender.poll_acks()
            if time.monotonic() > deadline:
                raise TimeoutError(f"no StageResult for {tid} from {self.hello.worker_id}")
            if self.link.inbox.poll(50):
                for frames in self.link.recv(64):
                    msg, _ = decode(frames)
                    if isinstance(msg, StageResult):
                        self.results[msg.transfer_id] = msg
        result = self.results.pop(tid)
        if result.error:
            raise RuntimeError(f"stage {self.hello.worker_id} failed {tid}: {result.error}")
        return result

    def release(self, request_ids: list[str]) -> None:
        self.link.send(self.hello.control_address, encode(StageRelease(request_ids)))


class RemotePipelineRunner:
    """`ModelRunner`'s interface: the head's layers here, the rest on a stage worker, in
    `num_micro_batches` micro-batches so both processes compute at once."""

    def __init__(self, local: Stage, remote: RemoteStage, num_micro_batches: int = 2) -> None:
        self.local, self.remote = local, remote
        self.num_micro_batches = num_micro_batches
        self.kv = local.kv
        self.sampler = _RemoteSampler(remote)

    def run(
        self, step: SchedulerOutput, layer_hook=None
    ) -> tuple[list[ScheduledSeq], SampleResult]:
        sent = []
        for mb in split_plan(step, self.num_micro_batches):
            hidden = self.local.forward(mb, None, layer_hook)  # [T, hidden]; sorts mb.decodes
            sent.append((mb, self.remote.submit(mb, hidden)))
        rows, tokens, logprobs = [], [], []
        for mb, tid in sent:
            result = self.remote.collect(tid)
            rows += sampling_rows(mb)
            tokens += result.token_ids
            logprobs += result.logprobs or [None] * len(result.token_ids)
        return rows, SampleResult(tokens, logprobs)


class PipelineHead:
    """Binds the head's control inbox and KV sender; `connect` waits for the stage worker's
    StageHello and builds the engine (the caller starts the worker with `address`)."""

    def __init__(self, config: EngineConfig, transport: str = "tcp", head_id: str = "head"):
        self.config, self.head_id = config, head_id
        self.ctx = zmq.Context.instance()
        self.link = ZmqLink(self.ctx)
        self.sender = make_sender(transport, self.ctx)
        self.remote: RemoteStage | None = None

    @property
    def address(self) -> str:
        return self.link.address

    def connect(self, timeout_s: float = 60.0, num_micro_batches: int = 2) -> LLMEngine:
        hello = self._wait_hello(timeout_s)
        c = self.config
        path = resolve_model_path(c.model)
        cfg = ModelConfig.from_dir(path)
        device = resolve_device(c.device)
        dtype = resolve_dtype(c.dtype, cfg, device)
        max_len = c.max_model_len or cfg.max_context
        mine = LayerRange(0, hello.start, cfg.num_layers)
        num_blocks = min(stage_kv_blocks(c, cfg, mine, dtype, device), hello.num_kv_blocks)
        local = build_stage(c, cfg, path, mine, num_blocks, device, max_len)
        self.remote = RemoteStage(hello, self.link, self.sender, self.head_id, timeout_s)
        sched_cfg = SchedulerConfig(
            max_num_seqs=c.max_num_seqs,
            max_num_batched_tokens=c.max_num_batched_tokens,
            max_model_len=min(max_len, num_blocks * c.block_size),
            enable_chunked_prefill=c.enable_chunked_prefill,
        )
        scheduler = Scheduler(sched_cfg, BlockPool(num_blocks, c.block_size))
        runner = RemotePipelineRunner(local, self.remote, num_micro_batches)
        eos = frozenset(cfg.eos_token_ids) | _extra_eos(path)
        return LLMEngine(c, cfg, path, scheduler, runner, eos)

    def _wait_hello(self, timeout_s: float) -> StageHello:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.link.inbox.poll(100):
                for frames in self.link.recv(16):
                    msg, _ = decode(frames)
                    if isinstance(msg, StageHello):
                        return msg
        raise TimeoutError(f"no stage worker said hello within {timeout_s:.0f} s")

    def close(self) -> None:
        if self.remote is not None:
            self.link.send(self.remote.hello.control_address, encode(StageClose("head closing")))
        self.sender.close()
        self.link.close()


# -- the stage worker's side ------------------------------------------------------------------


class StageServer:
    """Runs the micro-batches a head sends through this worker's (last) layer range."""

    def __init__(self, stage: Stage, receiver, link: ZmqLink, head_address: str) -> None:
        self.stage, self.receiver, self.link = stage, receiver, link
        self.head_address = head_address
        self.steps: dict[str, StageStep] = {}
        self.hidden: dict[str, torch.Tensor] = {}
        self.is_closed = False
        self.seqs: dict[str, Sequence] = {}  # mirrors for the metadata code (params, tables)

    def hello(self, worker_id: str) -> None:
        r = self.stage.layers
        msg = StageHello(
            PROTOCOL_VERSION, worker_id, r.start, r.end, self.stage.kv.num_blocks,
            self.receiver.address, self.link.address,
        )  # fmt: skip
        self.link.send(self.head_address, encode(msg))

    def serve(self, idle_timeout_s: float = 120.0) -> None:
        poller = zmq.Poller()
        for sock in self.receiver.sockets + self.link.sockets:
            poller.register(sock, zmq.POLLIN)
        last = time.monotonic()
        while not self.is_closed:
            if not poller.poll(100) and time.monotonic() - last > idle_timeout_s:
                raise TimeoutError("the pipeline head went quiet")
            last = time.monotonic()
            self._poll_kv()
            self._poll_control()
            for tid in [t for t in self.steps if t in self.hidden]:
                self._run(self.steps.pop(tid), self.hidden.pop(tid))

    def _poll_kv(self) -> None:
        for ev in self.receiver.poll():
            if isinstance(ev, KVLayerEvent):
                self.hidden[ev.request_id] = ev.tensor.clone()  # NOTE: the view dies on poll
            elif isinstance(ev, KVDoneEvent):
                self.receiver.ack(ev.request_id, True)
            elif isinstance(ev, KVAbortEvent):
                self.hidden.pop(ev.request_id, None)
                self.steps.pop(ev.request_id, None)
            elif not isinstance(ev, KVBeginEvent):
                log.warning("unexpected KV event %s", type(ev).__name__)

    def _poll_control(self) -> None:
        for frames in self.link.recv(64):
            msg, _ = decode(frames)
            if isinstance(msg, StageStep):
                self.steps[msg.transfer_id] = msg
            elif isinstance(msg, StageRelease):
                for rid in msg.request_ids:
                    self.seqs.pop(rid, None)
                    self.stage.sampler.forget(rid)
            elif isinstance(msg, StageClose):
                self.is_closed = True

    def _run(self, step: StageStep, hidden: torch.Tensor) -> None:
        plan = SchedulerOutput([], [], [])
        for n, item in enumerate(step.items):
            seq = self.seqs.get(item.request_id)
            if seq is None:
                seq = Sequence(item.request_id, [], to_sampling_params(item.params))
                self.seqs[item.request_id] = seq
            seq.block_table = item.block_table
            it = ScheduledSeq(seq, item.start, item.num_tokens, item.sample)
            is_decode = (
                n < step.num_decodes
                if step.num_decodes >= 0
                else item.num_tokens == 1 and item.sample
            )
            (plan.decodes if is_decode else plan.prefills).append(it)
        try:
            logits = self.stage.forward(plan, hidden)
            _, result = self.stage.sample(plan, logits)
            msg = StageResult(step.transfer_id, result.token_ids, result.logprobs)
        except Exception as e:  # noqa: BLE001 - the head fails the step, this worker lives on
            log.exception("micro-batch %s failed", step.transfer_id)
            msg = StageResult(step.transfer_id, [], [], error=str(e))
        self.link.send(self.head_address, encode(msg))

    def close(self) -> None:
        self.receiver.close()
        self.link.close()


def serve_stage(
    config: EngineConfig,
    start: int,
    head_address: str,
    transport: str = "tcp",
    worker_id: str = "stage-1",
) -> None:
    """A stage worker process's body: load layers [start, L), say hello, serve until closed."""
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    path = resolve_model_path(config.model)
    cfg = ModelConfig.from_dir(path)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, cfg, device)
    layers = LayerRange(start, cfg.num_layers, cfg.num_layers)
    num_blocks = stage_kv_blocks(config, cfg, layers, dtype, device)
    max_len = config.max_model_len or cfg.max_context
    stage = build_stage(config, cfg, path, layers, num_blocks, device, max_len)
    ctx = zmq.Context.instance()
    server = StageServer(stage, make_receiver(transport, ctx), ZmqLink(ctx), head_address)
    try:
        server.hello(worker_id)
        server.serve()
    finally:
        server.close()
