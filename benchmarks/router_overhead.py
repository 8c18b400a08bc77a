"""Router overhead: requests/s the router sustains against a worker that answers instantly.

    python benchmarks/router_overhead.py [--seconds 10] [--concurrency 64]

Starts `tideserve router` on the default model's tokenizer and a fake colocated worker (this
script with --fake-worker) that answers every GenerateRequest with one finished token at once,
then drives short non-streaming completions at the router with `wrk` (apt-get install wrk) when
it is installed, else with an aiohttp client, for a fixed time. Everything runs on 127.0.0.1
and shares this machine's cores with the load generator, so the figure is a lower bound.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

import zmq

from tideserve.engine.default_model import DEFAULT_MODEL_NAME, prepare_default_model
from tideserve.launcher import free_port
from tideserve.protocol import (
    PROTOCOL_VERSION,
    AbortRequest,
    GenerateRequest,
    Heartbeat,
    Hello,
    TokenChunk,
    decode,
    encode,
)

BODY = {"model": DEFAULT_MODEL_NAME, "prompt": "Hello there", "max_tokens": 1, "temperature": 0}


def fake_worker(address: str) -> None:
    """A colocated worker that finishes every request at once with one token."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    wid = "fake-0"
    sock.setsockopt(zmq.IDENTITY, wid.encode())
    sock.connect(address)
    hello = Hello(
        PROTOCOL_VERSION,
        wid,
        "colocated",
        "127.0.0.1",
        "",
        DEFAULT_MODEL_NAME,
        1_000_000,
        16,
        8192,
        "none",
        os.getpid(),
    )
    sock.send_multipart(encode(hello))
    beat = 0.0
    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    while not stop:
        if sock.poll(100):
            while True:
                try:
                    msg, _ = decode(sock.recv_multipart(zmq.NOBLOCK))
                except zmq.Again:
                    break
                if isinstance(msg, GenerateRequest):
                    sock.send_multipart(
                        encode(
                            TokenChunk(
                                msg.request_id, wid, [28], "length", len(msg.prompt_token_ids)
                            )
                        )
                    )
                elif not isinstance(msg, AbortRequest):
                    pass
        if time.monotonic() > beat:
            sock.send_multipart(encode(Heartbeat(wid, "ready", 0, 0, 0, 0, 1_000_000)))
            beat = time.monotonic() + 0.5


def wait_healthy(url: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError("router not healthy")


def run_wrk(url: str, seconds: int, concurrency: int) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(
            'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
            f"wrk.body = [[{json.dumps(BODY)}]]\n"
        )
        script = f.name
    out = subprocess.run(
        ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "-s", script, url + "/v1/completions"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    os.unlink(script)
    print(out)
    if "Non-2xx" in out:
        raise RuntimeError("the router answered errors under load")
    return float(next(line for line in out.splitlines() if "Requests/sec" in line).split()[-1])


async def run_aiohttp(url: str, seconds: int, concurrency: int) -> float:
    import aiohttp

    done, errors = 0, 0
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as s:

        async def loop():
            nonlocal done, errors
            while time.monotonic() < deadline:
                async with s.post(url + "/v1/completions", json=BODY) as r:
                    await r.read()
                    done += r.status == 200
                    errors += r.status != 200

        t0 = time.monotonic()
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        if errors:
            raise RuntimeError(f"{errors} error responses")
        return done / (time.monotonic() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--fake-worker", metavar="ADDRESS", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.fake_worker:
        fake_worker(args.fake_worker)
        return
    model = str(prepare_default_model())
    port, wport = free_port(), free_port()
    url, waddr = f"http://127.0.0.1:{port}", f"tcp://127.0.0.1:{wport}"
    router = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tideserve.cli",
            "router",
            "--model",
            model,
            "--port",
            str(port),
            "--worker-address",
            waddr,
        ]
    )
    worker = subprocess.Popen([sys.executable, __file__, "--fake-worker", waddr])
    try:
        wait_healthy(url)
        if shutil.which("wrk"):
            rps, tool = run_wrk(url, args.seconds, args.concurrency), "wrk"
        else:
            rps, tool = asyncio.run(run_aiohttp(url, args.seconds, args.concurrency)), "aiohttp"
        print(
            f"router: {rps:.0f} non-streaming requests/s ({tool}, {args.concurrency} connections, "
            f"{args.seconds} s, instant worker)"
        )
    finally:
        for p in (worker, router):
            p.terminate()
            p.wait(10)


if __name__ == "__main__":
    main()
