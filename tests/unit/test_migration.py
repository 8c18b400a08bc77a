"""Live migration between two real decode workers (tiny engines, in-process, their loops
driven by hand) over tcp and shm: the migrated request's tokens, joined across the move (once,
and there and back), equal an unmigrated run token for token; and every abort case leaves
both sides without leaked blocks: the destination full, the request finishing during the
copy, the destination dying, the source dying."""

from __future__ import annotations

import itertools

import pytest
import zmq

from kv_transfer import make_receiver, make_sender
from tests.factories import run_engine
from tests.unit.test_kv_faults import FakeLink
from tideserve.config import EngineConfig
from tideserve.engine.engine import LLMEngine
from tideserve.engine.sequence import SamplingParams
from tideserve.protocol import (
    CancelMigration,
    GenerateRequest,
    MigrateRequest,
    MigrationDone,
    MigrationFailed,
    Params,
    TokenBatch,
    TokenChunk,
)
from tideserve.roles.decode import DecodeWorker
from tideserve.worker import WorkerConfig

PROMPT = [(11 * i) % 400 + 7 for i in range(37)]
MAX_TOKENS = 120
KV_TIMEOUT_S = 0.5
_ids = itertools.count()


@pytest.fixture
def ctx():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    e = LLMEngine.from_config(EngineConfig(model=str(tiny_model_dir), kv_cache_bytes=1 << 22))
    e.add_request("ref", PROMPT, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0,
                                                 ignore_eos=True))  # fmt: skip
    return run_engine(e)["ref"]


def _worker(ctx, model_dir, transport: str, kv_bytes: int = 1 << 22) -> DecodeWorker:
    cfg = WorkerConfig(
        role="colocated",
        worker_id=f"w{next(_ids)}",
        kv_timeout_s=KV_TIMEOUT_S,
        kv_transports=(transport,),
        engine=EngineConfig(model=str(model_dir), kv_cache_bytes=kv_bytes),
    )
    receiver = make_receiver(transport, ctx, timeout_s=KV_TIMEOUT_S)
    senders = {}

    def make():
        if not senders:
            senders[transport] = make_sender(
                transport, ctx, timeout_s=KV_TIMEOUT_S, shm_prefix=f"tsmig{id(cfg)}_"
            )
        return senders

    w = DecodeWorker(cfg, LLMEngine.from_config(cfg.engine), FakeLink(ctx), receiver, make)
    w.closers = [receiver.close, lambda: [s.close() for s in senders.values()]]
    return w


def _close(*ws) -> None:
    for w in ws:
        for c in w.closers:
            c()


def _tick(*ws) -> None:
    for w in ws:
        w.poll_kv()
        w.step()


def _sent(w, kind):
    flat = [c for m in w.link.sent for c in (m.chunks if isinstance(m, TokenBatch) else [m])]
    return [m for m in flat if isinstance(m, kind)]


def _tokens(*ws) -> list[int]:
    return [t for w in ws for m in _sent(w, TokenChunk) for t in m.token_ids]


def _all_free(*ws) -> bool:
    return all(w.engine.num_free_blocks == w.engine.num_total_blocks for w in ws) and not any(
        w.engine.seqs for w in ws
    )


def _migrate(src, dst, rid: str, transport: str) -> None:
    src.migration.start(MigrateRequest(rid, dst.wid, dst.receiver.address, transport))


def _until(cond, *ws, limit: int = 5000, timeout_s: float = 10.0) -> None:
    """Ticks the workers until `cond` (at least `limit` ticks, or `timeout_s`: timeouts)."""
    import time

    deadline = time.monotonic() + timeout_s
    for i in itertools.count():
        if cond():
            return
        if i >= limit and time.monotonic() > deadline:
            break
        _tick(*ws)
    raise AssertionError("never happened")


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_migrated_once_and_back_again_equals_unmigrated(ctx, tiny_model_dir, reference, transport):
    a, b = _worker(ctx, tiny_model_dir, transport), _worker(ctx, tiny_model_dir, transport)
    params = Params(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    a.handle_generate(GenerateRequest("r", PROMPT, params, 0))
    for _ in range(10):
        _tick(a)
    _migrate(a, b, "r", transport)
    _until(lambda: _sent(a, MigrationDone), a, b)
    assert "r" not in a.engine.seqs and "r" in b.engine.seqs
    done = _sent(a, MigrationDone)[0]
    assert done.dest_worker_id == b.wid and done.num_stages >= 1 and done.pause_s >= 0
    for _ in range(20):
        _tick(b)
    n_a = len(_tokens(a))
    _migrate(b, a, "r", transport)  # and back, mid-generation again
    _until(lambda: _sent(b, MigrationDone), a, b)
    _until(lambda: not a.engine.has_unfinished(), a, b)
    tokens_a = [t for m in _sent(a, TokenChunk) for t in m.token_ids]
    joined = tokens_a[:n_a] + _tokens(b) + tokens_a[n_a:]
    assert joined == reference  # no gap, no duplicate, no reordering
    assert _all_free(a, b) and not a.migration.active and not b.migration.active
    _close(a, b)


def test_destination_without_room_changes_nothing(ctx, tiny_model_dir, reference):
    a = _worker(ctx, tiny_model_dir, "tcp")
    b = _worker(ctx, tiny_model_dir, "tcp", kv_bytes=1 << 14)  # a couple of blocks at most
    params = Params(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    a.handle_generate(GenerateRequest("r", PROMPT, params, 0))
    for _ in range(5):
        _tick(a)
    _migrate(a, b, "r", "tcp")
    _until(lambda: _sent(a, MigrationFailed), a, b)
    assert "refused" in _sent(a, MigrationFailed)[0].reason
    _until(lambda: not a.engine.has_unfinished(), a, b)
    assert _tokens(a) == reference and not _tokens(b)
    assert _all_free(a, b)
    _close(a, b)


def test_request_finishing_during_the_copy_cancels(ctx, tiny_model_dir):
    a, b = _worker(ctx, tiny_model_dir, "tcp"), _worker(ctx, tiny_model_dir, "tcp")
    a.migration.final_tokens = 0  # many stages: the request ends before the last one
    a.migration.max_stages = 1000
    params = Params(max_tokens=12, temperature=0.0, ignore_eos=True)
    a.handle_generate(GenerateRequest("r", PROMPT, params, 0))
    for _ in range(3):
        _tick(a)
    _migrate(a, b, "r", "tcp")
    _until(lambda: _sent(a, MigrationFailed), a, b)
    assert "finished" in _sent(a, MigrationFailed)[0].reason
    b.handle_cancel_migration(CancelMigration("r"))  # what the router does on MigrationFailed
    _until(lambda: not b.sink.incoming, a, b)
    assert len(_tokens(a)) == 12 and _all_free(a, b)
    _close(a, b)


def test_destination_dying_during_the_copy(ctx, tiny_model_dir, reference):
    a, b = _worker(ctx, tiny_model_dir, "tcp"), _worker(ctx, tiny_model_dir, "tcp")
    params = Params(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    a.handle_generate(GenerateRequest("r", PROMPT, params, 0))
    for _ in range(5):
        _tick(a)
    _close(b)  # gone before it reads a byte
    _migrate(a, b, "r", "tcp")
    _until(lambda: _sent(a, MigrationFailed), a)  # the stage times out; the request goes on
    _until(lambda: not a.engine.has_unfinished(), a)
    assert _tokens(a) == reference and _all_free(a)
    _close(a)


def test_source_dying_during_the_copy(ctx, tiny_model_dir):
    a, b = _worker(ctx, tiny_model_dir, "tcp"), _worker(ctx, tiny_model_dir, "tcp")
    a.migration.final_tokens = 0
    params = Params(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    a.handle_generate(GenerateRequest("r", PROMPT, params, 0))
    for _ in range(5):
        _tick(a)
    _migrate(a, b, "r", "tcp")
    _until(lambda: "r" in b.sink.incoming, b)  # stage 0 arrived; then the source dies
    _close(a)
    import time

    deadline = time.monotonic() + 5
    while b.sink.incoming and time.monotonic() < deadline:
        _tick(b)
    assert not b.sink.incoming and _all_free(b)  # the sink's timeout freed what arrived
    _close(b)
