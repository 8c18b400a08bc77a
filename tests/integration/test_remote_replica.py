"""Replication across processes (CoCoServe): a worker's elastic pipeline hands part of its batch
for one stage's layer range to a replica process that loaded only those layers. The replica is
turned on and off mid-stream (the offloaded sequences' KV of the range crosses over kv_transfer
both ways); greedy output must equal the unsplit engine's, with nothing lost or leaked and the
replica process exiting cleanly."""

from __future__ import annotations

import random

import pytest

from tests.factories import make_tiny_model
from tideserve.config import EngineConfig
from tideserve.engine.elastic import build_elastic_engine
from tideserve.engine.engine import LLMEngine
from tideserve.engine.sequence import SamplingParams
from tideserve.roles.modules import ModuleController
from tideserve.roles.replica import ReplicaLink, spawn_replica

GREEDY = SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True)
NUM_REQUESTS = 16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny4r"), num_hidden_layers=4, seed=2)


def config(path) -> EngineConfig:
    # chunked prefill mixes chunks with decodes; one thread per process
    return EngineConfig(
        model=str(path), kv_cache_bytes=1 << 22, max_num_batched_tokens=64, num_threads=1
    )


def prompt(i: int) -> list[int]:
    rng = random.Random(i)
    return [rng.randrange(1, 512) for _ in range(rng.randint(1, 60))]


def add(engine, ids) -> None:
    for i in ids:
        engine.add_request(f"r{i}", prompt(i), GREEDY)


def steps(engine, done: dict, n: int) -> dict:
    for _ in range(n):
        if not engine.has_unfinished():
            break
        for out in engine.step():
            if out.finished:
                done[out.request_id] = list(out.token_ids)
    return done


@pytest.fixture(scope="module")
def expected(model_dir):
    engine = LLMEngine.from_config(config(model_dir))
    add(engine, range(NUM_REQUESTS))
    return steps(engine, {}, 2000)


@pytest.mark.parametrize(
    "ranges, index, transport",
    [([(0, 2), (2, 4)], 1, "tcp"), ([(0, 1), (1, 3), (3, 4)], 1, "shm")],
    ids=["last-stage-tcp", "middle-stage-shm"],
)
def test_replication_on_and_off_in_another_process(model_dir, expected, ranges, index, transport):
    engine = build_elastic_engine(config(model_dir), ranges)
    runner = engine.runner
    start, end = ranges[index]
    link = ReplicaLink(transport, head_id="hot", timeout_s=30.0)
    num_blocks = runner.stages[index].kv.num_blocks
    remote, proc = spawn_replica(link, config(model_dir), start, end, num_blocks, transport)
    try:
        assert (remote.layers.start, remote.layers.end) == (start, end)
        add(engine, range(10))
        done = steps(engine, {}, 4)  # mid-stream: prefills and decodes in flight
        rep = runner.replicate(index, list(engine.seqs.values()), share=0.5, remote=remote)
        assert rep.offloaded and remote.moved_bytes > 0  # live KV of [start, end) went over
        (shown,) = ModuleController(engine, "hot").report()["replicas"]
        assert shown.host_id == "replica-1" and (shown.start, shown.end) == (start, end)
        add(engine, range(10, NUM_REQUESTS))  # new ones are dealt out by share
        steps(engine, done, 8)
        assert rep.num_rows > 0 and remote.num_steps > 0
        sent = remote.moved_bytes
        runner.unreplicate(index)  # mid-stream again: the replica's KV comes back
        assert remote.moved_bytes > sent
        steps(engine, done, 2000)
        assert done == expected  # token for token
        assert engine.num_free_blocks == engine.num_total_blocks  # no leaked block
        assert not engine.seqs and not engine.has_unfinished()
        remote.close()  # settles every transfer the head sent
        assert link.sender.num_inflight == 0
    finally:
        proc.join(timeout=20)
        if proc.is_alive():
            proc.kill()
        link.close()
    assert proc.exitcode == 0  # exited by itself, holding no sequence
