"""Fidelity: one trace segment run live on this machine and in the simulator, compared.

Lifecycle (``live_vs_sim``): with no profile given, measure one now (`tideserve profile
--quick --threads 1`: the shapes this workload has, on the machine as loaded as the live run
will find it) -> start `tideserve serve --mode colocated --decode 1 --threads 1`
(the real default model) -> warm it up -> replay the segment with `tideserve bench` (open
loop, the trace's arrival times) -> its requests.jsonl -> ``sim_trace``: the same requests as
they were sent (send time, the prompt tokens the server counted, the output tokens forced) ->
``simulate`` on one colocated worker with a measured profile (`tideserve profile` on this
machine) and the serve's scheduler limits -> ``compare``: TTFT and TPOT p50/p90, E2E p50/p90
and output throughput of both, and the relative error of each (sim / live - 1).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from tideserve.bench.metrics import Slo
from tideserve.bench.traces import TraceRequest
from tideserve.engine.scheduler import SchedulerConfig
from tideserve.sim.config import SimConfig, WorkerType
from tideserve.sim.perf import load_profile
from tideserve.sim.run import simulate

PROFILE = Path(__file__).resolve().parent / "profiles" / "cpu_2core.json"
METRICS = (
    ("ttft_ms", "p50"),
    ("ttft_ms", "p90"),
    ("tpot_ms", "p50"),
    ("tpot_ms", "p90"),
    ("e2e_ms", "p50"),
    ("e2e_ms", "p90"),
    ("output_tokens_per_s", None),
)
CHECKED = METRICS[:4] + METRICS[6:]  # what the 20% criterion names


def _post(url: str, body: dict) -> None:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        r.read()


def live_run(out: Path, requests: int, time_scale: float, max_input: int, max_output: int) -> Path:
    """Serves the default model on one 1-thread worker and replays the segment; the run dir."""
    from tideserve.launcher import ServeProcess

    srv = ServeProcess(
        "--mode", "colocated", "--decode", "1", "--threads", "1", "--dtype", "bfloat16",
        "--served-model-name", "m",
    )  # fmt: skip
    with srv:
        body = {"model": "m", "prompt": "Tell me about the sea. " * 20, "max_tokens": 8}
        url = srv.url + "/v1/completions"
        warm = [threading.Thread(target=_post, args=(url, body)) for _ in range(2)]
        for t in warm:
            t.start()
        for t in warm:
            t.join()
        cmd = [
            sys.executable, "-m", "tideserve.cli", "bench", "--endpoint", srv.url,
            "--trace", "azure-conv", "--time-scale", str(time_scale),
            "--max-requests", str(requests), "--max-input-tokens", str(max_input),
            "--max-output-tokens", str(max_output), "--model", "m", "--out", str(out),
            "--quiet", "--no-plots",
        ]  # fmt: skip
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return out


def measure_profile(path: Path) -> Path:
    """`tideserve profile --quick` with the live worker's threads and dtype, now."""
    cmd = [
        sys.executable, "-m", "tideserve.cli", "profile", "--out", str(path), "--quick",
        "--threads", "1", "--dtype", "bfloat16", "--kv-cache-mb", "1024",
    ]  # fmt: skip
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return path


def sim_trace(rows: list[dict]) -> list[TraceRequest]:
    """The requests as the live run sent them: send time from the first send, prompt tokens
    as the server counted them, output tokens as forced."""
    sent = sorted((r for r in rows if r.get("send_s") is not None), key=lambda r: r["send_s"])
    t0 = sent[0]["send_s"]
    return [
        TraceRequest(
            r["send_s"] - t0,
            r.get("server_prompt_tokens") or r["prompt_tokens_sent"],
            r["output_tokens"],
        )
        for r in sent
    ]


def sim_config(profile: Path = PROFILE) -> SimConfig:
    """One colocated worker of this machine's profile, with `tideserve serve`'s defaults."""
    perf = load_profile(profile)
    return SimConfig(
        mode="colocated",
        workers={"colocated": WorkerType(perf)},
        pool={"colocated": 1},
        scheduler=SchedulerConfig(64, 1024, perf.max_model_len),
        slo=Slo(None, None),
    )


def _value(summary: dict, key: str, q: str | None) -> float | None:
    v = summary.get(key)
    return v.get(q) if q is not None and isinstance(v, dict) else v


def compare(live: dict, sim: dict) -> dict:
    """Each metric live and simulated, and the relative error sim / live - 1."""
    out = {}
    for key, q in METRICS:
        name = f"{key}_{q}" if q else key
        a, b = _value(live, key, q), _value(sim, key, q)
        err = None if not a or b is None else b / a - 1
        out[name] = {"live": a, "sim": b, "rel_error": err}
    return out


def max_error(cmp: dict) -> float:
    """The largest |relative error| over the metrics the issue's criterion names."""
    names = [f"{k}_{q}" if q else k for k, q in CHECKED]
    return max(abs(cmp[n]["rel_error"]) for n in names)


def live_vs_sim(
    out: Path,
    requests: int = 40,
    time_scale: float = 2.0,
    max_input: int = 256,
    max_output: int = 64,
    profile: Path | None = None,
) -> dict:
    t0 = time.perf_counter()
    if profile is None:
        profile = measure_profile(out / "profile.json")
    run = live_run(out / "live", requests, time_scale, max_input, max_output)
    live = json.loads((run / "summary.json").read_text())
    rows = [json.loads(x) for x in (run / "requests.jsonl").read_text().splitlines()]
    sim, _ = simulate(sim_config(profile), sim_trace(rows))
    cmp = compare(live, sim)
    return {
        "requests": requests,
        "time_scale": time_scale,
        "max_input_tokens": max_input,
        "max_output_tokens": max_output,
        "profile": str(profile),
        "profile_fit": {
            k: v for k, v in (load_profile(profile).fit or {}).items() if k != "samples"
        },
        "live_failed": live["num_failed"],
        "offered_rps": live["offered_rps"],
        "metrics": cmp,
        "max_rel_error": max_error(cmp),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
