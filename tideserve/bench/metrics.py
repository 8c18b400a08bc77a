"""Per-request latencies and the run summary of `tideserve bench` (pure: no I/O, no clock).

Lifecycle: the runner fills one ``RequestRecord`` per trace request (times in seconds from the
run's start) -> the properties here derive TTFT, TPOT (DistServe: (last token - first token) /
(output tokens - 1)), inter-token latencies, E2E and the send lag (send - scheduled) ->
``summarize_run`` folds them into the ``summary.json`` dict that ``SCHEMA.md`` documents.
Latencies are measured from the send time; the send lag says how late the sending was.
A failed or unsent request counts against SLO attainment; it never disappears from the counts.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field

from tideserve.bench.client import percentile

SCHEMA_VERSION = 1
_MAX_EXAMPLES = 10  # length mismatches listed in the summary


@dataclass(frozen=True)
class Slo:
    """Latency targets; a request meets the SLO when it meets every target that is set."""

    ttft_ms: float | None = None  # time to first token
    tpot_ms: float | None = None  # time per output token after the first

    @property
    def is_set(self) -> bool:
        return self.ttft_ms is not None or self.tpot_ms is not None


@dataclass
class RequestRecord:
    """One request of a run; times are seconds from the run's start, None when not reached."""

    index: int  # position in the replayed trace
    scheduled_s: float  # when the trace says to send it
    input_tokens: int  # prompt length the trace asks for
    output_tokens: int  # output length the trace asks for (max_tokens)
    prompt_tokens_sent: int  # what the synthesized prompt encodes to
    send_s: float | None = None  # None: never sent (the run stopped first)
    first_token_s: float | None = None
    last_token_s: float | None = None
    end_s: float | None = None
    num_output_tokens: int = 0  # what came back
    server_prompt_tokens: int | None = None  # the server's usage.prompt_tokens, when sent
    finish_reason: str | None = None
    status: int | None = None  # HTTP status
    error: str | None = None  # None: it succeeded
    is_cancelled: bool = False  # cut off when a goodput probe stopped early
    itl_ms: list[float] = field(default_factory=list)  # gaps between text chunks

    @property
    def is_ok(self) -> bool:
        return self.send_s is not None and self.error is None and self.first_token_s is not None

    @property
    def ttft_ms(self) -> float | None:
        if not self.is_ok:
            return None
        return (self.first_token_s - self.send_s) * 1e3

    @property
    def tpot_ms(self) -> float | None:
        if not self.is_ok or self.num_output_tokens < 2:
            return None
        return (self.last_token_s - self.first_token_s) * 1e3 / (self.num_output_tokens - 1)

    @property
    def e2e_ms(self) -> float | None:
        return (self.end_s - self.send_s) * 1e3 if self.is_ok else None

    @property
    def send_lag_ms(self) -> float | None:
        return None if self.send_s is None else (self.send_s - self.scheduled_s) * 1e3

    def meets(self, slo: Slo) -> bool:
        if not self.is_ok:
            return False
        if slo.ttft_ms is not None and self.ttft_ms > slo.ttft_ms:
            return False
        tpot = self.tpot_ms
        return slo.tpot_ms is None or tpot is None or tpot <= slo.tpot_ms

    def to_json(self) -> dict:
        row = asdict(self)
        row["itl_ms"] = [round(x, 3) for x in self.itl_ms]
        for name in ("ttft_ms", "tpot_ms", "e2e_ms", "send_lag_ms"):
            row[name] = getattr(self, name)
        row["ok"] = self.is_ok
        return row


def stats(values: list[float]) -> dict:
    """p50/p90/p99 (nearest rank), mean, max and count; None for each when there are no values."""
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None, "max": None, "count": 0}
    return {
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "mean": statistics.fmean(values),
        "max": max(values),
        "count": len(values),
    }


def offered_rps(records: list[RequestRecord]) -> float | None:
    """Requests / (last scheduled arrival - first), as the shared traces README counts it."""
    if len(records) < 2:
        return None
    span = records[-1].scheduled_s - records[0].scheduled_s
    return len(records) / span if span > 0 else None


def slo_attainment(records: list[RequestRecord], slo: Slo) -> float | None:
    """Share of all requests (failed and unsent included) that meet the SLO."""
    if not slo.is_set or not records:
        return None
    return sum(r.meets(slo) for r in records) / len(records)


def summarize_run(
    records: list[RequestRecord],
    slo: Slo,
    worker_seconds: float | None = None,
) -> dict:
    """The core of ``summary.json`` for one run (see ``SCHEMA.md``)."""
    ok = [r for r in records if r.is_ok]
    ends = [r.end_s for r in records if r.end_s is not None]
    duration_s = max(ends) if ends else 0.0
    out_tokens = sum(r.num_output_tokens for r in ok)
    failed = [r for r in records if r.send_s is not None and not r.is_ok and not r.is_cancelled]
    return {
        "schema_version": SCHEMA_VERSION,
        "num_requests": len(records),
        "num_completed": len(ok),
        "num_failed": len(failed),
        "num_cancelled": sum(r.is_cancelled for r in records),
        "num_unsent": sum(r.send_s is None for r in records),
        "duration_s": duration_s,
        "offered_rps": offered_rps(records),
        "throughput_rps": len(ok) / duration_s if duration_s else 0.0,
        "output_tokens_per_s": out_tokens / duration_s if duration_s else 0.0,
        "input_tokens_per_s": (
            sum(r.prompt_tokens_sent for r in ok) / duration_s if duration_s else 0.0
        ),
        "ttft_ms": stats([r.ttft_ms for r in ok]),
        "tpot_ms": stats([r.tpot_ms for r in ok if r.tpot_ms is not None]),
        "itl_ms": stats([x for r in ok for x in r.itl_ms]),
        "e2e_ms": stats([r.e2e_ms for r in ok]),
        "send_lag_ms": stats([r.send_lag_ms for r in records if r.send_s is not None]),
        "slo": {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms},
        "slo_attainment": slo_attainment(records, slo),
        "worker_seconds": worker_seconds,
        "lengths": length_check(ok),
        "failures": [
            {"index": r.index, "status": r.status, "error": r.error, "send_s": r.send_s}
            for r in failed
        ],
    }


def length_check(ok: list[RequestRecord]) -> dict:
    """Whether the server sent the lengths asked for: outputs (ignore_eos honoured?) and
    prompts (only where the server reports usage.prompt_tokens)."""
    out_bad = [r for r in ok if r.num_output_tokens != r.output_tokens]
    in_known = [r for r in ok if r.server_prompt_tokens is not None]
    in_bad = [r for r in in_known if r.server_prompt_tokens != r.prompt_tokens_sent]
    return {
        "output_tokens_requested": sum(r.output_tokens for r in ok),
        "output_tokens_received": sum(r.num_output_tokens for r in ok),
        "num_output_mismatch": len(out_bad),
        "num_input_checked": len(in_known),
        "num_input_mismatch": len(in_bad),
        "examples": [
            {
                "index": r.index,
                "output_tokens": r.output_tokens,
                "received": r.num_output_tokens,
                "finish_reason": r.finish_reason,
                "prompt_tokens_sent": r.prompt_tokens_sent,
                "server_prompt_tokens": r.server_prompt_tokens,
            }
            for r in (out_bad + in_bad)[:_MAX_EXAMPLES]
        ],
    }
