"""The router in-process against scripted fake workers (ZMQ DEALER sockets in the test).

Covers what a user notices: tokens become text (stream or not), 503 with Retry-After when no
worker is ready, 429 past the in-flight limit, re-dispatch when a worker refuses or dies
before the first token, and an abort reaching the worker when the client leaves or a stop
string ends the text.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os

import pytest
import zmq
import zmq.asyncio
from aiohttp.test_utils import TestClient, TestServer

from router.app import build
from router.config import RouterConfig
from tests.factories import make_tiny_tokenizer
from tideserve.launcher import free_port
from tideserve.protocol import (
    PROTOCOL_VERSION,
    AbortRequest,
    GenerateRequest,
    Heartbeat,
    Hello,
    RequestFailed,
    TokenBatch,
    TokenChunk,
    decode,
    encode,
)

MODEL = "tiny"


pytestmark = pytest.mark.usefixtures("quiet_gc")


class FakeWorker:
    """A colocated worker: answers each GenerateRequest with `reply(msg)` token lists."""

    def __init__(
        self,
        address: str,
        wid: str,
        tokens: list[int],
        delay_s: float = 0.0,
        fail: str | None = None,
        die_after: int | None = None,
        prompt_len: int | None = None,
    ) -> None:
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, wid.encode())
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)
        self.wid, self.tokens, self.delay_s, self.fail = wid, tokens, delay_s, fail
        self.die_after = die_after  # tokens sent before it goes silent, as if SIGKILLed
        self.prompt_len = prompt_len  # the client's prompt length: a longer one is a recompute
        self.received: list = []
        self.beating = self.alive = True
        self.tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        await self.sock.send_multipart(encode(self.hello()))
        self.tasks = [asyncio.create_task(self._serve()), asyncio.create_task(self._beat())]

    def hello(self) -> Hello:
        return Hello(
            PROTOCOL_VERSION,
            self.wid,
            "colocated",
            "127.0.0.1",
            "",
            MODEL,
            1000,
            16,
            512,
            "cpu",
            os.getpid(),
        )

    async def _beat(self) -> None:
        while True:
            if self.beating:
                await self.sock.send_multipart(
                    encode(Heartbeat(self.wid, "ready", 0, 0, 0, 0, 1000))
                )
            await asyncio.sleep(0.1)

    async def _serve(self) -> None:
        while True:
            msg, _ = decode(await self.sock.recv_multipart())
            if not self.alive:
                continue
            self.received.append(msg)
            if isinstance(msg, GenerateRequest):
                asyncio.create_task(self._answer(msg))

    async def _answer(self, msg: GenerateRequest) -> None:
        if self.fail:
            await self.sock.send_multipart(
                encode(RequestFailed(msg.request_id, self.wid, self.fail, True))
            )
            return
        skip = len(msg.prompt_token_ids) - self.prompt_len if self.prompt_len else 0
        tokens = self.tokens[skip:]
        n = min(msg.params.max_tokens, len(tokens))
        for i, tok in enumerate(tokens[:n]):
            await asyncio.sleep(self.delay_s)
            if self.die_after is not None and i >= self.die_after:
                self.beating = self.alive = False
                return
            if any(
                isinstance(m, AbortRequest) and m.request_id == msg.request_id
                for m in self.received
            ):
                return
            finish = "length" if i == n - 1 else None
            chunk = TokenChunk(msg.request_id, self.wid, [tok], finish, len(msg.prompt_token_ids))
            await self.sock.send_multipart(encode(chunk))

    def aborted(self) -> set[str]:
        return {m.request_id for m in self.received if isinstance(m, AbortRequest)}

    async def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.sock.close(0)
        self.ctx.term()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@contextlib.asynccontextmanager
async def router(tokenizer_dir, **overrides):
    cfg = RouterConfig(
        model_path=str(tokenizer_dir),
        served_model_name=MODEL,
        worker_address=f"tcp://127.0.0.1:{free_port()}",
        **overrides,
    )
    r = build(cfg)
    client = TestClient(TestServer(r.app()))
    await client.start_server()
    try:
        yield r, client, cfg.worker_address
    finally:
        await client.close()


async def wait_ready(client, timeout_s: float = 5.0) -> None:
    for _ in range(int(timeout_s / 0.05)):
        if (await client.get("/health")).status == 200:
            return
        await asyncio.sleep(0.05)
    raise TimeoutError("router never became ready")


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    from tideserve.engine.tokenizer import Tokenizer

    return Tokenizer.from_dir(tokenizer_dir)


async def test_no_worker_is_503_with_retry_after(tokenizer_dir):
    async with router(tokenizer_dir) as (_, client, _addr):
        assert (await client.get("/health")).status == 503
        resp = await client.post("/v1/completions", json={"model": MODEL, "prompt": "hi"})
        assert resp.status == 503 and resp.headers["Retry-After"]
        assert "error" in await resp.json()


async def test_tokens_become_text_streaming_and_not(tokenizer_dir, tok):
    async with router(tokenizer_dir) as (_, client, addr):
        w = FakeWorker(addr, "w0", tok.encode("Hello, world!"))
        await w.start()
        try:
            await wait_ready(client)
            resp = await client.post(
                "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 50}
            )
            body = await resp.json()
            assert resp.status == 200, body
            assert body["choices"][0]["text"] == "Hello, world!"
            assert body["usage"] == {
                "prompt_tokens": 2,
                "completion_tokens": 13,
                "total_tokens": 15,
            }
            resp = await client.post(
                "/v1/chat/completions",
                json={
                    "model": MODEL,
                    "messages": [{"role": "user", "content": "hi"}],
                    "stream": True,
                    "max_tokens": 5,
                },
            )
            events = [
                line[6:] for line in (await resp.text()).splitlines() if line.startswith("data: ")
            ]
            assert events[-1] == "[DONE]"
            chunks = [json.loads(e) for e in events[:-1]]
            assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
            assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "Hello"
            assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        finally:
            await w.close()


async def test_stop_string_ends_text_and_aborts_worker(tokenizer_dir, tok):
    async with router(tokenizer_dir) as (_, client, addr):
        w = FakeWorker(addr, "w0", tok.encode("one two STOP three four"), delay_s=0.01)
        await w.start()
        try:
            await wait_ready(client)
            resp = await client.post(
                "/v1/completions",
                json={"model": MODEL, "prompt": "x", "max_tokens": 50, "stop": ["STOP"]},
            )
            body = await resp.json()
            assert (
                body["choices"][0]["text"] == "one two "
                and body["choices"][0]["finish_reason"] == "stop"
            )
            await asyncio.sleep(0.1)
            assert body["id"] in w.aborted()
        finally:
            await w.close()


async def test_refusal_and_dead_worker_are_redispatched(tokenizer_dir, tok):
    async with router(tokenizer_dir, heartbeat_timeout_s=1.5) as (r, client, addr):
        bad = FakeWorker(addr, "a-refuses", [], fail="no room")
        good = FakeWorker(addr, "b-good", tok.encode("ok"))
        await bad.start()
        await good.start()
        try:
            await wait_ready(client)
            for _ in range(100):  # both must have said Hello, or the refusal has nowhere to go
                if len(r.cluster.workers) == 2:
                    break
                await asyncio.sleep(0.05)
            for _ in range(3):
                resp = await client.post("/v1/completions", json={"model": MODEL, "prompt": "hi"})
                assert (await resp.json())["choices"][0]["text"] == "ok"
            good.beating = False  # b goes silent: dropped after the heartbeat timeout
            for _ in range(60):
                if "b-good" not in r.cluster.workers:
                    break
                await asyncio.sleep(0.1)
            assert "b-good" not in r.cluster.workers
            resp = await client.post("/v1/completions", json={"model": MODEL, "prompt": "hi"})
            assert resp.status == 503  # only the refusing worker is left
        finally:
            await bad.close()
            await good.close()


async def test_inflight_limit_is_429(tokenizer_dir, tok):
    async with router(tokenizer_dir, max_inflight_requests=1) as (r, client, addr):
        w = FakeWorker(addr, "w0", tok.encode("slow text"), delay_s=0.2)
        await w.start()
        try:
            await wait_ready(client)
            first = asyncio.create_task(
                client.post("/v1/completions", json={"model": MODEL, "prompt": "a"})
            )
            for _ in range(100):
                if r.inflight == 1:
                    break
                await asyncio.sleep(0.02)
            resp = await client.post("/v1/completions", json={"model": MODEL, "prompt": "b"})
            assert resp.status == 429 and resp.headers["Retry-After"]
            assert (await first).status == 200
        finally:
            await w.close()


async def test_batch_class_is_held_to_its_share_interactive_is_not(tokenizer_dir, tok):
    limits = {"max_inflight_requests": 3, "max_inflight_batch": 1}
    async with router(tokenizer_dir, **limits) as (r, client, addr):
        w = FakeWorker(addr, "w0", tok.encode("slow text"), delay_s=0.2)
        await w.start()
        try:
            await wait_ready(client)
            batch = {"model": MODEL, "prompt": "a", "slo_class": "batch"}
            first = asyncio.create_task(client.post("/v1/completions", json=batch))
            for _ in range(100):
                if r.inflight == 1:
                    break
                await asyncio.sleep(0.02)
            resp = await client.post("/v1/completions", json=batch)
            assert resp.status == 429 and resp.headers["Retry-After"]
            assert "batch" in (await resp.json())["error"]["message"]
            resp = await client.post(  # the header works as well as the field
                "/v1/completions",
                json={"model": MODEL, "prompt": "a"},
                headers={"X-SLO-Class": "batch"},
            )
            assert resp.status == 429
            resp = await client.post("/v1/completions", json={"model": MODEL, "prompt": "b"})
            assert resp.status == 200  # interactive still finds room
            assert (await first).status == 200
            assert r.inflight == 0 and r.inflight_by_class == {"interactive": 0, "batch": 0}
        finally:
            await w.close()


async def test_client_disconnect_aborts_on_the_worker(tokenizer_dir, tok):
    async with router(tokenizer_dir) as (_, client, addr):
        w = FakeWorker(addr, "w0", tok.encode("x" * 200), delay_s=0.02)
        await w.start()
        try:
            await wait_ready(client)
            resp = await client.post(
                "/v1/completions",
                json={"model": MODEL, "prompt": "a", "max_tokens": 200, "stream": True},
            )
            await resp.content.readline()
            resp.close()  # the client goes away mid-stream
            for _ in range(100):
                if w.aborted():
                    break
                await asyncio.sleep(0.05)
            assert len(w.aborted()) == 1
        finally:
            await w.close()


class BatchingWorker(FakeWorker):
    """Answers two requests at once, one TokenBatch per 'step' (as the decode worker does),
    with a stray chunk that names another worker in each batch."""

    async def _serve(self) -> None:
        pending = []
        while True:
            msg, _ = decode(await self.sock.recv_multipart())
            self.received.append(msg)
            if isinstance(msg, GenerateRequest):
                pending.append(msg)
            if len(pending) == 2:
                for i, tok in enumerate(self.tokens):
                    finish = "length" if i == len(self.tokens) - 1 else None
                    chunks = [TokenChunk(m.request_id, self.wid, [tok], finish) for m in pending]
                    chunks.append(TokenChunk(pending[0].request_id, "intruder", [tok]))
                    await self.sock.send_multipart(encode(TokenBatch(self.wid, chunks)))
                pending = []


async def test_token_batches_reach_every_request(tokenizer_dir, tok):
    async with router(tokenizer_dir) as (_, client, addr):
        w = BatchingWorker(addr, "w0", tok.encode("Hello, world!"))
        await w.start()
        try:
            await wait_ready(client)

            async def one():
                body = {"model": MODEL, "prompt": "hi", "max_tokens": 50}
                resp = await client.post("/v1/completions", json=body)
                return resp.status, await resp.json()

            for status, body in await asyncio.gather(one(), one()):
                assert status == 200, body
                assert body["choices"][0]["text"] == "Hello, world!"
                assert body["usage"]["completion_tokens"] == 13
        finally:
            await w.close()
