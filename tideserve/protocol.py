"""Every message that crosses a process boundary, and its msgpack codec.

A ZMQ message is one msgpack frame holding a tagged struct, followed by zero or more raw frames
for tensors (zero-copy on both sides): the struct carries each tensor's `TensorMeta` (dtype,
shape) and the raw bytes travel in their own frame, in order. One `Decoder` reads every type;
services dispatch on the type through a `{type: handler}` table. Decoding is bounded (frame
sizes, counts) and rejects other protocol versions in `Hello`. Nothing is ever pickled.

Who sends what:
    worker -> router     Hello, Heartbeat, Goodbye, TokenChunk, TokenBatch (a step's chunks in
                         one message), RequestFailed, MigrationDone, MigrationFailed,
                         HostReplica (the router forwards it to its host_id)
    router -> worker     PrefillRequest, GenerateRequest, AbortRequest, Welcome, Rejoin,
                         SetLimits, SwitchRole, MigrateRequest, CancelMigration, ModuleCommand,
                         HostReplica
    prefill -> decode    KVBegin, KVLayer (+ tensor frame, or a shm notice), KVDone, KVAbort
    decode -> prefill    KVAck
    gloo/nccl pairs      KVPairOffer (sender -> receiver), KVDistLayer (a notice; the bytes go
                         through torch.distributed), KVPairClose (either way)
    pipeline head/stage  StageHello (stage -> head), StageStep, StageRelease, StageClose (head ->
                         stage), StageResult (last stage -> head); hidden states go as KV transfers
Structs are positional (array_like, so one union decodes them all); new fields are only ever
appended, with defaults.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import msgspec
import numpy as np

# NOTE: 2 since decode workers send TokenBatch, which a version-1 router cannot read: the
# Hello check then refuses the mix at once instead of leaving its requests without tokens.
PROTOCOL_VERSION = 2
MAX_HEADER_BYTES = 4 << 20  # a msgpack header larger than this is rejected
MAX_TENSOR_BYTES = 1 << 31  # one raw tensor frame
MAX_FRAMES = 64

Role = Literal["prefill", "decode", "colocated", "partial"]
WorkerState = Literal["starting", "ready", "draining"]
# NOTE: decoding checks these bounds; a Hello outside them would break routing for everyone
# (a zero block size divides by zero in the policy)
NonNegative = Annotated[int, msgspec.Meta(ge=0)]
BlockSize = Annotated[int, msgspec.Meta(ge=1)]
ContextLength = Annotated[int, msgspec.Meta(ge=2)]


class ProtocolError(ValueError):
    """A frame that is malformed, oversized, or of another protocol version."""


class TensorMeta(msgspec.Struct, array_like=True, frozen=True):
    dtype: str  # numpy-style name; "bfloat16" travels as raw 2-byte words
    shape: tuple[int, ...]


class Params(msgspec.Struct, array_like=True, frozen=True):
    """Sampling parameters (the engine's `SamplingParams`, as data)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None


# -- membership --------------------------------------------------------------------------------


class Hello(msgspec.Struct, tag="hello", array_like=True, frozen=True):
    protocol_version: int
    worker_id: str
    role: Role
    host: str
    kv_address: str  # where this worker receives KV ("" for prefill-only workers)
    model: str
    num_kv_blocks: NonNegative
    block_size: BlockSize
    max_model_len: ContextLength
    device: str
    pid: int
    kv_transports: tuple[str, ...] = ("tcp",)  # what its receiver accepts, best first
    started_at: float = 0.0  # wall clock: the process started (scale-out latency breakdown)
    engine_loaded_at: float = 0.0  # wall clock: its weights are loaded
    engine_load_s: float = 0.0  # how long loading them took


class Welcome(msgspec.Struct, tag="welcome", array_like=True, frozen=True):
    """The router's answer to Hello: accepted, or why not."""

    ok: bool
    reason: str = ""


class Rejoin(msgspec.Struct, tag="rejoin", array_like=True, frozen=True):
    """Router -> a worker it had dropped (missed heartbeats) and now hears from again: the
    router has already re-dispatched or failed that worker's requests, so it drops them all and
    says Hello again."""

    reason: str = ""


class GpuStats(msgspec.Struct, array_like=True, frozen=True):
    """One GPU's state from NVML (tideserve.gpu_metrics), as a worker reports it."""

    utilization_pct: float  # share of the last sample period a kernel ran, 0-100
    memory_used_bytes: int
    memory_total_bytes: int
    power_w: float = -1.0  # -1: NVML does not report it for this GPU
    temperature_c: float = -1.0


class Heartbeat(msgspec.Struct, tag="heartbeat", array_like=True, frozen=True):
    worker_id: str
    state: WorkerState
    num_waiting: int
    num_running: int
    queued_prefill_tokens: int
    kv_blocks_used: int
    kv_blocks_total: int
    num_inflight_kv: int = 0  # transfers under way into or out of this worker
    max_num_seqs: int = 0  # its batch cap now (the autoscaler's local backpressure moves it)
    phase: str = ""  # partial mode: "prefill" or "decode", the phase of its last step
    min_slack_s: float = -1.0  # partial mode: the smallest slack of its running requests
    prefill_s_per_token: float = 0.0  # partial mode: measured prefill speed
    decode_step_s: float = 0.0  # partial mode: measured decode step
    gpu: GpuStats | None = None  # None: no GPU, or no NVML on the worker
    layers: list[tuple[int, int]] = []  # its layer ranges [start, end); [] = the whole model
    replicas: list[LayerReplica] = []  # ranges replicated for it, and where


class LayerReplica(msgspec.Struct, array_like=True, frozen=True):
    """A replica of layers [start, end) computing `share` of a worker's batch on `host_id`."""

    start: int
    end: int
    host_id: str  # the worker holding the replica's weights (itself, in one process)
    share: float
    num_seqs: int = 0  # sequences it computes now
    # on the host's heartbeat: the worker whose layers these are ("" = the reporter's own)
    head_id: str = ""
    kv_bytes: int = 0  # the replica's KV cache (its layers x the head's pool), on the host


class ModuleCommand(msgspec.Struct, tag="module_command", array_like=True, frozen=True):
    """Router -> an elastic worker (`--layer-stages`): change its layers between two steps.
    replicate: a replica of the stage [start, end) takes `share` of its sequences; unreplicate:
    the replica hands them back; migrate: layers [start, end) at a stage's edge move to the
    neighbouring stage. The next Heartbeat's `layers`/`replicas` show the outcome.
    `target`: replicate onto that worker (a `HostReplica` handshake through the router) instead
    of in this process; "" = here. unreplicate finds the replica wherever it is. migrate with a
    `target`: the whole stage [start, end) moves to that worker (a share-1.0 replica there, then
    this worker frees its weights); an unreplicate of the range moves it back.
    drop (KunServe, across two workers): keep only the stage [start, end) and run the other
    stage as a replica (share 1.0) hosted by `target` on its own copy of those layers; the freed
    weight bytes join the KV pool. restore: reload the dropped stage, take its KV back, close
    the link to `target`. The router sends both workers of the pair their command."""

    action: Literal["replicate", "unreplicate", "migrate", "drop", "restore"]
    start: int
    end: int
    share: float = 0.5
    target: str = ""


class HostReplica(msgspec.Struct, tag="host_replica", array_like=True, frozen=True):
    """Hot worker -> router -> `host_id`: host a replica of the hot worker's layers [start, end)
    (load only those, a KV cache of `num_kv_blocks`) and connect it to the hot worker's
    `ReplicaLink` (`head_address`: control inbox, `head_kv_address`: KV receiver, over
    `transport`). The replica says StageHello there; a StageClose from the hot worker (or its
    silence) ends it."""

    worker_id: str  # the hot worker (the sender; the router checks it)
    host_id: str
    start: int
    end: int
    share: float
    num_kv_blocks: int
    head_address: str
    head_kv_address: str
    transport: str = "tcp"
    # drop: compute with the host's own weights of [start, end) (one of its stages): no load
    reuse: bool = False


class SetLimits(msgspec.Struct, tag="set_limits", array_like=True, frozen=True):
    """Router -> worker: cap the running batch (Chiron's local backpressure)."""

    max_num_seqs: int


class SwitchRole(msgspec.Struct, tag="switch_role", array_like=True, frozen=True):
    """Router -> a drained worker: take another role with the weights it has, then say Hello
    again under it."""

    role: Role


class Goodbye(msgspec.Struct, tag="goodbye", array_like=True, frozen=True):
    worker_id: str
    reason: str = ""


# -- the request path --------------------------------------------------------------------------


class PrefillRequest(msgspec.Struct, tag="prefill", array_like=True, frozen=True):
    """Router -> prefill worker: prefill, send the first token back, stream KV to `decode_*`."""

    request_id: str
    prompt_token_ids: list[int]
    params: Params
    priority: int
    decode_worker_id: str
    decode_kv_address: str
    kv_transport: str  # "tcp", "shm", "gloo" or "nccl"


class GenerateRequest(msgspec.Struct, tag="generate", array_like=True, frozen=True):
    """Router -> colocated worker: the whole request in one place (NoDG)."""

    request_id: str
    prompt_token_ids: list[int]
    params: Params
    priority: int


class AbortRequest(msgspec.Struct, tag="abort", array_like=True, frozen=True):
    request_id: str


class TokenChunk(msgspec.Struct, tag="tokens", array_like=True, frozen=True):
    """Worker -> router: new tokens of one request (and its end, when `finish_reason` is set)."""

    request_id: str
    worker_id: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length", "abort"
    num_prompt_tokens: int = 0
    logprobs: list[dict[int, float]] | None = None
    is_first: bool = False  # the prefill worker's first token; decode follows elsewhere


class TokenBatch(msgspec.Struct, tag="token_batch", array_like=True, frozen=True):
    """Worker -> router: the TokenChunks of one engine step, in one message. At batch 32 that
    is one decode and one wake-up for the router instead of 32 (each chunk keeps its own
    request id; `worker_id` must match every chunk's)."""

    worker_id: str
    chunks: list[TokenChunk]


class RequestFailed(msgspec.Struct, tag="failed", array_like=True, frozen=True):
    request_id: str
    worker_id: str
    message: str
    retryable: bool = False  # e.g. the decode worker had no room: the router may re-dispatch


# -- live migration (decode worker -> decode worker) -------------------------------------------


class MigrateRequest(msgspec.Struct, tag="migrate", array_like=True, frozen=True):
    """Router -> the worker running a request: move it, KV and all, to `dest_worker_id`."""

    request_id: str
    dest_worker_id: str
    dest_kv_address: str
    kv_transport: str


class CancelMigration(msgspec.Struct, tag="cancel_migration", array_like=True, frozen=True):
    """Router -> source: stop moving the request (its destination is gone), keep serving it;
    router -> destination: drop the stages that arrived (the migration failed)."""

    request_id: str


class MigrationDone(msgspec.Struct, tag="migration_done", array_like=True, frozen=True):
    """Source -> router: the destination has the request and decodes it from now on. Sent
    after the source's last TokenChunk for it, on the same socket."""

    request_id: str
    worker_id: str
    dest_worker_id: str
    num_stages: int
    pause_s: float  # the request stood still this long (last stage copy + commit)


class MigrationFailed(msgspec.Struct, tag="migration_failed", array_like=True, frozen=True):
    """Source -> router: the migration was cancelled; the source still runs the request
    (unless it finished meanwhile)."""

    request_id: str
    worker_id: str
    reason: str


# -- KV transfer -------------------------------------------------------------------------------


class KVBegin(msgspec.Struct, tag="kv_begin", array_like=True, frozen=True):
    """Prefill -> decode: a request's KV follows, layer by layer."""

    request_id: str
    src_worker_id: str
    reply_address: str  # where the receiver sends KVAck
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    num_kv_tokens: int
    params: Params
    priority: int
    num_layers: int
    layer: TensorMeta  # shape and dtype of every layer's tensor
    migration_of: str = ""  # a live migration's stage: the request it moves ("" = prefill)
    token_offset: int = 0  # the stage's first KV position (its tensors cover layer.shape[2])
    final: bool = True  # the last stage: commit on KVDone (the source has paused it)


class KVLayer(msgspec.Struct, tag="kv_layer", array_like=True, frozen=True):
    """One layer's KV. With tcp the tensor is the next frame; with shm it sits in `shm_name`."""

    request_id: str
    layer: int
    tensor: TensorMeta
    shm_name: str = ""
    shm_offset: int = 0


class KVDone(msgspec.Struct, tag="kv_done", array_like=True, frozen=True):
    request_id: str
    output_token_ids: list[int] = []  # tokens sampled by the sender (a prefill's first token)


class KVAbort(msgspec.Struct, tag="kv_abort", array_like=True, frozen=True):
    request_id: str
    reason: str = ""


class KVAck(msgspec.Struct, tag="kv_ack", array_like=True, frozen=True):
    """Decode -> prefill: the KV arrived (ok) or was refused/aborted; the sender frees it."""

    request_id: str
    ok: bool
    reason: str = ""


class KVPairOffer(msgspec.Struct, tag="kv_pair_offer", array_like=True, frozen=True):
    """Sender -> receiver, before its first transfer there over gloo/nccl: join a 2-rank
    process group (the sender is rank 0) whose TCPStore listens at store_host:store_port."""

    pair_id: str
    backend: str  # "gloo" or "nccl"
    store_host: str
    store_port: int
    reply_address: str  # the sender's KV reply socket (KVPairClose goes there)


class KVPairClose(msgspec.Struct, tag="kv_pair_close", array_like=True, frozen=True):
    """Either end of a gloo/nccl pair -> the other: the pair is gone (closing, or it failed)."""

    pair_id: str
    reason: str = ""


class KVDistLayer(msgspec.Struct, tag="kv_dist_layer", array_like=True, frozen=True):
    """One layer's KV travelling over the pair's process group: post a recv with `tag`."""

    request_id: str
    layer: int
    tensor: TensorMeta
    pair_id: str
    tag: int


# -- layer-sharded pipelines (tideserve/roles/stage.py) --------------------------------------


class StageHello(msgspec.Struct, tag="stage_hello", array_like=True, frozen=True):
    """A stage worker -> the pipeline's head, once it has loaded its layers."""

    protocol_version: int
    worker_id: str
    start: int  # its layer range [start, end)
    end: int
    num_kv_blocks: int  # its budget for its layers: the head's pool takes the smallest
    kv_address: str  # where its receiver takes the hidden states
    control_address: str  # where it takes StageStep, StageRelease, StageClose


class StageItem(msgspec.Struct, array_like=True, frozen=True):
    """One scheduled sequence of a micro-batch (the engine's `ScheduledSeq`, as data)."""

    request_id: str
    start: int  # first position computed
    num_tokens: int
    sample: bool
    block_table: list[int]  # the head's pool: every stage's cache uses the same blocks
    params: Params


class StageStep(msgspec.Struct, tag="stage_step", array_like=True, frozen=True):
    """Head -> stage: run this micro-batch from the hidden states that travel as the one-layer
    kv_transfer `transfer_id`, in decode-then-prefill order as the items are listed."""

    transfer_id: str
    items: list[StageItem]
    num_decodes: int = -1  # the first n items are decodes (-1: guess from num_tokens, sample)


class StageResult(msgspec.Struct, tag="stage_result", array_like=True, frozen=True):
    """Last stage -> head: the tokens sampled for a micro-batch's sampling items, in order. A
    replica stage sends no tokens: its output (hidden states, or logits) travels back as the
    kv_transfer `transfer_id`."""

    transfer_id: str
    token_ids: list[int]
    logprobs: list[dict[int, float] | None] = []
    error: str = ""  # the stage could not run it (the head fails the step)


class StageRelease(msgspec.Struct, tag="stage_release", array_like=True, frozen=True):
    """Head -> stage: these requests are gone; drop their sampler state."""

    request_ids: list[str]


class StageClose(msgspec.Struct, tag="stage_close", array_like=True, frozen=True):
    reason: str = ""


class StageKV(msgspec.Struct, tag="stage_kv", array_like=True, frozen=True):
    """Head -> a replica stage (tideserve/roles/replica.py): one sequence's KV of the replica's
    layers. `into`: it travels as the kv_transfer `transfer_id`, import it into `block_table`;
    else send it back to the head as that transfer (and forget the sequence)."""

    transfer_id: str
    request_id: str
    block_table: list[int]
    num_tokens: int  # positions 0..num_tokens-1
    into: bool


Message = (
    Hello
    | Welcome
    | Rejoin
    | SetLimits
    | SwitchRole
    | ModuleCommand
    | HostReplica
    | MigrateRequest
    | CancelMigration
    | MigrationDone
    | MigrationFailed
    | Heartbeat
    | Goodbye
    | PrefillRequest
    | GenerateRequest
    | AbortRequest
    | TokenChunk
    | TokenBatch
    | RequestFailed
    | KVBegin
    | KVLayer
    | KVDone
    | KVAbort
    | KVAck
    | KVPairOffer
    | KVPairClose
    | KVDistLayer
    | StageHello
    | StageStep
    | StageResult
    | StageRelease
    | StageClose
    | StageKV
)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(msg: Message, *tensors: np.ndarray) -> list:
    """Frames for `msg`: its msgpack header, then each tensor's raw buffer (no copy)."""
    if len(tensors) + 1 > MAX_FRAMES:
        raise ProtocolError(f"too many tensor frames: {len(tensors)}")
    return [
        _encoder.encode(msg),
        *(memoryview(np.ascontiguousarray(t).reshape(-1)).cast("B") for t in tensors),
    ]


def decode(frames: list) -> tuple[Message, list[memoryview]]:
    """(message, raw tensor frames); raises ProtocolError for anything malformed."""
    if not frames or len(frames) > MAX_FRAMES:
        raise ProtocolError(f"bad frame count {len(frames)}")
    header = _buffer(frames[0])
    if len(header) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(header)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        msg = _decoder.decode(header)
    except (msgspec.DecodeError, UnicodeDecodeError) as e:  # NOTE: a str field that is not
        raise ProtocolError(f"malformed message: {e}") from None  # UTF-8 is not a DecodeError
    if isinstance(msg, Hello) and msg.protocol_version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {msg.protocol_version} from {msg.worker_id!r}; this side speaks "
            f"{PROTOCOL_VERSION}: run the same tideserve version everywhere"
        )
    raws = [_buffer(f) for f in frames[1:]]
    for r in raws:
        if len(r) > MAX_TENSOR_BYTES:
            raise ProtocolError(f"tensor frame of {len(r)} bytes exceeds {MAX_TENSOR_BYTES}")
    return msg, raws


def _buffer(frame) -> memoryview:
    if hasattr(frame, "buffer"):  # zmq.Frame
        return frame.buffer
    return memoryview(frame)


# -- tensors -----------------------------------------------------------------------------------

# NOTE: a fixed table, not np.dtype(name): numpy parses names like "i4,i4" or "object"
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "uint8": 1}
MAX_TENSOR_DIMS = 8


def meta_nbytes(meta: TensorMeta) -> int:
    """The tensor's size in bytes, exact (numpy's int64 product wraps around on a hostile
    shape); ProtocolError for a dtype this protocol does not carry or a shape that is not one."""
    itemsize = _ITEMSIZE.get(meta.dtype)
    if itemsize is None:
        raise ProtocolError(f"unknown dtype {meta.dtype!r}")
    if len(meta.shape) > MAX_TENSOR_DIMS or any(d < 0 for d in meta.shape):
        raise ProtocolError(f"bad tensor shape {meta.shape}")
    return math.prod(meta.shape) * itemsize


def check_tensor(meta: TensorMeta, raw: memoryview) -> None:
    expected = meta_nbytes(meta)
    if len(raw) != expected:
        raise ProtocolError(f"tensor frame has {len(raw)} bytes, {meta} needs {expected}")
