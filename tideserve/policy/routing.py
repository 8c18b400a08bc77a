"""Where a request goes: pure functions of the router's view of the workers (no I/O, no clock).

FuDG picks a prefill worker with the fewest queued prefill tokens and a decode worker with the
most free KV blocks, counting blocks of transfers already dispatched to it as used. NoDG picks
the colocated worker with the most free blocks net of its queued prompt tokens. The simulator
calls the same functions.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerView:
    worker_id: str
    role: str  # prefill, decode, colocated
    state: str  # starting, ready, draining
    queued_prefill_tokens: int  # from its last heartbeat, plus dispatched since
    kv_blocks_free: int  # from its last heartbeat, minus blocks of dispatches in flight
    kv_blocks_total: int
    block_size: int
    max_model_len: int


@dataclass(frozen=True)
class Route:
    prefill: str | None  # FuDG: the prefill worker; None for NoDG
    target: str  # the decode or colocated worker


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def _ready(workers: list[WorkerView], role: str, num_tokens: int) -> list[WorkerView]:
    return [
        w for w in workers if w.role == role and w.state == "ready" and w.max_model_len > num_tokens
    ]


def pick_prefill(workers: list[WorkerView], num_prompt_tokens: int) -> WorkerView | None:
    ready = _ready(workers, "prefill", num_prompt_tokens)
    return min(ready, key=lambda w: (w.queued_prefill_tokens, w.worker_id), default=None)


def pick_decode(workers: list[WorkerView], num_prompt_tokens: int) -> WorkerView | None:
    ready = _ready(workers, "decode", num_prompt_tokens)
    fits = [w for w in ready if w.kv_blocks_free >= blocks_for(num_prompt_tokens + 1, w.block_size)]
    return max(fits or ready, key=lambda w: (w.kv_blocks_free, w.worker_id), default=None)


def pick_colocated(workers: list[WorkerView], num_prompt_tokens: int) -> WorkerView | None:
    ready = _ready(workers, "colocated", num_prompt_tokens)

    def room(w: WorkerView) -> float:
        return w.kv_blocks_free - w.queued_prefill_tokens / w.block_size

    return max(ready, key=lambda w: (room(w), w.worker_id), default=None)


def route(
    workers: list[WorkerView], num_prompt_tokens: int, exclude: frozenset[str] = frozenset()
) -> Route | None:
    """FuDG when a prefill and a decode worker are ready, else NoDG; None when nothing fits."""
    pool = [w for w in workers if w.worker_id not in exclude]
    p, d = pick_prefill(pool, num_prompt_tokens), pick_decode(pool, num_prompt_tokens)
    if p is not None and d is not None:
        return Route(p.worker_id, d.worker_id)
    c = pick_colocated(pool, num_prompt_tokens)
    return Route(None, c.worker_id) if c is not None else None


_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})
KV_TRANSPORTS = ("nccl", "gloo", "shm", "tcp")  # what `--kv-transports` may list
DEFAULT_KV_TRANSPORTS = ("nccl", "shm", "tcp")  # gloo only when asked for


def parse_kv_transports(names) -> tuple[str, ...]:
    """A comma list ("gloo,tcp") or a sequence of KV transport names as a tuple, best first,
    without repeats; ValueError names an unknown one."""
    items = names.split(",") if isinstance(names, str) else list(names)
    out = tuple(dict.fromkeys(str(t).strip().lower() for t in items if str(t).strip()))
    bad = [t for t in out if t not in KV_TRANSPORTS]
    if bad:
        raise ValueError(
            f"unknown KV transport {', '.join(map(repr, bad))}; choose from "
            f"{', '.join(KV_TRANSPORTS)}"
        )
    if not out:
        raise ValueError(f"list at least one KV transport of {', '.join(KV_TRANSPORTS)}")
    return out


def choose_kv_transport(
    src_host: str,
    dst_host: str,
    dst_transports,
    src_transports=None,
    src_device: str = "",
    dst_device: str = "",
) -> str:
    """ "nccl" when both workers run on CUDA and both offer it (they offer it only with NCCL
    available), else "gloo" when both offer it (only when configured: it is the nccl code on
    CPU tensors), else "shm" when both share a host and the receiver offers it, else "tcp"."""
    src_transports = src_transports or ()
    both_cuda = src_device.startswith("cuda") and dst_device.startswith("cuda")
    if both_cuda and "nccl" in dst_transports and "nccl" in src_transports:
        return "nccl"
    if "gloo" in dst_transports and "gloo" in src_transports:
        return "gloo"
    same_host = src_host == dst_host or {src_host, dst_host} <= _LOOPBACK
    if same_host and "shm" in dst_transports:
        return "shm"
    if "tcp" in dst_transports:
        return "tcp"
    raise ValueError(
        f"no common KV transport from {src_host} to {dst_host}: the receiver offers "
        f"{list(dst_transports)}, and shm needs both on one host"
    )
