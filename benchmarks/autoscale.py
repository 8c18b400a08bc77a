"""Autoscaling on this machine, default model, workers at 1 thread each.

    python benchmarks/autoscale.py latency [--rounds 3]
    python benchmarks/autoscale.py elastic [--requests 120] [--time-scale 3]

latency  Scale-out latency: a router and one colocated worker serve a steady trickle of
         requests; the local actuator starts a second worker (the "decision"), and its
         /cluster entry gives the breakdown: process start (spawn, interpreter, imports),
         weight load, registration (Hello -> Welcome), first step (until it served a token).
         The new worker is then drained and stopped; --rounds times, medians reported.
elastic  A bursty segment of the Azure LLM conversation trace (2023; the sample in
         tideserve/bench/data), rescaled (--time-scale stretches arrivals, prompts clipped
         to 256 tokens, outputs to 64) and replayed through `tideserve bench` against
         `tideserve serve --mode colocated --autoscale` under each policy: static (peak
         provisioning: 2 workers throughout), utilization, coordinated and slo (1..2
         workers). Reports SLO attainment (TTFT <= --slo-ttft, TPOT <= --slo-tpot) and
         worker-seconds for each, in one run. 2 cores: 2 workers is the peak.
Results: benchmarks/results/autoscale_<mode>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


def latency(args) -> dict:
    from autoscaler.actuators.local import LocalActuator
    from autoscaler.service import scale_out_breakdown
    from tideserve.engine.default_model import prepare_default_model
    from tideserve.launcher import free_port

    model = str(prepare_default_model(progress=True))
    http, zport = free_port(), free_port()
    url, zaddr = f"http://127.0.0.1:{http}", f"tcp://127.0.0.1:{zport}"
    router = subprocess.Popen([
        sys.executable, "-m", "tideserve.cli", "router", "--model", model, "--port", str(http),
        "--worker-address", zaddr, "--served-model-name", "m",
    ])  # fmt: skip
    worker_args = ("--model", model, "--dtype", "bfloat16", "--served-model-name", "m")
    act = LocalActuator(zaddr, worker_args, threads=1, log_level="WARNING")
    stop = threading.Event()
    rounds = []
    try:
        act.start("colocated")
        while not any(w["state"] == "ready" for w in _safe_workers(url)):
            time.sleep(0.2)

        def trickle():  # steady work, so a new worker is given some as soon as it registers
            body = {"model": "m", "prompt": "Tell me about the sea.", "max_tokens": 8}
            while not stop.is_set():
                try:
                    _post(url + "/v1/completions", body)
                except OSError:
                    time.sleep(0.1)

        threads = [threading.Thread(target=trickle, daemon=True) for _ in range(3)]
        for t in threads:
            t.start()
        for i in range(args.rounds):
            decided = time.time()
            wid = act.start("colocated")
            while True:
                w = next((w for w in _safe_workers(url) if w["id"] == wid), None)
                if w is not None and w.get("first_token_at"):
                    break
                time.sleep(0.05)
            parts = scale_out_breakdown(w, decided)
            rounds.append(parts)
            print(f"round {i}: " + ", ".join(f"{k} {v:.2f} s" for k, v in parts.items()),
                  flush=True)  # fmt: skip
            _post(url + f"/admin/workers/{wid}/drain", {})
            while next((w for w in _safe_workers(url) if w["id"] == wid), {"requests": 0})[
                "requests"
            ]:
                time.sleep(0.1)
            act.stop(wid, "colocated")
    finally:
        stop.set()
        act.close()
        router.terminate()
        router.wait()
    med = {k: round(statistics.median(r[k] for r in rounds), 3) for k in rounds[0]}
    return {"rounds": rounds, "median_s": med, "threads_per_worker": 1, "dtype": "bfloat16"}


def _safe_workers(url: str) -> list[dict]:
    try:
        return _get(url + "/cluster")["workers"]
    except OSError:
        return []


POLICIES = {  # policy -> extra serve flags (bounds, options)
    "static": ["--min-decode", "2", "--max-decode", "2"],
    "utilization": ["--min-decode", "1", "--max-decode", "2", "--policy-option",
                    "down_stabilization_s=15", "--policy-option", "down_cooldown_s=15"],
    "coordinated": ["--min-decode", "1", "--max-decode", "2", "--policy-option",
                    "down_stabilization_s=15", "--policy-option", "down_cooldown_s=15"],
    "slo": ["--min-decode", "1", "--max-decode", "2", "--policy-option", "slack_window_s=15",
            "--policy-option", "down_cooldown_s=15"],
}  # fmt: skip


def elastic(args) -> dict:
    from tideserve.launcher import ServeProcess

    out = {}
    for policy, flags in POLICIES.items():
        extra = list(flags)
        if policy == "coordinated":
            extra += ["--policy-option", f"decode_tps_per_worker={args.decode_tps}"]
        srv = ServeProcess(
            "--mode", "colocated", "--autoscale", "--policy", policy, "--threads", "1",
            "--dtype", "bfloat16", "--served-model-name", "m", "--interval", "1",
            "--slo-ttft", str(args.slo_ttft), "--slo-tpot", str(args.slo_tpot), *extra,
            capture=True, log_level="INFO",
        )  # fmt: skip
        dest = RESULTS / "elastic" / policy
        with srv:
            cmd = [
                sys.executable, "-m", "tideserve.cli", "bench", "--endpoint", srv.url,
                "--trace", "azure-conv", "--time-scale", str(args.time_scale),
                "--max-requests", str(args.requests), "--max-input-tokens", "256",
                "--max-output-tokens", "64", "--slo-ttft-ms", str(args.slo_ttft * 1000),
                "--slo-tpot-ms", str(args.slo_tpot * 1000), "--model", "m", "--out", str(dest),
            ]  # fmt: skip
            subprocess.run(cmd, check=True)
            log = srv.output(200_000)
        s = json.loads((dest / "summary.json").read_text())
        actions = [ln.split(": ", 1)[-1] for ln in log.splitlines() if "scale " in ln]
        out[policy] = {
            "slo_attainment": s["slo_attainment"],
            "worker_seconds": s["worker_seconds"],
            "ttft_ms_p90": s.get("ttft_ms", {}).get("p90"),
            "tpot_ms_p90": s.get("tpot_ms", {}).get("p90"),
            "num_failed": s.get("num_failed"),
            "scale_actions": len(actions),
        }
        print(policy, json.dumps(out[policy]), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["latency", "elastic"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=120)
    ap.add_argument("--time-scale", type=float, default=3.0)
    ap.add_argument("--slo-ttft", type=float, default=3.0)
    ap.add_argument("--slo-tpot", type=float, default=0.15)
    ap.add_argument(
        "--decode-tps",
        type=float,
        default=60.0,
        help="coordinated: profiled decode tokens/s of one 1-thread worker",
    )
    args = ap.parse_args()
    result = latency(args) if args.mode == "latency" else elastic(args)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"autoscale_{args.mode}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result if args.mode == "elastic" else result["median_s"], indent=2))


if __name__ == "__main__":
    main()
