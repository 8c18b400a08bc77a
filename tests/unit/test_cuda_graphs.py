"""CUDA graphs for decode: the bucket and padding logic as pure functions (always run), and
capture + replay against the eager engine on a tiny random Llama (marked gpu)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.factories import run_engine
from tideserve.config import EngineConfig
from tideserve.engine.cuda_graphs import (
    DecodeGraphs,
    batch_buckets,
    context_buckets,
    decode_inputs,
    pad_rows,
    pick_bucket,
)
from tideserve.engine.engine import LLMEngine
from tideserve.engine.sequence import SamplingParams


def test_batch_buckets_cover_every_batch_up_to_the_cap():
    assert batch_buckets(1) == [1]
    assert batch_buckets(6) == [1, 2, 4, 6]
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert batch_buckets(20) == [1, 2, 4, 8, 16, 20]
    for cap in (1, 3, 17, 64):
        buckets = batch_buckets(cap)
        assert all(pick_bucket(n, buckets) >= n for n in range(1, cap + 1))
    with pytest.raises(ValueError):
        batch_buckets(0)


def test_context_buckets_are_powers_of_two_up_to_the_model_length():
    assert context_buckets(1) == [1]
    assert context_buckets(8) == [1, 2, 4, 8]
    assert context_buckets(10) == [1, 2, 4, 8, 10]


def test_pick_bucket_pads_to_the_next_size_or_gives_up():
    buckets = [1, 2, 4, 8, 16]
    assert [pick_bucket(n, buckets) for n in (1, 2, 3, 5, 9, 16)] == [1, 2, 4, 8, 16, 16]
    assert pick_bucket(17, buckets) is None


def test_padding_rows_repeat_row_zero():
    a = np.array([[1, 2], [3, 4], [5, 6]])
    assert pad_rows(a, 3) is a
    assert pad_rows(a, 5).tolist() == [[1, 2], [3, 4], [5, 6], [1, 2], [1, 2]]
    with pytest.raises(ValueError):
        pad_rows(a, 2)
    with pytest.raises(ValueError):
        pad_rows(a[:0], 4)


def test_decode_inputs_match_the_paged_layout():
    # block size 4; seq 0 at position 5 (6 tokens: blocks 7, 2), seq 1 at position 0 (block 9)
    ids, pos, slots, blocks, bias = decode_inputs([11, 12], [5, 0], [[7, 2], [9]], 4, nb=4)
    assert ids.tolist() == [11, 12] and pos.tolist() == [5, 0]
    assert slots.tolist() == [2 * 4 + 1, 9 * 4 + 0]
    assert blocks.tolist() == [[7, 2, 0, 0], [9, 0, 0, 0]]
    assert (bias[0, :6] == 0).all() and np.isneginf(bias[0, 6:]).all()
    assert bias[1, 0] == 0 and np.isneginf(bias[1, 1:]).all()
    with pytest.raises(ValueError):
        decode_inputs([1], [8], [[1, 2, 3]], 4, nb=2)  # 9 tokens need 3 blocks


def test_padded_rows_write_the_same_slot_with_the_same_values():
    """The padding invariant: every padding row equals row 0 in each input."""
    host = decode_inputs([11, 12, 13], [5, 0, 2], [[7, 2], [9], [4]], 4, nb=2)
    for a in host:
        padded = pad_rows(a, 8)
        assert (padded[3:] == padded[0]).all() and (padded[:3] == a).all()


def test_graphs_refuse_a_cpu_device():
    with pytest.raises(ValueError, match="CUDA"):
        DecodeGraphs(None, None, torch.device("cpu"), 8, 64)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graph_replay_decodes_like_the_eager_engine(tiny_model_dir):
    def engine(graphs: bool) -> LLMEngine:
        cfg = EngineConfig(
            model=str(tiny_model_dir), device="cuda", dtype="float32", kv_cache_bytes=1 << 24,
            max_num_seqs=8, cuda_graphs=graphs,
        )  # fmt: skip
        return LLMEngine.from_config(cfg)

    prompts = [[5 + i, 9, 17 + 3 * i, 4][: 2 + i % 3] * (1 + i) for i in range(5)]
    outs = []
    for graphs in (False, True):
        e = engine(graphs)
        for i, p in enumerate(prompts):
            e.add_request(
                f"r{i}", p, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
            )
        outs.append(run_engine(e))
        if graphs:
            assert e.runner.graphs is not None and e.runner.graphs.num_replays > 0
            assert {(b, nb) for b, nb in e.runner.graphs.graphs} >= {(1, 1), (8, 1)}
        assert e.num_free_blocks == e.num_total_blocks
    assert outs[0] == outs[1]
