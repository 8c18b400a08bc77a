"""Simulator fidelity on this machine: live `tideserve serve` + `tideserve bench` against
`tideserve sim` with this machine's profile, on the same requests.

    python benchmarks/sim_fidelity.py [--requests 40] [--time-scale 3] [--profile FILE | --fresh]

The first --requests requests of the Azure conversation trace (prompts clipped to 256 tokens,
outputs to 64, arrivals x --time-scale) are served live by one colocated worker (default model,
bf16, 1 thread), then simulated from the requests as sent (send times, server-counted prompt
tokens) on one worker of the measured profile: the committed one by default
(tideserve/sim/profiles/cpu_2core.json, written by `tideserve profile --threads 1 --dtype
bfloat16 --kv-cache-mb 1024`), or with --fresh one measured just before the live run
(`tideserve profile --quick`, ~20 s), so both see the machine equally loaded. Prints each metric
live, simulated and the relative error; the issue's criterion is 20% on TTFT p50/p90, TPOT
p50/p90 and throughput. Results: benchmarks/results/sim_fidelity.json (appended).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from tideserve.sim.fidelity import PROFILE, live_vs_sim

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--time-scale", type=float, default=3.0)
    ap.add_argument("--profile", type=Path, default=PROFILE)
    ap.add_argument("--fresh", action="store_true", help="measure a profile just before")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        profile = None if args.fresh else args.profile
        report = live_vs_sim(Path(tmp), args.requests, args.time_scale, profile=profile)
    fit = report["profile_fit"]
    print(f"profile {report['profile']}: R^2 {fit.get('r2', float('nan')):.4f}")
    print(f"{report['requests']} requests at {report['offered_rps']:.2f} req/s offered")
    print(f"{'metric':<24}{'live':>10}{'sim':>10}{'error':>9}")
    for name, m in report["metrics"].items():
        err = "" if m["rel_error"] is None else f"{m['rel_error']:+.1%}"
        print(f"{name:<24}{m['live']:>10.1f}{m['sim']:>10.1f}{err:>9}")
    print(f"max |error| on the checked metrics: {report['max_rel_error']:.1%}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "sim_fidelity.json"
    rows = json.loads(out.read_text()) if out.exists() else []
    rows.append(report)
    out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
