"""`tideserve bench` and `tideserve bench compare` from the command line, against a fake server
in a separate process: the files a run leaves, the terminal table, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tideserve.cli import main

SUMMARY_KEYS = {
    "num_requests",
    "num_failed",
    "ttft_ms",
    "tpot_ms",
    "e2e_ms",
    "slo_attainment",
    "throughput_rps",
    "output_tokens_per_s",
    "worker_seconds",
}


@pytest.fixture(scope="module")
def fake_url():
    proc = subprocess.Popen(
        [sys.executable, "-m", "tideserve.bench.fake_server", "--ttft-ms", "5", "--itl-ms", "1"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("READY "), line
        yield line.split()[1]
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_run_writes_summary_requests_and_plots(fake_url, tmp_path, capsys):
    trace = tmp_path / "t.csv"
    trace.write_text(
        "timestamp,input_tokens,output_tokens\n"
        + "".join(f"{i * 0.02},{10 + i},{4 + i % 3}\n" for i in range(12))
    )
    out = tmp_path / "run"
    argv = ["bench", "--endpoint", fake_url, "--trace", str(trace), "--out", str(out)]
    rc = main([*argv, "--slo-ttft-ms", "500", "--slo-tpot-ms", "100", "--quiet"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    for key in ("ttft_ms", "tpot_ms", "e2e_ms"):
        assert {"p50", "p90", "p99", "mean"} <= set(summary[key])
    assert summary["num_requests"] == 12 and summary["num_failed"] == 0
    assert summary["slo_attainment"] == 1.0
    assert summary["worker_seconds"] > 0
    assert summary["config"]["model"] == "fake-model"
    assert summary["config"]["prompts"].startswith("token ids")
    rows = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(12))
    assert [r["prompt_tokens_sent"] for r in rows] == [10 + i for i in range(12)]
    assert all(r["num_output_tokens"] == r["output_tokens"] for r in rows)
    printed = capsys.readouterr().out
    assert "TTFT (ms)" in printed and "SLO attainment" in printed
    pytest.importorskip("matplotlib")
    for name in ("ttft_cdf.png", "tpot_cdf.png", "timeline.png"):
        assert (out / name).stat().st_size > 1000


def test_synthetic_goodput_and_compare(fake_url, tmp_path, capsys):
    common = ["bench", "--endpoint", fake_url, "--quiet", "--no-plots"]
    synth = ["--synthetic", "poisson", "--rate", "20", "--duration", "0.5", "--output-tokens", "3"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert main([*common, *synth, "--out", str(a)]) == 0
    argv = [*common, *synth, "--slo-ttft-ms", "1000", "--goodput", "--goodput-probes", "2"]
    assert main([*argv, "--out", str(b)]) == 0
    goodput = json.loads((b / "summary.json").read_text())["goodput"]
    assert [p["multiplier"] for p in goodput["probes"]] == [1.0, 2.0]
    assert goodput["goodput_rps"] == pytest.approx(2 * goodput["base_rps"])
    assert goodput["missed_rps"] is None
    assert "lower bound" in capsys.readouterr().out
    capsys.readouterr()
    assert main(["bench", "compare", str(a), str(b), "--out", str(tmp_path / "cmp")]) == 0
    table = capsys.readouterr().out
    assert str(a) in table and str(b) in table and "TTFT p99 (ms)" in table


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--endpoint", "http://127.0.0.1:9", "--trace", "azure-conv"], "cannot reach"),
        (["--endpoint", "http://127.0.0.1:9", "--trace", "no-such-trace"], "no-such-trace"),
        (["--endpoint", "http://127.0.0.1:9", "--synthetic", "poisson"], "--rate"),
        (["--endpoint", "127.0.0.1:9", "--trace", "azure-conv"], "http(s) URL"),
        (["--trace", "azure-conv"], "--endpoint URL and --out DIR are required"),
    ],
)
def test_errors_are_one_line_and_exit_2(tmp_path, capsys, argv, message):
    assert main(["bench", *argv, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_a_bad_trace_line_is_named(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("timestamp,input_tokens,output_tokens\n0,1,2\n1,many,2\n")
    rc = main(["bench", "--endpoint", "http://127.0.0.1:9", "--trace", str(bad), "--out", "x"])
    assert rc == 2
    assert f"{bad}:3: input_tokens 'many' is not a number" in capsys.readouterr().err


def test_compare_of_a_folder_without_a_run(tmp_path, capsys):
    assert main(["bench", "compare", str(tmp_path)]) == 2
    assert "has no summary.json" in capsys.readouterr().err
