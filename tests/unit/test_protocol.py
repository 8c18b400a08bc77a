"""Every wire message round-trips; tensors travel as raw frames; bad frames are rejected."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest
import torch

from tideserve import protocol as p
from tideserve.tensor_frames import from_frame, to_frame

PARAMS = p.Params(
    max_tokens=7,
    temperature=0.5,
    top_p=0.9,
    top_k=3,
    seed=1,
    stop_token_ids=(2,),
    ignore_eos=True,
    min_tokens=1,
    logprobs=2,
)
META = p.TensorMeta("bfloat16", (2, 3, 5, 64))
MESSAGES = [
    p.Hello(
        p.PROTOCOL_VERSION,
        "w1",
        "decode",
        "10.0.0.1",
        "tcp://10.0.0.1:5",
        "m",
        100,
        16,
        2048,
        "cuda:0",
        42,
        ("shm", "tcp"),
    ),
    p.Welcome(True),
    p.Welcome(False, "nope"),
    p.Rejoin("dropped after missed heartbeats"),
    p.SetLimits(8),
    p.SwitchRole("prefill"),
    p.MigrateRequest("r1", "d2", "tcp://h:2", "shm"),
    p.CancelMigration("r1"),
    p.MigrationDone("r1", "d1", "d2", 3, 0.004),
    p.MigrationFailed("r1", "d1", "the destination is full"),
    p.Heartbeat("w1", "ready", 1, 2, 300, 4, 100, 1),
    p.Goodbye("w1", "bye"),
    p.PrefillRequest("r1", [1, 2, 3], PARAMS, 0, "w2", "tcp://h:1", "tcp"),
    p.GenerateRequest("r1", [1, 2], PARAMS, 10),
    p.AbortRequest("r1"),
    p.TokenChunk("r1", "w1", [5, 6], "stop", 3, [{5: -0.1}, {6: -0.2, 7: -1.5}], True),
    p.TokenChunk("r1", "w1", [5]),
    p.TokenBatch("w1", [p.TokenChunk("r1", "w1", [5]), p.TokenChunk("r2", "w1", [7], "length", 4)]),
    p.RequestFailed("r1", "w1", "boom", True),
    p.KVBegin("r1", "w0", "tcp://h:2", [1, 2, 3], [], 3, PARAMS, 0, 30, META),
    p.KVLayer("r1", 4, META, "seg", 128),
    p.KVDone("r1", [9]),
    p.KVAbort("r1", "why"),
    p.KVAck("r1", False, "full"),
    p.KVPairOffer("kvp-1", "nccl", "10.0.0.2", 29500, "tcp://10.0.0.2:7"),
    p.KVPairClose("kvp-1", "the sender is closing"),
    p.KVDistLayer("r1", 4, META, "kvp-1", 12),
    p.Heartbeat(
        "w1", "ready", 1, 2, 300, 4, 100, gpu=p.GpuStats(37.0, 10 << 30, 80 << 30, 250.5, 61.0)
    ),
    p.Heartbeat(
        "w1",
        "ready",
        1,
        2,
        300,
        4,
        100,
        layers=[(0, 2), (2, 4)],
        replicas=[p.LayerReplica(2, 4, "w1", 0.5, 3)],
    ),  # fmt: skip
    p.ModuleCommand("replicate", 2, 4, 0.25),
    p.ModuleCommand("migrate", 1, 2),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(msg):
    got, raws = p.decode(p.encode(msg))
    assert got == msg and raws == []


def test_a_heartbeat_without_gpu_fields_decodes_as_no_gpu():
    old = msgspec.msgpack.encode(["heartbeat", "w1", "ready", 1, 2, 3, 4, 100])  # before GpuStats
    got, _ = p.decode([old])
    assert isinstance(got, p.Heartbeat) and got.gpu is None
    assert got.layers == [] and got.replicas == []  # before layer ranges: the whole model


def test_a_module_command_of_an_unknown_action_is_rejected():
    bad = msgspec.msgpack.encode(["module_command", "explode", 0, 2, 0.5])
    with pytest.raises(p.ProtocolError):
        p.decode([bad])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
@pytest.mark.parametrize("shape", [(2, 3, 7, 8), (0,), (2, 0, 4), ()])
def test_tensors_travel_bit_exact(dtype, shape):
    t = (torch.randn(shape) * 100).to(dtype)
    meta, arr = to_frame(t)
    msg, raws = p.decode(p.encode(p.KVLayer("r", 0, meta), arr))
    back = from_frame(msg.tensor, raws[0])
    assert back.dtype == dtype and tuple(back.shape) == tuple(shape)
    assert torch.equal(
        back.view(-1).view(torch.uint8) if back.numel() else back,
        t.view(-1).view(torch.uint8) if t.numel() else t,
    )


def test_non_contiguous_tensor_is_sent_contiguous():
    t = torch.randn(4, 6, dtype=torch.bfloat16).t()  # [6, 4], not contiguous
    meta, arr = to_frame(t)
    msg, raws = p.decode(p.encode(p.KVLayer("r", 0, meta), arr))
    assert torch.equal(from_frame(msg.tensor, raws[0]), t)


def test_malformed_oversized_and_foreign_version_are_rejected():
    with pytest.raises(p.ProtocolError):
        p.decode([b"\xc1garbage"])
    with pytest.raises(p.ProtocolError):
        p.decode([msgspec.msgpack.encode(["nosuchtag", 1])])
    with pytest.raises(p.ProtocolError):
        p.decode([b"x" * (p.MAX_HEADER_BYTES + 1)])
    with pytest.raises(p.ProtocolError):
        p.decode([])
    old = msgspec.structs.replace(MESSAGES[0], protocol_version=p.PROTOCOL_VERSION + 1)
    with pytest.raises(p.ProtocolError, match="protocol version"):
        p.decode(p.encode(old))
    meta, arr = to_frame(torch.zeros(4))
    msg, raws = p.decode(p.encode(p.KVLayer("r", 0, p.TensorMeta("float32", (5,))), arr))
    with pytest.raises(p.ProtocolError, match="bytes"):
        from_frame(msg.tensor, raws[0])


def test_wrong_field_types_are_rejected():
    bad = msgspec.msgpack.encode(["abort", 123])  # request_id must be a string
    with pytest.raises(p.ProtocolError):
        p.decode([bad])


def test_zero_copy_frames():
    arr = np.arange(1024, dtype=np.float32)
    frames = p.encode(p.AbortRequest("r"), arr)
    assert isinstance(frames[1], memoryview) and frames[1].obj is not None
