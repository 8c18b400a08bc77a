"""What a run leaves behind: ``summary.json``, ``requests.jsonl`` and the terminal tables.

Lifecycle: the CLI hands a finished run's summary dict and records to ``write_run``; ``format_
summary`` renders the summary for a person. ``bench compare`` reads runs back with ``load_run``
(its errors name the folder and file) and renders them side by side with ``format_compare``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from tideserve.bench.metrics import RequestRecord

SUMMARY = "summary.json"
REQUESTS = "requests.jsonl"
_LATENCIES = (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("ITL", "itl_ms"), ("E2E", "e2e_ms"))


def write_run(out_dir: Path, summary: dict, records: list[RequestRecord]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / SUMMARY).write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    with (out_dir / REQUESTS).open("w") as f:
        for r in records:
            f.write(json.dumps(r.to_json(), allow_nan=False) + "\n")


def load_run(run_dir: Path) -> tuple[dict, list[dict]]:
    """A run's summary and request rows, as ``write_run`` left them."""
    if not (run_dir / SUMMARY).is_file():
        raise ValueError(f"{run_dir} is not a bench run: it has no {SUMMARY}")
    try:
        summary = json.loads((run_dir / SUMMARY).read_text())
        rows = []
        if (run_dir / REQUESTS).is_file():
            with (run_dir / REQUESTS).open() as f:
                rows = [json.loads(line) for line in f if line.strip()]
    except ValueError as e:
        raise ValueError(f"{run_dir}: cannot read the run ({e})") from None
    return summary, rows


def _fmt(x, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def format_summary(s: dict) -> str:
    """A table of the summary for the terminal."""
    lines = [
        f"{s['num_requests']} requests: {s['num_completed']} completed, {s['num_failed']} failed"
        + (f", {s['num_cancelled']} cancelled" if s.get("num_cancelled") else "")
        + (f", {s['num_unsent']} not sent" if s.get("num_unsent") else "")
        + f", in {s['duration_s']:.1f} s",
        f"{'':14}{'p50':>10}{'p90':>10}{'p99':>10}{'mean':>10}",
    ]
    for label, key in (*_LATENCIES, ("send lag", "send_lag_ms")):
        st = s[key]
        row = "".join(f"{_fmt(st[q]):>10}" for q in ("p50", "p90", "p99", "mean"))
        lines.append(f"{label + ' (ms)':14}{row}")
    lines.append(
        f"throughput: {_fmt(s['throughput_rps'], 2)} req/s, "
        f"{_fmt(s['output_tokens_per_s'])} output tok/s "
        f"(offered {_fmt(s['offered_rps'], 2)} req/s)"
    )
    slo = s["slo"]
    if s["slo_attainment"] is not None:
        lines.append(
            f"SLO attainment (TTFT <= {_fmt(slo['ttft_ms'], 0)} ms, TPOT <= "
            f"{_fmt(slo['tpot_ms'], 0)} ms): {_pct(s['slo_attainment'])}"
        )
    ws = s.get("worker_seconds")
    lines.append(f"worker-seconds: {_fmt(ws)}" if ws is not None else "worker-seconds: unknown")
    if s.get("goodput"):
        g = s["goodput"]
        line = f"goodput: {_fmt(g['goodput_rps'], 2)} req/s ({len(g['probes'])} probes"
        if g["missed_rps"] is None:
            line += "; no probe missed the target, so this is a lower bound"
        elif g["best_multiplier"] is None:
            line += f"; even {_fmt(g['missed_rps'], 2)} req/s missed the target"
        lines.append(line + ")")
    lines += _length_notes(s["lengths"]) + _failure_notes(s["failures"])
    return "\n".join(lines)


def _length_notes(lengths: dict) -> list[str]:
    notes = []
    if lengths["num_output_mismatch"]:
        notes.append(
            f"note: {lengths['num_output_mismatch']} requests came back with another output "
            f"length than asked ({lengths['output_tokens_received']} tokens received of "
            f"{lengths['output_tokens_requested']}): the server may not honour ignore_eos"
        )
    if lengths["num_input_mismatch"]:
        notes.append(
            f"note: {lengths['num_input_mismatch']} of {lengths['num_input_checked']} prompts "
            "encoded to another length on the server than intended (another tokenizer?)"
        )
    return notes


def _failure_notes(failures: list[dict], shown: int = 5) -> list[str]:
    notes = [f"failed #{f['index']}: {f['error']}" for f in failures[:shown]]
    if len(failures) > shown:
        notes.append(f"... and {len(failures) - shown} more failures (see summary.json)")
    return notes


def format_compare(names: list[str], summaries: list[dict]) -> str:
    """Runs side by side, one column each."""
    rows: list[tuple[str, list[str]]] = [
        ("requests", [str(s["num_requests"]) for s in summaries]),
        ("failed", [str(s["num_failed"]) for s in summaries]),
        ("offered req/s", [_fmt(s["offered_rps"], 2) for s in summaries]),
        ("throughput req/s", [_fmt(s["throughput_rps"], 2) for s in summaries]),
        ("output tok/s", [_fmt(s["output_tokens_per_s"]) for s in summaries]),
    ]
    for label, key in _LATENCIES:
        for q in ("p50", "p90", "p99"):
            rows.append((f"{label} {q} (ms)", [_fmt(s[key][q]) for s in summaries]))
    rows += [
        ("SLO attainment", [_pct(s["slo_attainment"]) for s in summaries]),
        (
            "goodput req/s",
            [_fmt((s.get("goodput") or {}).get("goodput_rps"), 2) for s in summaries],
        ),
        ("worker-seconds", [_fmt(s.get("worker_seconds")) for s in summaries]),
    ]
    width = max(12, *(len(n) + 2 for n in names))
    lines = [f"{'':20}" + "".join(f"{n:>{width}}" for n in names)]
    lines += [f"{label:20}" + "".join(f"{v:>{width}}" for v in vals) for label, vals in rows]
    return "\n".join(lines)
