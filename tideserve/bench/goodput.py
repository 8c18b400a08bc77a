"""Goodput: the highest request rate at which SLO attainment stays >= 90% (DistServe's P90).

Lifecycle: the caller fixes a request list (the trace, cut to ``--max-requests`` so each probe
is a bounded run) and gives ``search_goodput`` a ``probe(multiplier)`` that replays it with every
arrival time divided by ``multiplier`` and returns the attainment. The search probes 1x, then
doubles (or halves) until it brackets the target, then bisects the bracket (geometric midpoint)
until ``max_probes`` runs are spent or the bracket is within ``rel_tol``. The answer is the
highest multiplier that passed, times the trace's own rate; no pass means a goodput of 0.
A probe may stop early once more than 10% of its requests have missed: its verdict is known.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

TARGET_ATTAINMENT = 0.9


@dataclass(frozen=True)
class Probe:
    multiplier: float  # arrival times divided by this
    attainment: float


@dataclass
class GoodputResult:
    multiplier: float | None  # highest multiplier that met the target; None: none did
    upper: float | None = None  # lowest multiplier that missed it; None: none did (lower bound)
    probes: list[Probe] = field(default_factory=list)

    def goodput_rps(self, base_rps: float) -> float:
        return 0.0 if self.multiplier is None else self.multiplier * base_rps


async def search_goodput(
    probe: Callable[[float], Awaitable[float]],
    max_probes: int = 8,
    rel_tol: float = 0.05,
    target: float = TARGET_ATTAINMENT,
    start: float = 1.0,
) -> GoodputResult:
    """Binary search of the highest passing multiplier; see the module docstring."""
    if max_probes < 1:
        raise ValueError(f"--goodput-probes must be >= 1, got {max_probes}")
    result = GoodputResult(None)

    async def passes(m: float) -> bool:
        a = await probe(m)
        result.probes.append(Probe(m, a))
        return a >= target

    lo, hi = (start, None) if await passes(start) else (None, start)
    while len(result.probes) < max_probes and (lo is None or hi is None):
        if hi is None:
            m = lo * 2
            lo, hi = (m, None) if await passes(m) else (lo, m)
        else:
            m = hi / 2
            lo, hi = (m, hi) if await passes(m) else (None, m)
    while len(result.probes) < max_probes and lo is not None and hi is not None:
        if hi / lo <= 1 + rel_tol:
            break
        m = math.sqrt(lo * hi)
        lo, hi = (m, hi) if await passes(m) else (lo, m)
    result.multiplier, result.upper = lo, hi
    return result
