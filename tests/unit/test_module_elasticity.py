"""Module-level elasticity mid-stream, in one process: replication on and off, migration of a
layer range, dropping then restoring parameters. Each keeps the unsplit engine's greedy tokens
under 16 concurrent requests, loses no request and leaks no block."""

from __future__ import annotations

import random

import pytest

from tests.factories import make_tiny_model
from tideserve.config import EngineConfig
from tideserve.engine.elastic import build_elastic_engine, drop_layers, restore_layers
from tideserve.engine.engine import LLMEngine
from tideserve.engine.sequence import SamplingParams

GREEDY = SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True)
NUM_REQUESTS = 16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny4e"), num_hidden_layers=4, seed=2)


@pytest.fixture(scope="module")
def expected(model_dir):
    engine = LLMEngine.from_config(config(model_dir))
    add(engine, range(NUM_REQUESTS))
    return drain([engine], {})


def config(path, **kw) -> EngineConfig:
    kw.setdefault("kv_cache_bytes", 1 << 22)
    kw.setdefault("max_num_batched_tokens", 64)  # chunked prefill mixes chunks with decodes
    return EngineConfig(model=str(path), **kw)


def prompt(i: int) -> list[int]:
    rng = random.Random(i)
    return [rng.randrange(3, 512) for _ in range(rng.randint(2, 60))]


def add(engine: LLMEngine, ids) -> None:
    for i in ids:
        engine.add_request(f"r{i}", prompt(i), GREEDY)


def steps(engines, done: dict, n: int) -> dict:
    for _ in range(n):
        for e in engines:
            for out in e.step():
                if out.finished:
                    done[out.request_id] = list(out.token_ids)
    return done


def drain(engines, done: dict) -> dict:
    for _ in range(2000):
        if not any(e.has_unfinished() for e in engines):
            break
        steps(engines, done, 1)
    for e in engines:
        assert e.num_free_blocks == e.num_total_blocks  # nothing leaked
        assert not e.seqs
    assert sorted(done) == sorted(f"r{i}" for i in range(NUM_REQUESTS))  # nothing lost
    return done


@pytest.mark.parametrize("parallel", [False, True])
def test_replication_on_and_off_mid_stream(model_dir, expected, parallel):
    engine = build_elastic_engine(config(model_dir), [(0, 2), (2, 4)], parallel=parallel)
    add(engine, range(10))
    done = steps([engine], {}, 4)
    rep = engine.runner.replicate(1, list(engine.seqs.values()), share=0.5)
    assert rep.offloaded  # live sequences handed over with their KV of layers [2, 4)
    add(engine, range(10, NUM_REQUESTS))  # new ones are dealt out by share
    steps([engine], done, 8)
    assert rep.num_rows > 0
    engine.runner.unreplicate(1)
    assert drain([engine], done) == expected


def test_replicating_the_first_stage_also_keeps_the_tokens(model_dir, expected):
    engine = build_elastic_engine(config(model_dir), [(0, 1), (1, 4)])
    add(engine, range(NUM_REQUESTS))
    done = steps([engine], {}, 2)
    engine.runner.replicate(0, list(engine.seqs.values()), share=0.3)
    steps([engine], done, 10)
    engine.runner.unreplicate(0)
    assert drain([engine], done) == expected


def test_migration_of_a_layer_range_mid_stream(model_dir, expected):
    engine = build_elastic_engine(config(model_dir), [(0, 3), (3, 4)])
    add(engine, range(NUM_REQUESTS))
    done = steps([engine], {}, 4)
    live = lambda: list(engine.seqs.values())
    assert engine.runner.migrate(0, 1, 1, 3, live()) > 0  # [1, 3) moves forward
    assert [(s.layers.start, s.layers.end) for s in engine.runner.stages] == [(0, 1), (1, 4)]
    assert [s.kv.num_layers for s in engine.runner.stages] == [1, 3]
    steps([engine], done, 5)
    engine.runner.migrate(1, 0, 1, 2, live())  # and [1, 2) back
    assert [(s.layers.start, s.layers.end) for s in engine.runner.stages] == [(0, 2), (2, 4)]
    assert drain([engine], done) == expected


def test_migration_checks_the_range_is_at_the_edge(model_dir):
    engine = build_elastic_engine(config(model_dir), [(0, 3), (3, 4)])
    with pytest.raises(ValueError, match="not at the edge"):
        engine.runner.migrate(0, 1, 0, 2, [])


def test_drop_then_restore_mid_stream(model_dir, expected):
    budget = 1 << 22
    a = build_elastic_engine(config(model_dir, kv_cache_bytes=budget))
    b = build_elastic_engine(config(model_dir, kv_cache_bytes=budget))
    add(a, range(0, 8))
    add(b, range(8, 12))
    done = steps([a, b], {}, 4)
    merged, record = drop_layers(a, b, budget)
    for e in (a, b):  # the old pools are empty: every block moved over
        assert e.num_free_blocks == e.num_total_blocks and not e.seqs
    assert merged.num_total_blocks > 2 * a.num_total_blocks  # half the layers + freed weights
    assert [s.kv.num_layers for s in merged.runner.stages] == [2, 2]
    assert record.moved_bytes > 0 and record.freed_weight_bytes > 0
    add(merged, range(12, NUM_REQUESTS))  # admitted while dropped
    steps([merged], done, 6)
    a2, b2, moved_back = restore_layers(merged, record)
    assert merged.num_free_blocks == merged.num_total_blocks
    assert a2.num_total_blocks == a.num_total_blocks
    assert moved_back > 0
    assert drain([a2, b2], done) == expected
