"""Which running requests move between decode workers (Llumnix), as pure functions.

A decode worker's *freeness* is its free KV blocks, less the blocks its queued requests will
need, per running request: `(free - queued) / max(1, running)`. Low freeness means a worker
about to preempt; high freeness means room. A draining (evacuated) worker is treated as
infinitely used (freeness -inf), so migration empties it whatever the others look like.

`plan` pairs the least free worker with the freest, when the gap exceeds `min_gap` blocks per
request (or the source is evacuated), and picks the request to move by a documented rule: the
one with the fewest KV blocks (the cheapest to copy: the shortest pause, and the least data
on the wire), lowest priority class first (batch before interactive). A balancing move is made
only when it does not leave the destination less free than the source by more than `min_gap`
(it would swap the imbalance, and the next call would move the request back: ping-pong). At most
one migration per source and per destination at a time, and a request moves at most once per
`plan` call.
The router calls it every second when migration is on; the simulator can call it too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DECODE_ROLES = ("decode", "colocated", "partial")


@dataclass(frozen=True)
class DecodeLoad:
    worker_id: str
    role: str
    ready: bool  # takes new work (not starting, not draining)
    evacuate: bool  # draining with migration: move everything off it
    free_blocks: int
    queued_blocks: int  # blocks its waiting requests and transfers in flight will need
    running: int


@dataclass(frozen=True)
class RunningRequest:
    request_id: str
    worker_id: str
    blocks: int  # KV blocks it holds now
    priority: int  # 0 interactive, higher = batch
    migrating: bool = False  # a migration of it is under way


@dataclass(frozen=True)
class Move:
    request_id: str
    src: str
    dst: str
    reason: str


def freeness(w: DecodeLoad) -> float:
    if w.evacuate:
        return -math.inf
    return (w.free_blocks - w.queued_blocks) / max(1, w.running)


def _moved(w: DecodeLoad, r: RunningRequest, sign: int) -> float:
    """`w`'s freeness once `r` has left it (sign -1) or arrived (+1)."""
    return (w.free_blocks - sign * r.blocks - w.queued_blocks) / max(1, w.running + sign)


def plan(
    workers: list[DecodeLoad],
    requests: list[RunningRequest],
    min_gap: float = 8.0,
    balance: bool = True,
) -> list[Move]:
    """The migrations to start now. `balance=False`: only evacuate draining workers."""
    busy_src = {r.worker_id for r in requests if r.migrating}
    busy_dst: set[str] = set()
    dsts = sorted(
        (w for w in workers if w.ready and w.role in DECODE_ROLES),
        key=lambda w: (-freeness(w), w.worker_id),
    )
    srcs = sorted(
        (w for w in workers if w.role in DECODE_ROLES and w.worker_id not in busy_src),
        key=lambda w: (freeness(w), w.worker_id),
    )
    moves = []
    for src in srcs:
        mine = [r for r in requests if r.worker_id == src.worker_id and not r.migrating]
        if not mine:
            continue
        for dst in dsts:
            if dst.worker_id == src.worker_id or dst.worker_id in busy_dst:
                continue
            if dst.role != src.role:
                continue  # a colocated and a decode pool are different services
            gap = freeness(dst) - freeness(src)
            if not src.evacuate and (not balance or gap <= min_gap):
                break  # dsts are sorted: no better one follows
            r = min(mine, key=lambda r: (-r.priority, r.blocks, r.request_id))
            if r.blocks > dst.free_blocks - dst.queued_blocks:
                continue  # it would not fit there
            if not src.evacuate and _moved(src, r, -1) - _moved(dst, r, +1) > min_gap:
                continue  # it would only swap the imbalance: the next plan would move it back
            why = (
                f"{src.worker_id} is draining"
                if src.evacuate
                else f"freeness {freeness(src):.1f} vs {freeness(dst):.1f} blocks per request"
            )
            moves.append(Move(r.request_id, src.worker_id, dst.worker_id, why))
            busy_dst.add(dst.worker_id)
            break
    return moves
