"""Partial disaggregation (EcoServe PaDG) against colocation and full disaggregation, on this
machine: the default model (SmolLM2-135M-Instruct), bfloat16, two workers at 1 thread each.

    python benchmarks/padg.py [--requests 80] [--time-scale 1] [--fixed-time-scale 0.7]
        [--probes 6] [--slo-ttft 2.5] [--slo-tpot 0.15] [--modes colocated,disaggregated,partial]
    nohup python benchmarks/padg.py > padg.log 2>&1 &     # ~15 min on 2 cores; poll the log

Modes, one after another, each on a fresh `tideserve serve`:
  colocated      --mode colocated --decode 2        (NoDG: two workers, chunked prefill)
  disaggregated  --mode disaggregated --prefill 1 --decode 1      (FuDG: 1P + 1D, KV over shm)
  partial        --mode partial --decode 2          (PaDG: one macro instance of 2)
Load: the first --requests requests of the Azure LLM conversation trace (2023; the full trace
in ../shared/traces, or the sample in tideserve/bench/data, which starts the same), prompts
clipped to 256 tokens and outputs to 64, replayed by `tideserve bench` twice per mode:
  fixed   one open-loop replay with arrivals x --fixed-time-scale (0.7: ~3.05 req/s, near
          every mode's knee): SLO attainment, and why requests missed (TTFT, TPOT or both);
  goodput `--goodput`, from the trace's own rate (x --time-scale; 80 requests: 2.13 req/s):
          the highest rate with >= 90% of the requests within both SLOs (P90 goodput),
          --probes runs.
SLOs, fixed, chosen for this CPU (a 256-token prompt alone takes ~0.45 s, a decode step
35-60 ms at 1-8 sequences): TTFT <= 2.5 s, TPOT <= 0.15 s. The partial workers get the same
targets (serve --slo-ttft/--slo-tpot).
The machine may be shared: before each run the script waits until other processes use under
0.2 cores, and records what they used during it (foreign_cores; steal_cores: the hypervisor's).
While a mode runs, /cluster is polled every 0.5 s: for partial, the share of busy samples in
each phase, min_slack_s and which instance was prefill-active.
Results: benchmarks/results/padg.json (each run's folder under results/padg/); a table.
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

MODES = {  # mode -> serve flags for its two workers
    "colocated": ["--mode", "colocated", "--decode", "2"],
    "disaggregated": ["--mode", "disaggregated", "--prefill", "1", "--decode", "1"],
    "partial": ["--mode", "partial", "--decode", "2"],
}


def _get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def wait_workers(url: str, n: int, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            workers = json.loads(_get(url + "/cluster"))["workers"]
        except OSError:
            workers = []
        if sum(w["state"] == "ready" for w in workers) >= n:
            return
        time.sleep(0.3)
    raise TimeoutError(f"{n} workers not ready in {timeout_s:.0f} s")


def warm_up(url: str) -> None:
    """A few requests at once, so every worker has run a prefill and a decode step."""
    body = {"model": "m", "prompt": "Tell me about the sea. " * 20, "max_tokens": 8}
    threads = [threading.Thread(target=_post, args=(url + "/v1/completions", body)) for _ in "1234"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


class ClusterWatch:
    """Polls /cluster every `period_s` in a thread; keeps the partial workers' samples."""

    def __init__(self, url: str, period_s: float = 0.5) -> None:
        self.url, self.period_s = url, period_s
        self.samples: list[tuple[float, list[dict]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ClusterWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                workers = json.loads(_get(self.url + "/cluster"))["workers"]
            except (OSError, ValueError):
                continue
            self.samples.append((time.time(), workers))

    def summary(self) -> dict:
        """Per worker: samples with work, the phase shares among them, slack, activity."""
        per: dict[str, dict] = collections.defaultdict(lambda: collections.defaultdict(list))
        for _, workers in self.samples:
            for w in workers:
                busy = w["load"]["running"] + w["load"]["waiting"] > 0
                d = per[w["id"]]
                d["busy"].append(busy)
                if not busy or "phase" not in w:
                    continue
                d["phase"].append(w["phase"])
                d["active"].append(bool(w["prefill_active"]))
                d["waiting"].append(w["load"]["waiting"])
                if w["min_slack_s"] is not None:
                    d["slack"].append(w["min_slack_s"])
        out = {}
        for wid, d in per.items():
            n = len(d["phase"])
            row = {"samples": len(d["busy"]), "busy_share": _share(d["busy"])}
            if n:
                slack = sorted(d["slack"])
                row |= {
                    "prefill_phase_share": d["phase"].count("prefill") / n,
                    "prefill_active_share": _share(d["active"]),
                    "waiting_mean": statistics.fmean(d["waiting"]),
                    "min_slack_s_p10": slack[len(slack) // 10] if slack else None,
                    "min_slack_s_p50": slack[len(slack) // 2] if slack else None,
                    "zero_slack_share": _share([s <= 0.0 for s in slack]) if slack else None,
                }
            out[wid] = row
        return out


class ForeignLoad:
    """CPU that processes outside this benchmark's process tree used (other jobs on a shared
    machine), and the hypervisor's steal, in cores, from `start()` to `stop()`. Sampled once a
    second in a thread; a run with much of either is suspect."""

    def __init__(self) -> None:
        self.base: dict[int, float] = {}  # pid -> its CPU seconds when first seen
        self.last: dict[int, float] = {}  # pid -> its CPU seconds when last seen
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ForeignLoad:
        self.t0, self.cpu0 = time.monotonic(), psutil.cpu_times()
        self.since = time.time()
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.wall_s, self.cpu1 = time.monotonic() - self.t0, psutil.cpu_times()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self._sample()

    def _sample(self) -> None:
        me = psutil.Process()
        for p in [me, *me.children(recursive=True)]:
            try:
                t = p.cpu_times()
                born = p.create_time()
            except psutil.Error:
                continue
            used = t.user + t.system
            self.base.setdefault(p.pid, 0.0 if born >= self.since else used)
            self.last[p.pid] = used

    def cores(self) -> dict[str, float]:
        d = {k: getattr(self.cpu1, k) - getattr(self.cpu0, k) for k in self.cpu0._fields}
        busy = sum(d.values()) - d.get("idle", 0.0) - d.get("iowait", 0.0) - d.get("steal", 0.0)
        mine = sum(self.last[p] - self.base[p] for p in self.last)
        return {
            "foreign_cores": round(max(0.0, busy - mine) / self.wall_s, 3),
            "steal_cores": round(d.get("steal", 0.0) / self.wall_s, 3),
            "benchmark_cores": round(mine / self.wall_s, 3),
        }


def wait_quiet(max_cores: float = 0.2, window_s: float = 5.0, timeout_s: float = 600.0) -> float:
    """Waits until other jobs use under `max_cores` over `window_s` (at most `timeout_s`);
    returns the seconds waited."""
    t0 = time.monotonic()
    while True:
        with ForeignLoad() as load:
            time.sleep(window_s)
        foreign = load.cores()["foreign_cores"]
        waited = time.monotonic() - t0
        if foreign < max_cores or waited > timeout_s:
            if waited > window_s + 1:
                print(f"waited {waited:.0f} s for a quiet machine: {foreign:.2f} cores", flush=True)
            return waited


def _share(xs: list[bool]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def cluster_events(url: str) -> dict[str, float]:
    text = _get(url + "/metrics").decode()
    pat = r'^tideserve_cluster_events\w*\{event="(\w+)"\}\s+([0-9.e+]+)$'
    return {m[1]: float(m[2]) for m in re.finditer(pat, text, re.M)}


def bench(url: str, dest: Path, args, goodput: bool) -> dict:
    time_scale = args.time_scale if goodput else args.fixed_time_scale
    cmd = [
        sys.executable, "-m", "tideserve.cli", "bench", "--endpoint", url, "--trace", "azure-conv",
        "--time-scale", str(time_scale), "--max-requests", str(args.requests),
        "--max-input-tokens", str(args.max_input_tokens),
        "--max-output-tokens", str(args.max_output_tokens),
        "--slo-ttft-ms", str(args.slo_ttft * 1000), "--slo-tpot-ms", str(args.slo_tpot * 1000),
        "--model", "m", "--out", str(dest), "--quiet", "--no-plots",
    ]  # fmt: skip
    if goodput:
        cmd += ["--goodput", "--goodput-probes", str(args.probes)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads((dest / "summary.json").read_text())


def misses(dest: Path, slo_ttft_ms: float, slo_tpot_ms: float) -> dict:
    """Why requests missed: TTFT only, TPOT only, both, or failed/unsent/cancelled."""
    c = collections.Counter()
    for line in (dest / "requests.jsonl").read_text().splitlines():
        r = json.loads(line)
        if not r["ok"]:
            c["failed_or_unsent"] += 1
            continue
        t1 = r["ttft_ms"] is not None and r["ttft_ms"] > slo_ttft_ms
        t2 = r["tpot_ms"] is not None and r["tpot_ms"] > slo_tpot_ms
        c["ttft_and_tpot" if t1 and t2 else "ttft" if t1 else "tpot" if t2 else "met"] += 1
    return dict(c)


def _p(s: dict, key: str, q: str = "p90") -> float | None:
    v = s.get(key, {}).get(q)
    return None if v is None else round(v, 1)


def run_mode(mode: str, args) -> dict:
    from tideserve.launcher import ServeProcess

    srv = ServeProcess(
        *MODES[mode], "--threads", "1", "--dtype", "bfloat16", "--served-model-name", "m",
        "--slo-ttft", str(args.slo_ttft), "--slo-tpot", str(args.slo_tpot), capture=True,
    )  # fmt: skip
    ttft_ms, tpot_ms = args.slo_ttft * 1000, args.slo_tpot * 1000
    out: dict = {"serve_flags": MODES[mode]}
    with srv:
        wait_workers(srv.url, 2)
        warm_up(srv.url)
        before = cluster_events(srv.url)
        for kind in ("fixed",) if args.fixed_only else ("fixed", "goodput"):
            dest = args.out.with_suffix("") / mode / kind
            waited = wait_quiet()
            with ClusterWatch(srv.url) as watch, ForeignLoad() as load:
                s = bench(srv.url, dest, args, goodput=kind == "goodput")
            row = {
                "wall_s": round(load.wall_s, 1),
                "waited_for_quiet_s": round(waited, 1),
                **load.cores(),
                "offered_rps": s["offered_rps"],
                "slo_attainment": s["slo_attainment"],
                "ttft_ms_p50": _p(s, "ttft_ms", "p50"),
                "ttft_ms_p90": _p(s, "ttft_ms"),
                "tpot_ms_p50": _p(s, "tpot_ms", "p50"),
                "tpot_ms_p90": _p(s, "tpot_ms"),
                "num_failed": s["num_failed"],
                "misses": misses(dest, ttft_ms, tpot_ms),
            }
            if kind == "goodput":
                g = s["goodput"]
                row["goodput_rps"] = g["goodput_rps"]
                row["missed_rps"] = g["missed_rps"]
                row["probes"] = [
                    {k: p[k] for k in ("offered_rps", "slo_attainment", "ttft_ms_p90",
                                       "tpot_ms_p90", "stopped_early")}
                    for p in g["probes"]
                ]  # fmt: skip
            if mode == "partial":
                row["workers"] = watch.summary()
            out[kind] = row
            print(mode, kind, json.dumps(row), flush=True)
        after = cluster_events(srv.url)
        out["cluster_events"] = {k: v - before.get(k, 0.0) for k, v in after.items()}
    return out


def table(results: dict, args) -> str:
    head = (
        f"{'mode':<14}{'P90 goodput rps':>16}{'attain@fixed':>14}{'TTFT p90 ms':>13}"
        f"{'TPOT p90 ms':>13}  misses@fixed"
    )
    lines = [
        f"SLO: TTFT <= {args.slo_ttft} s, TPOT <= {args.slo_tpot} s; fixed rate "
        f"{next(iter(results.values()))['fixed']['offered_rps']:.3f} rps",
        head,
    ]
    for mode, r in results.items():
        f, g = r["fixed"], r.get("goodput", {"goodput_rps": float("nan")})
        lines.append(
            f"{mode:<14}{g['goodput_rps']:>16.3f}{f['slo_attainment']:>14.3f}"
            f"{f['ttft_ms_p90'] or 0:>13.0f}{f['tpot_ms_p90'] or 0:>13.0f}  {f['misses']}"
        )
    if "partial" in results and len(results) > 1 and not args.fixed_only:
        best = max(r["goodput"]["goodput_rps"] for m, r in results.items() if m != "partial")
        ratio = results["partial"]["goodput"]["goodput_rps"] / best if best else float("inf")
        lines.append(f"partial / best other (P90 goodput): {ratio:.2f}x (target >= 1.3x)")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=80, help="requests per replay")
    ap.add_argument(
        "--time-scale", type=float, default=1.0, help="goodput search: its 1x request list"
    )
    ap.add_argument(
        "--fixed-time-scale", type=float, default=0.7, help="the fixed-rate run's arrivals"
    )
    ap.add_argument("--max-input-tokens", type=int, default=256, help="clip prompts")
    ap.add_argument("--max-output-tokens", type=int, default=64, help="clip outputs")
    ap.add_argument("--probes", type=int, default=6, help="goodput search runs per mode")
    ap.add_argument("--slo-ttft", type=float, default=2.5, help="TTFT target, s")
    ap.add_argument("--slo-tpot", type=float, default=0.15, help="TPOT target, s")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated, in run order")
    ap.add_argument("--fixed-only", action="store_true", help="skip the goodput search")
    ap.add_argument("--out", type=Path, default=RESULTS / "padg.json")
    args = ap.parse_args()
    t0 = time.monotonic()
    results = {m: run_mode(m, args) for m in args.modes.split(",")}
    report = {
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores, CPU only",
        "model": "SmolLM2-135M-Instruct (default), bfloat16, 1 thread per worker",
        "slo": {"ttft_s": args.slo_ttft, "tpot_s": args.slo_tpot},
        "load": {
            "trace": "azure-conv",
            "requests": args.requests,
            "time_scale": args.time_scale,
            "fixed_time_scale": args.fixed_time_scale,
            "max_input_tokens": args.max_input_tokens,
            "max_output_tokens": args.max_output_tokens,
            "goodput_probes": args.probes,
        },
        "wall_s": round(time.monotonic() - t0, 1),
        "modes": results,
    }
    RESULTS.mkdir(exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(table(results, args), flush=True)
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
