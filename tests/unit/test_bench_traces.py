"""Trace loaders, short names, transforms and synthetic arrivals of `tideserve bench`."""

from __future__ import annotations

import json
import statistics

import pytest

from tideserve.bench.traces import (
    DATA_DIR,
    SHORT_NAMES,
    TraceError,
    TraceRequest,
    load_trace,
    resolve_trace,
)
from tideserve.bench.transforms import TraceShape, synthetic


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text, newline="")
    return path


def triples(reqs):
    return [(round(r.arrival_s, 6), r.input_tokens, r.output_tokens) for r in reqs]


# -- formats ------------------------------------------------------------------------------------


def test_azure_csv(tmp_path):
    path = write(
        tmp_path,
        "azure.csv",
        "TIMESTAMP,ContextTokens,GeneratedTokens\r\n"
        "2023-11-16 18:15:46.6805900,374,44\r\n"
        "2023-11-16 18:15:50.9951690,396,109\r\n"
        "2023-11-16 18:16:46.6805900,2,1\r\n",
    )
    assert triples(load_trace(path)) == [(0.0, 374, 44), (4.314579, 396, 109), (60.0, 2, 1)]


def test_burstgpt_csv(tmp_path):
    path = write(
        tmp_path,
        "burst.csv",
        "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
        "5,ChatGPT,472,18,490,Conversation log\n"
        "45,GPT-4,1087,0,1087,API log\n"
        "47.5,ChatGPT,12,300,312,Conversation log\n",
    )
    assert triples(load_trace(path)) == [(0.0, 472, 18), (40.0, 1087, 0), (42.5, 12, 300)]


def test_mooncake_jsonl_spreads_requests_that_share_a_rounded_timestamp(tmp_path):
    rows = [(0, 10, 1), (0, 20, 2), (0, 30, 3), (3000, 40, 4), (3000, 50, 5), (6000, 60, 6)]
    path = write(
        tmp_path,
        "mooncake.jsonl",
        "".join(
            json.dumps({"timestamp": t, "input_length": i, "output_length": o, "hash_ids": [1]})
            + "\n"
            for t, i, o in rows
        ),
    )
    assert triples(load_trace(path)) == [
        (0.0, 10, 1),
        (1.0, 20, 2),
        (2.0, 30, 3),
        (3.0, 40, 4),
        (4.5, 50, 5),
        (6.0, 60, 6),
    ]


def test_generic_csv_and_jsonl_sorted_and_shifted_to_zero(tmp_path):
    csv_path = write(
        tmp_path,
        "g.csv",
        "timestamp,input_tokens,output_tokens\n12.5,100,10\n10,50,5\n\n11,70,7\n",
    )
    jsonl_path = write(
        tmp_path,
        "g.jsonl",
        '{"timestamp": 12.5, "input_tokens": 100, "output_tokens": 10}\n'
        '{"timestamp": 10, "input_tokens": 50, "output_tokens": 5, "extra": "x"}\n'
        "\n"
        '{"timestamp": 11, "input_tokens": 70, "output_tokens": 7}\n',
    )
    expected = [(0.0, 50, 5), (1.0, 70, 7), (2.5, 100, 10)]
    assert triples(load_trace(csv_path)) == expected
    assert triples(load_trace(jsonl_path)) == expected


def test_vidur_column_names_read_as_generic(tmp_path):
    path = write(
        tmp_path,
        "v.csv",
        "arrived_at,num_prefill_tokens,num_decode_tokens\n0.0,5,6\n0.25,7,8\n",
    )
    assert triples(load_trace(path)) == [(0.0, 5, 6), (0.25, 7, 8)]


@pytest.mark.parametrize(
    ("name", "text", "line", "words"),
    [
        (
            "bad_count.csv",
            "timestamp,input_tokens,output_tokens\n1,2,3\n2,x,4\n",
            3,
            "input_tokens 'x' is not a number",
        ),
        (
            "columns.csv",
            "timestamp,input_tokens,output_tokens\n1,2,3\n2,3\n",
            3,
            "expected 3 columns",
        ),
        (
            "negative.csv",
            "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,-4,5\n",
            2,
            "ContextTokens '-4' is not a token count",
        ),
        (
            "fraction.jsonl",
            '{"timestamp": 0, "input_length": 4, "output_length": 5}\n'
            '{"timestamp": 1, "input_length": 4.5, "output_length": 5}\n',
            2,
            "input_length 4.5 is not a token count",
        ),
        (
            "date.csv",
            "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,4,5\nyesterday,4,5\n",
            3,
            "TIMESTAMP 'yesterday'",
        ),
        (
            "broken.jsonl",
            '{"timestamp": 0, "input_tokens": 4, "output_tokens": 5}\n{"timestamp": 1,\n',
            2,
            "not valid JSON",
        ),
        (
            "array.jsonl",
            '{"timestamp": 0, "input_tokens": 4, "output_tokens": 5}\n\n[1, 2]\n',
            3,
            "expected a JSON object",
        ),
        (
            "missing_key.jsonl",
            '{"timestamp": 0, "input_tokens": 4, "output_tokens": 5}\n{"timestamp": 1}\n',
            2,
            "input_tokens is missing",
        ),
        ("unknown.csv", "when,prompt,completion\n1,2,3\n", 2, "unknown trace format"),
    ],
)
def test_malformed_trace_names_file_and_line(tmp_path, name, text, line, words):
    path = write(tmp_path, name, text)
    with pytest.raises(TraceError) as e:
        load_trace(path)
    assert f"{path}:{line}:" in str(e.value)
    assert words in str(e.value)


def test_empty_missing_and_binary_files_are_clear_errors(tmp_path):
    empty = write(tmp_path, "empty.csv", "timestamp,input_tokens,output_tokens\n")
    with pytest.raises(TraceError, match="holds no requests"):
        load_trace(empty)
    with pytest.raises(TraceError, match="does not exist"):
        load_trace(tmp_path / "nope.csv")
    binary = tmp_path / "bin.csv"
    binary.write_bytes(b"\xff\xfe\x00\x81garbage")
    with pytest.raises(TraceError, match="bin.csv"):
        load_trace(binary)


# -- short names --------------------------------------------------------------------------------


def test_short_names_fall_back_to_the_shipped_samples(tmp_path):
    for name, (_, sample) in SHORT_NAMES.items():
        if sample is None:
            with pytest.raises(TraceError, match="no sample ships"):
                resolve_trace(name, shared_dir=tmp_path)
            continue
        path = resolve_trace(name, shared_dir=tmp_path)
        assert path == DATA_DIR / sample
        reqs = load_trace(path)
        assert len(reqs) == (1000 if name.startswith("mooncake") else 2000)
        assert reqs[0].arrival_s == 0.0
        assert all(a.arrival_s <= b.arrival_s for a, b in zip(reqs, reqs[1:]))
        assert all(r.input_tokens > 0 and r.output_tokens > 0 for r in reqs)


def test_short_name_prefers_the_shared_folder_and_paths_win(tmp_path):
    full = tmp_path / "azure2023" / "AzureLLMInferenceTrace_conv.csv"
    full.parent.mkdir()
    full.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,4,5\n")
    assert resolve_trace("azure-conv", shared_dir=tmp_path) == full
    assert resolve_trace(str(full)) == full
    with pytest.raises(TraceError, match="neither a file nor a known name"):
        resolve_trace("azure-chat", shared_dir=tmp_path)


# -- transforms ---------------------------------------------------------------------------------


def uniform(n: int, gap: float = 1.0, input_tokens: int = 100, output_tokens: int = 10):
    return [TraceRequest(i * gap, input_tokens, output_tokens) for i in range(n)]


def test_time_scale_compresses_and_lengths_scale_then_clip():
    shape = TraceShape(
        time_scale=0.1, input_scale=2.0, output_scale=0.5, max_input_tokens=150, max_requests=3
    )
    assert triples(shape.apply(uniform(10))) == [(0.0, 150, 5), (0.1, 150, 5), (0.2, 150, 5)]
    tiny = TraceShape(output_scale=0.01).apply([TraceRequest(0, 0, 10)])
    assert (tiny[0].input_tokens, tiny[0].output_tokens) == (1, 1)


def test_rate_scale_thins_or_densifies_and_keeps_the_span():
    base = uniform(2000)
    half = TraceShape(rate_scale=0.5).apply(base, seed=1)
    assert 900 < len(half) < 1100
    assert half == TraceShape(rate_scale=0.5).apply(base, seed=1)
    more = TraceShape(rate_scale=2.5).apply(base, seed=1)
    assert 4800 < len(more) < 5200
    assert max(r.arrival_s for r in more) < base[-1].arrival_s + 1.0
    assert all(a.arrival_s <= b.arrival_s for a, b in zip(more, more[1:]))


@pytest.mark.parametrize(
    "kwargs", [{"time_scale": 0}, {"rate_scale": -1}, {"max_requests": 0}, {"input_scale": 0}]
)
def test_bad_shapes_are_refused(kwargs):
    with pytest.raises(ValueError, match="must be"):
        TraceShape(**kwargs)


def test_synthetic_poisson_and_gamma_arrivals():
    poisson = synthetic("poisson", rate=50, duration_s=60, input_tokens=8, output_tokens=4, seed=3)
    assert 2700 < len(poisson) < 3300
    gaps = [b.arrival_s - a.arrival_s for a, b in zip(poisson, poisson[1:])]
    assert statistics.stdev(gaps) / statistics.fmean(gaps) == pytest.approx(1.0, abs=0.1)
    assert {(r.input_tokens, r.output_tokens) for r in poisson} == {(8, 4)}
    gamma = synthetic("gamma", 50, 60, 8, 4, seed=3, gamma_shape=0.25)
    gaps = [b.arrival_s - a.arrival_s for a, b in zip(gamma, gamma[1:])]
    assert 2500 < len(gamma) < 3500
    assert statistics.stdev(gaps) / statistics.fmean(gaps) == pytest.approx(2.0, rel=0.2)
    assert poisson == synthetic("poisson", 50, 60, 8, 4, seed=3)
    with pytest.raises(ValueError, match="poisson or gamma"):
        synthetic("uniform", 1, 1, 1, 1)
