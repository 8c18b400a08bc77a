"""KV transfer faults at the worker level: real prefill and decode workers (tiny engines,
in-process, their loops driven by hand) over the tcp transport. When the sender dies
mid-transfer, the decode worker's timeout frees the blocks it reserved; when the receiver is
gone, the prefill worker's timeout frees what it holds and tells the router the request may
be retried; a router abort frees a half-received request at once."""

from __future__ import annotations

import time

import pytest
import zmq

from kv_transfer import make_receiver, make_sender
from tideserve.config import EngineConfig
from tideserve.engine.engine import LLMEngine
from tideserve.protocol import (
    AbortRequest,
    KVBegin,
    Params,
    PrefillRequest,
    RequestFailed,
    TokenChunk,
)
from tideserve.roles.decode import DecodeWorker
from tideserve.roles.prefill import PrefillWorker
from tideserve.tensor_frames import meta_of
from tideserve.worker import WorkerConfig

KV_TIMEOUT_S = 0.5
PROMPT = [(13 * i) % 400 + 5 for i in range(40)]
PARAMS = Params(max_tokens=8, temperature=0.0)


class FakeLink:
    """Stands in for the worker's link to the router: records what the worker sends."""

    def __init__(self, ctx: zmq.Context) -> None:
        self.sock = ctx.socket(zmq.PAIR)  # registered in the loop's poller, never used
        self.sent: list = []

    def send(self, msg) -> None:
        self.sent.append(msg)

    def recv_all(self) -> list:
        return []


@pytest.fixture
def ctx():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def _cfg(role: str, model_dir) -> WorkerConfig:
    engine = EngineConfig(model=str(model_dir), kv_cache_bytes=1 << 22)
    return WorkerConfig(role=role, kv_timeout_s=KV_TIMEOUT_S, engine=engine)


def _decode_worker(ctx, model_dir) -> DecodeWorker:
    cfg = _cfg("decode", model_dir)
    receiver = make_receiver("tcp", ctx, timeout_s=KV_TIMEOUT_S)
    return DecodeWorker(cfg, LLMEngine.from_config(cfg.engine), FakeLink(ctx), receiver)


def _prefill_worker(ctx, model_dir) -> PrefillWorker:
    cfg = _cfg("prefill", model_dir)
    senders = {"tcp": make_sender("tcp", ctx, timeout_s=KV_TIMEOUT_S)}
    return PrefillWorker(cfg, LLMEngine.from_config(cfg.engine), FakeLink(ctx), senders)


def _until(cond, poll, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        poll()
        if cond():
            return
        time.sleep(0.01)
    raise TimeoutError("condition never held")


def _all_free(engine: LLMEngine) -> bool:
    return engine.num_free_blocks == engine.num_total_blocks and not engine.seqs


def _half_transfer(ctx, dw: DecodeWorker, rid: str):
    """A sender that begins a transfer, sends one layer of two, and is then abandoned."""
    import torch

    sender = make_sender("tcp", ctx, timeout_s=60)
    n_layers = dw.engine.model_config.num_layers
    cfg = dw.engine.model_config
    kv = torch.randn(2, cfg.num_kv_heads, len(PROMPT), cfg.head_dim, dtype=torch.float32)
    begin = KVBegin(
        rid, "p0", sender.reply_address, PROMPT, [], len(PROMPT), PARAMS, 0, n_layers, meta_of(kv)
    )
    sender.begin(dw.receiver.address, begin)
    sender.send_layer(rid, 0, kv)
    _until(lambda: rid in dw.importing, dw.poll_kv)
    assert dw.engine.num_free_blocks < dw.engine.num_total_blocks  # blocks are reserved
    return sender


def test_sender_dies_mid_transfer_the_receiver_times_out_and_frees(ctx, tiny_model_dir):
    dw = _decode_worker(ctx, tiny_model_dir)
    sender = _half_transfer(ctx, dw, "r-orphan")
    sender.close()  # the prefill worker dies: nothing more will come
    _until(lambda: not dw.importing, dw.poll_kv)
    assert _all_free(dw.engine)
    dw.receiver.close()


def test_a_router_abort_frees_a_half_received_request_at_once(ctx, tiny_model_dir):
    dw = _decode_worker(ctx, tiny_model_dir)
    sender = _half_transfer(ctx, dw, "r-cut")
    dw.handle_abort(AbortRequest("r-cut"))  # the router saw the prefill worker die
    assert _all_free(dw.engine) and not dw.importing
    sender.close()
    dw.receiver.close()


@pytest.mark.parametrize("fault", ["receiver_gone", "receiver_stalled"])
def test_receiver_fault_the_sender_times_out_frees_and_asks_for_a_retry(ctx, tiny_model_dir, fault):
    pw = _prefill_worker(ctx, tiny_model_dir)
    receiver = make_receiver("tcp", ctx, timeout_s=60)
    address = receiver.address
    if fault == "receiver_gone":
        receiver.close()  # the decode worker died; a stalled one simply never answers
    req = PrefillRequest("r1", PROMPT, PARAMS, 0, "d0", address, "tcp")
    pw.handle_prefill(req)
    while pw.step():
        pass
    first = [m for m in pw.link.sent if isinstance(m, TokenChunk)]
    assert first and first[0].is_first  # the first token went out at once
    sender = pw.senders["tcp"]

    _until(lambda: any(isinstance(m, RequestFailed) for m in pw.link.sent), pw.poll_acks)
    [failed] = [m for m in pw.link.sent if isinstance(m, RequestFailed)]
    assert failed.request_id == "r1" and failed.retryable  # the router re-dispatches it
    assert _all_free(pw.engine) and not pw.streaming
    assert sender.num_inflight == 0 and sender.inflight_bytes == 0
    sender.close()
    if fault == "receiver_stalled":
        receiver.close()
