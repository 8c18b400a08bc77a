"""`tideserve bench` against a real `tideserve serve` (colocated, default model, bf16).

Ten requests of the shipped Azure conversation trace, compressed in time and clipped to a small
model's scale: every request must succeed with the exact prompt and output lengths asked for
(text prompts from the default model's tokenizer, ignore_eos honoured), and the server's
/cluster must give a cost in worker-seconds.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tideserve.launcher import ServeProcess

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server():
    with ServeProcess("--mode", "colocated", "--dtype", "bfloat16") as srv:
        yield srv


def test_bench_replays_a_trace_against_tideserve_serve(server, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "tideserve.cli", "bench", "--endpoint", server.url]
    cmd += ["--trace", "azure-conv", "--max-requests", "10", "--time-scale", "0.3"]
    cmd += ["--max-input-tokens", "128", "--max-output-tokens", "16", "--input-scale", "0.25"]
    cmd += ["--slo-ttft-ms", "60000", "--slo-tpot-ms", "10000", "--out", str(out), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TTFT (ms)" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    for key in ("ttft_ms", "tpot_ms", "e2e_ms"):
        assert summary[key]["count"] == 10 and summary[key]["p99"] > 0
    assert summary["num_requests"] == 10
    assert summary["num_failed"] == 0, summary["failures"]
    assert summary["slo_attainment"] == 1.0
    assert summary["throughput_rps"] > 0 and summary["output_tokens_per_s"] > 0
    assert summary["worker_seconds"] > 0
    assert summary["config"]["prompts"].startswith("text")
    lengths = summary["lengths"]
    assert lengths["num_output_mismatch"] == 0, lengths["examples"]
    assert lengths["num_input_checked"] == 10 and lengths["num_input_mismatch"] == 0
    rows = (out / "requests.jsonl").read_text().splitlines()
    assert len(rows) == 10
