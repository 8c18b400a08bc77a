"""Layer-sharded execution in one process: stages own a layer range (only its weights, only its
KV), and a split model gives the unsplit engine's greedy tokens."""

from __future__ import annotations

import random

import pytest
import torch

from tests.factories import make_tiny_model
from tests.factories import run_engine as run
from tideserve.config import EngineConfig
from tideserve.engine.engine import LLMEngine
from tideserve.engine.model_config import ModelConfig
from tideserve.engine.sequence import SamplingParams
from tideserve.engine.stages import (
    LayerRange,
    build_pipeline_engine,
    load_stage,
    stage_kv_blocks,
)

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def four_layer_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny4"), num_hidden_layers=4, seed=1)


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory):
    return make_tiny_model(
        tmp_path_factory.mktemp("tied"), shards=2, num_hidden_layers=3, tie_word_embeddings=True
    )


def config(path, **kw) -> EngineConfig:
    kw.setdefault("kv_cache_bytes", 1 << 22)
    return EngineConfig(model=str(path), **kw)


def prompts(n: int, seed: int = 0, lo: int = 1, hi: int = 90) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def generate(engine: LLMEngine, ps: list[list[int]], max_tokens: int = 12) -> list[list[int]]:
    for i, p in enumerate(ps):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=max_tokens, **GREEDY))
    done = run(engine)
    assert engine.num_free_blocks == engine.num_total_blocks  # nothing leaked
    assert not engine.seqs and not engine.has_unfinished()
    return [done[f"r{i}"] for i in range(len(ps))]


def test_layer_ranges_split_evenly_and_are_validated():
    assert [(r.start, r.end) for r in LayerRange.split(30, 4)] == [(0, 7), (7, 15), (15, 22),
                                                                  (22, 30)]  # fmt: skip
    first, last = LayerRange.split(2, 2)
    assert first.is_first and not first.is_last and last.is_last and last.size == 1
    with pytest.raises(ValueError, match=r"\[2, 5\) is not inside the model's 4 layers"):
        LayerRange(2, 5, 4)
    with pytest.raises(ValueError, match="cannot split 2 layers into 3"):
        LayerRange.split(2, 3)


def test_a_stage_holds_only_its_own_weights(four_layer_dir):
    cfg = ModelConfig.from_dir(four_layer_dir)
    load = lambda r: load_stage(four_layer_dir, cfg, torch.float32, torch.device("cpu"), 256, r)
    head, tail = (load(r) for r in LayerRange.split(4, 2))
    names = lambda m: {n.split(".weight")[0] for n, _ in m.state_dict().items()}
    assert "model.embed_tokens" in names(head) and "lm_head" not in str(names(head))
    assert {n.split(".")[2] for n in names(head) if n.startswith("model.layers.")} == {"0", "1"}
    assert {n.split(".")[2] for n in names(tail) if n.startswith("model.layers.")} == {"2", "3"}
    assert "model.embed_tokens" not in names(tail) and "model.norm" in names(tail)
    size = lambda m: sum(p.numel() for p in m.state_dict().values())
    assert size(head) < size(load(LayerRange(0, 4, 4)))


def test_fewer_layers_fit_more_kv_blocks(tiny_model_dir):
    cfg = ModelConfig.from_dir(tiny_model_dir)
    c, cpu = config(tiny_model_dir), torch.device("cpu")
    whole = stage_kv_blocks(c, cfg, LayerRange(0, 2, 2), torch.float32, cpu)
    half = stage_kv_blocks(c, cfg, LayerRange(0, 1, 2), torch.float32, cpu)
    assert half == 2 * whole  # the freed weights' KV room: what parameter dropping borrows


def test_pipeline_keeps_each_stages_kv_for_its_layers(four_layer_dir):
    engine = build_pipeline_engine(config(four_layer_dir), num_stages=2)
    stages = engine.runner.stages
    assert [s.kv.num_layers for s in stages] == [2, 2]
    assert {s.kv.num_blocks for s in stages} == {engine.num_total_blocks}


@pytest.mark.parametrize("model", ["tiny_model_dir", "four_layer_dir", "tied_dir"])
def test_two_way_split_gives_the_unsplit_greedy_tokens(model, request):
    path = request.getfixturevalue(model)
    ps = prompts(12, seed=5)
    # chunked prefill: 40-token steps mix decodes with chunks of several prompts
    kw = dict(max_num_batched_tokens=40)
    expected = generate(LLMEngine.from_config(config(path, **kw)), ps)
    split = build_pipeline_engine(config(path, **kw), num_stages=2)
    assert generate(split, ps) == expected


def test_three_way_split_with_preemption_gives_the_same_tokens(four_layer_dir):
    ps = prompts(6, seed=3, lo=20, hi=40)
    expected = generate(LLMEngine.from_config(config(four_layer_dir)), ps, max_tokens=30)
    # 4 layers in 3 stages; a small pool forces preemption (recompute) on every stage
    small = config(four_layer_dir, kv_cache_bytes=2 * 2 * 2 * 16 * 16 * 4 * 14)  # 14 blocks
    split = build_pipeline_engine(small, num_stages=3)
    assert generate(split, ps, max_tokens=30) == expected
    assert split.scheduler.num_preemptions > 0


def test_stage_messages_round_trip():
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

    item = StageItem("r1", 5, 1, True, [3, 4], Params(max_tokens=8, temperature=0.0))
    for msg in (
        StageHello(PROTOCOL_VERSION, "s1", 2, 4, 100, "tcp://127.0.0.1:1", "tcp://127.0.0.1:2"),
        StageStep("head-mb1", [item, StageItem("r2", 0, 7, False, [9], Params(max_tokens=1))]),
        StageResult("head-mb1", [17], [{17: -0.5, 3: -1.25}]),
        StageResult("head-mb2", [], [], error="boom"),
        StageRelease(["r1", "r2"]),
        StageClose("done"),
        StageStep("head-mb3", [item], 1),
        StageKV("hot-kvin0", "r1", [3, 4], 20, True),
    ):
        assert decode(encode(msg)) == (msg, [])


def test_micro_batches_split_a_step_by_tokens():
    from tideserve.engine.scheduler import ScheduledSeq, SchedulerOutput
    from tideserve.engine.sequence import Sequence
    from tideserve.roles.stage import split_plan

    seq = lambda i: Sequence(f"r{i}", [1] * 40, SamplingParams())
    decodes = [ScheduledSeq(seq(i), 40, 1, True) for i in range(4)]
    prefills = [ScheduledSeq(seq(9), 0, 30, False), ScheduledSeq(seq(8), 0, 10, True)]
    plan = SchedulerOutput(decodes, prefills, [])
    mbs = split_plan(plan, 2)
    assert [mb.num_batched_tokens for mb in mbs] == [32, 12]
    assert sorted(it.seq.request_id for mb in mbs for it in mb.scheduled) == sorted(
        it.seq.request_id for it in plan.scheduled
    )
    assert len(split_plan(SchedulerOutput(decodes[:1], [], []), 2)) == 1  # no empty micro-batch
