"""The discrete-event core: simulated time as a heap of (time, order, callback, argument).

Lifecycle of an event: `at(t, fn, arg)` pushes it -> `run()` pops events in time order (ties
in the order they were pushed, so a run is deterministic), moves `now` to the event's time and
calls `fn(arg)`, which may push more. Nothing reads a wall clock.

A *barrier* event (an arrival, an autoscaler tick, a worker becoming ready) is one that reads
or changes the state of any worker; every other event touches one worker only.
`next_barrier_s` is the time of the earliest barrier still pending: the cluster may advance a
worker alone up to it (`Cluster._decode_run`) without any other event seeing the difference.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any


class EventLoop:
    def __init__(self) -> None:
        self.now = 0.0
        self.num_events = 0  # handled so far
        self._heap: list[tuple[float, int, Callable[[Any], None], Any, bool]] = []
        self._barriers: list[float] = []  # times of the pending barrier events (a heap)
        self._order = 0

    def at(
        self, t: float, fn: Callable[[Any], None], arg: Any = None, barrier: bool = False
    ) -> None:
        """Run `fn(arg)` at simulated time `t` (never before now)."""
        if t < self.now:
            t = self.now
        self._order += 1
        heapq.heappush(self._heap, (t, self._order, fn, arg, barrier))
        if barrier:
            heapq.heappush(self._barriers, t)

    @property
    def next_barrier_s(self) -> float:
        """The time of the earliest pending barrier event (infinity when none)."""
        return self._barriers[0] if self._barriers else float("inf")

    def after(self, delay_s: float, fn: Callable[[Any], None], arg: Any = None) -> None:
        self.at(self.now + delay_s, fn, arg)

    def run(self, until: float | None = None) -> None:
        """Handle events until none is left (or the next is after `until`)."""
        heap, barriers, pop = self._heap, self._barriers, heapq.heappop
        while heap:
            if until is not None and heap[0][0] > until:
                self.now = until
                return
            t, _, fn, arg, barrier = pop(heap)
            if barrier:
                pop(barriers)
            self.now = t
            self.num_events += 1
            fn(arg)

    @property
    def is_empty(self) -> bool:
        return not self._heap
