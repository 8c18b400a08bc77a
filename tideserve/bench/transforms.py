"""Reshape a trace so it fits the server under test, or make one up.

Lifecycle: ``load_trace`` (or ``synthetic``) gives a list of ``TraceRequest`` ->
``TraceShape.apply`` runs, in this order: time scaling, rate scaling, length scaling, length
clipping, truncation to ``max_requests`` -> the runner replays the result. Every step is pure
and seeded, so one ``--seed`` gives one request list.

- ``--time-scale X`` multiplies every arrival time by X: 0.1 replays an hour in six minutes,
  at ten times the rate, burst shape kept.
- ``--rate-scale X`` changes the rate and keeps the span: X < 1 keeps each request with
  probability X; X > 1 sends each request ``floor(X)`` or ``ceil(X)`` times (``X`` on average),
  the copies spread evenly up to the next arrival.
- ``--input-scale``/``--output-scale`` multiply lengths; ``--max-input-tokens`` and
  ``--max-output-tokens`` clip them. Every length ends at least 1 token long.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from tideserve.bench.traces import TraceRequest


@dataclass(frozen=True)
class TraceShape:
    """The transforms of the module docstring; the defaults change nothing."""

    time_scale: float = 1.0  # arrival times are multiplied by this
    rate_scale: float = 1.0  # request rate is multiplied by this, span kept
    input_scale: float = 1.0  # prompt lengths are multiplied by this
    output_scale: float = 1.0  # output lengths are multiplied by this
    max_input_tokens: int | None = None  # prompt lengths are clipped to this
    max_output_tokens: int | None = None  # output lengths are clipped to this
    max_requests: int | None = None  # only the first this many requests are kept

    def __post_init__(self) -> None:
        for name in ("time_scale", "rate_scale", "input_scale", "output_scale"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {value}")
        for name in ("max_input_tokens", "max_output_tokens", "max_requests"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")

    def apply(self, reqs: list[TraceRequest], seed: int = 0) -> list[TraceRequest]:
        rng = random.Random(seed)
        out = scale_time(reqs, self.time_scale)
        out = scale_rate(out, self.rate_scale, rng)
        out = scale_lengths(out, self.input_scale, self.output_scale)
        out = clip_lengths(out, self.max_input_tokens, self.max_output_tokens)
        return out if self.max_requests is None else out[: self.max_requests]


def scale_time(reqs: list[TraceRequest], factor: float) -> list[TraceRequest]:
    return [TraceRequest(r.arrival_s * factor, r.input_tokens, r.output_tokens) for r in reqs]


def scale_rate(reqs: list[TraceRequest], factor: float, rng: random.Random) -> list[TraceRequest]:
    if factor == 1.0 or not reqs:
        return list(reqs)
    if factor < 1.0:
        return [r for r in reqs if rng.random() < factor]
    gaps = [b.arrival_s - a.arrival_s for a, b in zip(reqs, reqs[1:])]
    mean_gap = sum(gaps) / len(gaps) if gaps else 0.0
    whole, frac = int(factor), factor - int(factor)
    out = []
    for r, gap in zip(reqs, [*gaps, mean_gap]):
        copies = whole + (1 if rng.random() < frac else 0)
        out += [
            TraceRequest(r.arrival_s + k * gap / copies, r.input_tokens, r.output_tokens)
            for k in range(copies)
        ]
    return out


def scale_lengths(
    reqs: list[TraceRequest], input_scale: float, output_scale: float
) -> list[TraceRequest]:
    return [
        TraceRequest(
            r.arrival_s, round(r.input_tokens * input_scale), round(r.output_tokens * output_scale)
        )
        for r in reqs
    ]


def clip_lengths(
    reqs: list[TraceRequest], max_input: int | None, max_output: int | None
) -> list[TraceRequest]:
    def clip(n: int, top: int | None) -> int:
        return max(1, n if top is None else min(n, top))

    return [
        TraceRequest(
            r.arrival_s, clip(r.input_tokens, max_input), clip(r.output_tokens, max_output)
        )
        for r in reqs
    ]


def synthetic(
    kind: str,
    rate: float,
    duration_s: float,
    input_tokens: int,
    output_tokens: int,
    seed: int = 0,
    gamma_shape: float = 0.5,
) -> list[TraceRequest]:
    """Arrivals at ``rate`` req/s for ``duration_s``: Poisson, or gamma with shape
    ``gamma_shape`` (burstier than Poisson below 1: the gaps' CV is 1/sqrt(shape))."""
    if kind not in ("poisson", "gamma"):
        raise ValueError(f"--synthetic must be poisson or gamma, got {kind!r}")
    if not (rate > 0 and duration_s > 0 and gamma_shape > 0):
        raise ValueError("--rate, --duration and --gamma-shape must be > 0")
    if input_tokens < 1 or output_tokens < 1:
        raise ValueError("--input-tokens and --output-tokens must be >= 1")
    rng = random.Random(seed)
    out: list[TraceRequest] = []
    t = 0.0
    while t < duration_s:
        out.append(TraceRequest(t, input_tokens, output_tokens))
        if kind == "poisson":
            t += rng.expovariate(rate)
        else:
            t += rng.gammavariate(gamma_shape, 1.0 / (rate * gamma_shape))
    return out
