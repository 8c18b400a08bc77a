"""A two-process layer split: the head runs layers [0, L/2) and the scheduler, a stage worker
runs [L/2, L) and samples; hidden states cross over kv_transfer (tcp frames, shm segments) in
micro-batches. Greedy output must equal the unsplit engine's, with nothing leaked."""

from __future__ import annotations

import multiprocessing as mp
import random
import time

import pytest

from tests.factories import make_tiny_model
from tests.factories import run_engine as run
from tideserve.config import EngineConfig
from tideserve.engine.engine import LLMEngine
from tideserve.engine.sequence import SamplingParams
from tideserve.roles.stage import PipelineHead, serve_stage

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def four_layer_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny4p"), num_hidden_layers=4, seed=2)


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_two_process_split_gives_the_unsplit_greedy_tokens(four_layer_dir, transport):
    rng = random.Random(11)
    prompts = [[rng.randrange(3, 512) for _ in range(rng.randint(1, 80))] for _ in range(16)]
    cfg = EngineConfig(
        model=str(four_layer_dir), kv_cache_bytes=1 << 22, max_num_batched_tokens=64,
        num_threads=1,
    )  # fmt: skip
    ref = LLMEngine.from_config(cfg)
    for i, p in enumerate(prompts):
        ref.add_request(f"r{i}", p, SamplingParams(max_tokens=10, **GREEDY))
    expected = run(ref)

    head = PipelineHead(cfg, transport)
    worker = mp.get_context("spawn").Process(
        target=serve_stage, args=(cfg, 2, head.address, transport), daemon=True
    )
    worker.start()
    try:
        engine = head.connect(timeout_s=60.0, num_micro_batches=2)
        assert engine.runner.local.layers.end == 2
        for i, p in enumerate(prompts):  # 16 concurrent requests, chunked prefill
            engine.add_request(f"r{i}", p, SamplingParams(max_tokens=10, **GREEDY))
        got = run(engine)
        assert got == expected
        assert engine.num_free_blocks == engine.num_total_blocks  # no leaked KV block
        assert not engine.seqs and not engine.has_unfinished()
        assert engine.runner.remote.num_sent > 1 and not engine.runner.remote.results
        sender, deadline = engine.runner.remote.sender, time.monotonic() + 10
        while sender.num_inflight and time.monotonic() < deadline:  # the last acks
            sender.poll_acks()
            time.sleep(0.01)
        assert sender.num_inflight == 0  # every hidden-state transfer settled
    finally:
        head.close()
        worker.join(timeout=20)
        if worker.is_alive():
            worker.kill()
    assert worker.exitcode == 0
