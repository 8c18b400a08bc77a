"""Simulator fidelity: a short Azure conversation segment served live (`tideserve serve`, one
colocated worker at 1 thread, the default model in bf16, replayed by `tideserve bench`) and
simulated on the same requests with this machine's measured profile
(tideserve/sim/profiles/cpu_2core.json) must agree on TTFT p50/p90, TPOT p50/p90 and output
throughput. The issue's criterion is 20%; this test allows 35%, since the machine is shared
and one short run is noisy (benchmarks/sim_fidelity.py reports the actual errors).
"""

from __future__ import annotations

import pytest

from tideserve.sim.fidelity import CHECKED, live_vs_sim

pytestmark = pytest.mark.slow

BOUND = 0.35


def test_simulator_agrees_with_a_live_run_on_this_machine(tmp_path):
    report = live_vs_sim(tmp_path, requests=30, time_scale=2.0)
    assert report["live_failed"] == 0
    errors = {
        name: m["rel_error"]
        for name, m in report["metrics"].items()
        if name in {f"{k}_{q}" if q else k for k, q in CHECKED}
    }
    assert len(errors) == 5
    bad = {n: round(e, 3) for n, e in errors.items() if abs(e) > BOUND}
    assert not bad, f"sim vs live beyond {BOUND:.0%}: {bad}; all: {report['metrics']}"
