"""KV transfer bandwidth: tcp, shm and gloo (or nccl) between two processes on 127.0.0.1,
against memcpy.

    python benchmarks/kv_transfer_bandwidth.py                     # T=512 and 2048, 5 repeats
    python benchmarks/kv_transfer_bandwidth.py --tokens 128 --repeats 2 --transports shm
    python benchmarks/kv_transfer_bandwidth.py --transports tcp shm gloo
    python benchmarks/kv_transfer_bandwidth.py --transports nccl    # GPU to GPU (needs CUDA)

A request's KV is `--layers` layers of [2, --kv-heads, T, --head-dim] bf16 (default 30 x
[2, 3, T, 64], SmolLM2-135M's shape). This process is the prefill side: begin, send_layer per
layer, done. A child process is the decode side: it copies each layer into a preallocated
cache, as a decode worker does, and acks at KVDone. One transfer's time runs from `begin` to
the ack arriving back here, so it counts everything: the copy into shm (a pooled segment after
the warm-up transfer) or the frames, the receiver's copy-out and the round trip. GB/s = payload
bytes / median time. memcpy is `torch.Tensor.copy_` of the same layers into a preallocated
buffer in this process, in the same run; "vs memcpy" = transfer GB/s / memcpy GB/s. One
warm-up transfer per row; --threads torch threads in each process (default 1: an OpenMP copy
on a busy machine stalls at its barriers). gloo and nccl form their pair in the warm-up
transfer (kv_transfer/dist.py); with nccl the layers, the receiver's cache and the memcpy
baseline are on the GPU (one GPU: both processes share it). One of gloo/nccl per run.
"""

from __future__ import annotations

import argparse
import json
import select
import statistics
import subprocess
import sys
import time

import torch
import zmq

from kv_transfer import (
    KVBeginEvent,
    KVDoneEvent,
    KVLayerEvent,
    dist_available,
    make_receiver,
    make_sender,
)
from tideserve.protocol import KVBegin, Params, TensorMeta

WAIT_S = 60.0  # the longest any one wait (child start, an ack) may take


# -- the decode side (child process) -----------------------------------------------------------


def serve(timeout_s: float, backend: str) -> None:
    """Receives transfers until stdin closes (or `timeout_s`), copying layers into a cache."""
    ctx = zmq.Context()
    device = "cuda" if backend == "nccl" else "cpu"
    # takes tcp frames and shm notices too, and joins gloo/nccl pairs with `backend`
    receiver = make_receiver(backend, ctx, timeout_s=WAIT_S, device=device)
    print(receiver.address, flush=True)
    poller = zmq.Poller()
    for s in receiver.sockets:
        poller.register(s, zmq.POLLIN)
    poller.register(sys.stdin.fileno(), zmq.POLLIN)
    caches: dict[tuple, torch.Tensor] = {}  # (num_layers, *layer shape) -> a KV "cache"
    cache_of: dict[str, torch.Tensor] = {}  # request id -> its cache
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        ready = dict(poller.poll(1000))
        if sys.stdin.fileno() in ready and not sys.stdin.buffer.read1(1):
            break
        for ev in receiver.poll():
            if isinstance(ev, KVBeginEvent):
                key = (ev.msg.num_layers, *ev.msg.layer.shape)
                if key not in caches:
                    caches[key] = torch.zeros(key, dtype=torch.bfloat16, device=device)
                cache_of[ev.msg.request_id] = caches[key]
            elif isinstance(ev, KVLayerEvent):
                cache_of[ev.request_id][ev.layer].copy_(ev.tensor)
            elif isinstance(ev, KVDoneEvent):
                del cache_of[ev.request_id]
                receiver.ack(ev.request_id, True)
        receiver.expired(time.monotonic())
    receiver.close()
    ctx.destroy(linger=0)


# -- the prefill side --------------------------------------------------------------------------


def start_receiver(timeout_s: float, backend: str) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, __file__, "--serve", "--serve-timeout", str(timeout_s)]
    cmd += ["--serve-backend", backend]
    cmd += ["--threads", str(torch.get_num_threads())]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    ready, _, _ = select.select([proc.stdout], [], [], WAIT_S)
    if not ready:
        proc.kill()
        raise RuntimeError(f"the receiver process did not start within {WAIT_S}s")
    return proc, proc.stdout.readline().decode().strip()


def transfer_once(sender, dest: str, rid: str, layers: list[torch.Tensor]) -> float:
    meta = TensorMeta("bfloat16", tuple(layers[0].shape))
    msg = KVBegin(rid, "bench", sender.reply_address, [1], [], 1, Params(1), 0, len(layers), meta)
    t0 = time.perf_counter()
    sender.begin(dest, msg)
    for i, kv in enumerate(layers):
        sender.send_layer(rid, i, kv)
    sender.done(rid, [0])
    poller = zmq.Poller()
    for s in sender.sockets:
        poller.register(s, zmq.POLLIN)
    end = time.monotonic() + WAIT_S
    while True:
        acks = sender.poll_acks()
        if acks:
            elapsed = time.perf_counter() - t0
            if not acks[0].ok:
                raise RuntimeError(f"{rid}: refused: {acks[0].reason}")
            return elapsed
        if time.monotonic() > end:
            raise RuntimeError(f"{rid}: no ack within {WAIT_S}s")
        poller.poll(100)


def memcpy_once(layers: list[torch.Tensor], dst: torch.Tensor) -> float:
    t0 = time.perf_counter()
    for i, kv in enumerate(layers):
        dst[i].copy_(kv)
    if dst.is_cuda:
        torch.cuda.synchronize(dst.device)
    return time.perf_counter() - t0


def bench(args) -> list[dict]:
    ctx = zmq.Context()
    dist = [t for t in args.transports if t in ("gloo", "nccl")]
    backend = dist[0] if dist else "shm"
    device = "cuda" if backend == "nccl" else "cpu"
    proc, dest = start_receiver(600, backend)
    rows = []
    try:
        senders = {t: make_sender(t, ctx, timeout_s=WAIT_S, device=device) for t in args.transports}
        n = 0
        for tokens in args.tokens:
            shape = (2, args.kv_heads, tokens, args.head_dim)
            g = torch.Generator().manual_seed(tokens)
            layers = [
                torch.randn(shape, generator=g).bfloat16().to(device) for _ in range(args.layers)
            ]
            nbytes = sum(kv.nbytes for kv in layers)
            dst = torch.empty(args.layers, *shape, dtype=torch.bfloat16, device=device)
            memcpy_once(layers, dst)
            copy_s = statistics.median(memcpy_once(layers, dst) for _ in range(args.repeats))
            for t, sender in senders.items():
                times = []
                for _ in range(args.repeats + 1):
                    n += 1
                    times.append(transfer_once(sender, dest, f"{t}-{n}", layers))
                med = statistics.median(times[1:])
                rows.append(
                    dict(
                        transport=t,
                        tokens=tokens,
                        mbytes=nbytes / 1e6,
                        ms=med * 1e3,
                        min_ms=min(times[1:]) * 1e3,
                        gbps=nbytes / med / 1e9,
                        memcpy_gbps=nbytes / copy_s / 1e9,
                        vs_memcpy=copy_s / med,
                    )
                )
        for sender in senders.values():
            sender.close()
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        ctx.destroy(linger=0)
    return rows


def print_table(rows: list[dict]) -> None:
    head = f"{'transport':<9} {'T':>5} {'MB':>7} {'ms':>8} {'min ms':>8} {'GB/s':>7}"
    print(f"{head} {'memcpy GB/s':>11} {'vs memcpy':>9}")
    for r in rows:
        print(
            f"{r['transport']:<9} {r['tokens']:>5} {r['mbytes']:>7.1f} {r['ms']:>8.2f} "
            f"{r['min_ms']:>8.2f} {r['gbps']:>7.2f} {r['memcpy_gbps']:>11.2f} "
            f"{r['vs_memcpy']:>9.2f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--transports",
        nargs="+",
        default=["tcp", "shm"],
        choices=["tcp", "shm", "gloo", "nccl"],
        help="gloo: torch.distributed on CPU; nccl: GPU to GPU (one of the two per run)",
    )
    ap.add_argument("--tokens", nargs="+", type=int, default=[512, 2048])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads in each process")
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--serve-timeout", type=float, default=600, help=argparse.SUPPRESS)
    ap.add_argument("--serve-backend", default="shm", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.serve:
        serve(args.serve_timeout, args.serve_backend)
        return
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    if {"gloo", "nccl"} <= set(args.transports):
        ap.error("one of gloo and nccl per run (a receiver joins pairs of one backend)")
    if "nccl" in args.transports and not dist_available("nccl"):
        sys.exit("nccl needs CUDA and a torch built with NCCL; GPU figures are measured there")
    rows = bench(args)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} repeats")
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
