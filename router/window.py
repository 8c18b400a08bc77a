"""What the autoscaler reads: the router's recent traffic over a sliding window.

Token counts (prompt tokens when a request's first token arrives, i.e. prefilled; output tokens
as they stream) become rates; TTFT, TPOT and queue wait of interactive requests become p90s.
Everything older than `window_s` is dropped as new events arrive, so memory is bounded by the
traffic of one window (and by `max_events`).
"""

from __future__ import annotations

import collections
import math


class SlidingWindow:
    def __init__(self, window_s: float = 30.0, max_events: int = 100_000) -> None:
        self.window_s = window_s
        self.max_events = max_events
        self._tokens = {k: collections.deque() for k in ("prompt", "completion")}
        self._lat = {k: collections.deque() for k in ("ttft", "tpot")}

    def add_tokens(self, now: float, kind: str, n: int) -> None:
        self._push(self._tokens[kind], now, n)

    def add_latency(self, now: float, kind: str, seconds: float) -> None:
        self._push(self._lat[kind], now, seconds)

    def _push(self, q: collections.deque, now: float, value: float) -> None:
        q.append((now, value))
        if len(q) > self.max_events:
            q.popleft()
        self._prune(q, now)

    def _prune(self, q: collections.deque, now: float) -> None:
        while q and q[0][0] < now - self.window_s:
            q.popleft()

    def rate(self, now: float, kind: str) -> float:
        q = self._tokens[kind]
        self._prune(q, now)
        return sum(v for _, v in q) / self.window_s

    def p90(self, now: float, kind: str) -> float | None:
        q = self._lat[kind]
        self._prune(q, now)
        if not q:
            return None
        xs = sorted(v for _, v in q)
        return xs[max(0, math.ceil(0.9 * len(xs)) - 1)]  # nearest rank
