"""A fake OpenAI completions server with controlled delays, to test and measure the bench.

Lifecycle of a request: ``POST /v1/completions`` notes its receive time (``time.perf_counter``,
one clock for every process on Linux) and body -> every ``fail_every``-th request answers 500 ->
it waits for one of ``num_slots`` slots (none: no limit), so that past ``num_slots / service
time`` requests queue and TTFT grows -> sleeps ``ttft_ms`` -> streams one chunk per output
token, ``itl_ms`` apart (all in one write when both are 0: an instant server) -> a usage chunk
-> ``data: [DONE]``. ``GET /cluster`` lists ``num_workers`` workers as tideserve does (404 when
None); ``GET /v1/models`` names ``model``.

In a test: ``url = await FakeServer(cfg).start()`` ... ``await server.stop()``. Standalone (the
loadgen benchmark): ``python -m tideserve.bench.fake_server --port P`` prints ``READY URL``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from dataclasses import dataclass

from aiohttp import web

from tideserve.bench.runner import run_async


@dataclass(frozen=True)
class FakeServerConfig:
    ttft_ms: float = 0.0  # from receiving a request (and getting a slot) to its first token
    itl_ms: float = 0.0  # between output tokens
    num_slots: int | None = None  # requests served at once; the rest queue (None: no limit)
    fail_every: int = 0  # every k-th request (1-based) answers HTTP 500 (0: none)
    max_output_tokens: int | None = None  # stop early, as a server that ignores ignore_eos
    num_workers: int | None = 1  # workers listed by /cluster (None: no /cluster)
    model: str = "fake-model"
    keep_bodies: bool = True  # note each request's receive time and body in ``received``


class FakeServer:
    def __init__(self, cfg: FakeServerConfig | None = None) -> None:
        self.cfg = cfg or FakeServerConfig()
        self.received: list[tuple[float, dict]] = []  # (receive time, request body)
        self.num_received = 0
        self.num_cluster_polls = 0
        self._slots = asyncio.Semaphore(self.cfg.num_slots) if self.cfg.num_slots else None
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        if self.cfg.num_workers is not None:
            app.router.add_get("/cluster", self.cluster)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve in the running loop; the base URL (``port=0``: a free port)."""
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound = self._runner.addresses[0][1]
        return f"http://{host}:{bound}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.cfg.model}]})

    async def cluster(self, request: web.Request) -> web.Response:
        self.num_cluster_polls += 1
        workers = [
            {"id": f"w{i}", "role": "colocated", "state": "ready"}
            for i in range(self.cfg.num_workers or 0)
        ]
        return web.json_response({"workers": workers})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        received = time.perf_counter()
        body = await request.json()
        self.num_received += 1
        if self.cfg.keep_bodies:
            self.received.append((received, body))
        if self.cfg.fail_every and self.num_received % self.cfg.fail_every == 0:
            return web.json_response({"error": {"message": "injected failure"}}, status=500)
        async with self._slots or contextlib.nullcontext():
            return await self._stream(request, body)

    async def _stream(self, request: web.Request, body: dict) -> web.StreamResponse:
        requested = int(body.get("max_tokens") or 16)
        n = min(requested, self.cfg.max_output_tokens or requested)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        try:
            await resp.prepare(request)
            await self._write_tokens(resp, n, "length" if n == requested else "stop")
            usage = {"prompt_tokens": _prompt_tokens(body.get("prompt")), "completion_tokens": n}
            await resp.write(_event({"choices": [], "usage": usage}) + b"data: [DONE]\n\n")
            await resp.write_eof()
        except ConnectionResetError:  # the client went away (a goodput probe stopped early)
            pass
        return resp

    async def _write_tokens(self, resp: web.StreamResponse, n: int, finish: str) -> None:
        if self.cfg.ttft_ms:
            await asyncio.sleep(self.cfg.ttft_ms / 1e3)
        chunks = [_TOKEN] * (n - 1) + [_chunk(" tok", finish)]
        if not self.cfg.itl_ms:
            await resp.write(b"".join(chunks))
            return
        for i, c in enumerate(chunks):
            if i:
                await asyncio.sleep(self.cfg.itl_ms / 1e3)
            await resp.write(c)


def _event(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def _chunk(text: str, finish_reason: str | None) -> bytes:
    return _event({"choices": [{"index": 0, "text": text, "finish_reason": finish_reason}]})


_TOKEN = _chunk(" tok", None)


def _prompt_tokens(prompt) -> int:
    if isinstance(prompt, list):
        return len(prompt)
    return len(str(prompt or "").split())


async def _serve_forever(cfg: FakeServerConfig, host: str, port: int) -> None:
    server = FakeServer(cfg)
    url = await server.start(host, port)
    print(f"READY {url}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await server.stop()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--ttft-ms", type=float, default=0.0)
    ap.add_argument("--itl-ms", type=float, default=0.0)
    ap.add_argument("--num-slots", type=int, default=None)
    args = ap.parse_args(argv)
    cfg = FakeServerConfig(
        ttft_ms=args.ttft_ms, itl_ms=args.itl_ms, num_slots=args.num_slots, keep_bodies=False
    )
    with contextlib.suppress(KeyboardInterrupt):
        run_async(_serve_forever(cfg, args.host, args.port))


if __name__ == "__main__":
    main()
