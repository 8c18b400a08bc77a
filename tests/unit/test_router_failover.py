"""Worker failure mid-request, against scripted fake workers: the router re-dispatches the
request as its prompt plus the tokens already streamed, the client's text comes out whole
(no token twice, none missing), a request with nowhere to go waits for a worker, and a
dropped worker that comes back is told to rejoin and has its stale work aborted."""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.unit.test_router import MODEL, FakeWorker, router, tok, tokenizer_dir, wait_ready
from tideserve.protocol import GenerateRequest, Rejoin, TokenChunk, encode

__all__ = ["tok", "tokenizer_dir"]  # fixtures, re-used
pytestmark = pytest.mark.usefixtures("quiet_gc")
TEXT = " alpha beta gamma delta epsilon zeta eta theta"


async def _wait(cond, timeout_s: float = 10.0) -> None:
    for _ in range(int(timeout_s / 0.05)):
        if cond():
            return
        await asyncio.sleep(0.05)
    raise TimeoutError("condition never held")


def _sse_text(raw: str) -> tuple[str, list[dict]]:
    events = [json.loads(x[6:]) for x in raw.splitlines() if x.startswith("data: {")]
    return "".join(e["choices"][0]["text"] for e in events if e.get("choices")), events


@pytest.mark.parametrize("stream", [False, True])
async def test_a_worker_dying_mid_stream_is_recomputed_elsewhere(tokenizer_dir, tok, stream):
    script = tok.encode(TEXT)
    prompt = tok.encode("hi")
    async with router(tokenizer_dir, heartbeat_timeout_s=1.0) as (r, client, addr):
        dying = FakeWorker(addr, "a-dies", script, delay_s=0.02, die_after=3, prompt_len=2)
        spare = FakeWorker(addr, "b-spare", script, delay_s=0.02, prompt_len=2)
        await dying.start()
        try:
            await wait_ready(client)
            body = {"model": MODEL, "prompt": prompt, "max_tokens": len(script), "stream": stream}
            task = asyncio.create_task(client.post("/v1/completions", json=body))
            await _wait(lambda: not dying.alive)  # 3 tokens out, then silence
            await spare.start()
            resp = await task
            assert resp.status == 200
            if stream:
                text, events = _sse_text(await resp.text())
                assert events[-1]["choices"][0]["finish_reason"] == "length"
            else:
                out = await resp.json()
                text = out["choices"][0]["text"]
                assert out["usage"]["completion_tokens"] == len(script)
            assert text == TEXT
            resumed = [m for m in spare.received if isinstance(m, GenerateRequest)]
            assert len(resumed) == 1
            assert resumed[0].prompt_token_ids == prompt + script[:3]
            assert resumed[0].params.max_tokens == len(script) - 3
            assert resumed[0].request_id.endswith("~1")  # a wire id of its own
            assert not r.cluster.streams and not r.cluster.wire and not r.cluster.parked
        finally:
            await dying.close()
            await spare.close()


async def test_no_live_worker_parks_until_one_joins_then_times_out(tokenizer_dir, tok):
    script = tok.encode(TEXT)
    async with router(tokenizer_dir, heartbeat_timeout_s=0.6, redispatch_wait_s=3.0) as (
        r,
        client,
        addr,
    ):
        dying = FakeWorker(addr, "a-dies", script, delay_s=0.02, die_after=2, prompt_len=2)
        late = FakeWorker(addr, "c-late", script, delay_s=0.01, prompt_len=2)
        dying2 = FakeWorker(addr, "d-dies", script, delay_s=0.02, die_after=2, prompt_len=2)
        dying3 = FakeWorker(addr, "e-dies", script, delay_s=0.02, die_after=2, prompt_len=2)
        await dying.start()
        try:
            await wait_ready(client)
            body = {"model": MODEL, "prompt": tok.encode("hi"), "max_tokens": len(script)}
            task = asyncio.create_task(client.post("/v1/completions", json=body))
            await _wait(lambda: bool(r.cluster.parked))  # dropped, nowhere to go: it waits
            await late.start()
            resp = await task
            assert (await resp.json())["choices"][0]["text"] == TEXT

            late.beating = late.alive = False  # the only worker goes away for good
            await dying2.start()
            await _wait(lambda: "c-late" not in r.cluster.workers)
            await wait_ready(client)  # d-dies registered: the request goes to it
            body["stream"] = True
            resp = await client.post("/v1/completions", json=body)
            text, events = _sse_text(await resp.text())
            assert resp.status == 200 and "error" in events[-1]  # an error event, not silence
            assert text == TEXT[: len(tok.decode(script[:2]))]

            await _wait(lambda: "d-dies" not in r.cluster.workers)
            await dying3.start()  # not streaming: an error status, never a 200 with half a body
            await wait_ready(client)
            body["stream"] = False
            resp = await client.post("/v1/completions", json=body)
            assert resp.status == 503 and resp.headers["Retry-After"]
            assert "no worker could take it" in (await resp.json())["error"]["message"]
            assert r.cluster.events["failed"] == 2
        finally:
            for w in (dying, late, dying2, dying3):
                await w.close()


async def test_a_dropped_worker_that_returns_is_told_to_rejoin(tokenizer_dir, tok):
    script = tok.encode(TEXT)
    async with router(tokenizer_dir, heartbeat_timeout_s=0.6) as (r, client, addr):
        a = FakeWorker(addr, "a-flaky", script, delay_s=0.02, die_after=2, prompt_len=2)
        b = FakeWorker(addr, "b-steady", script, delay_s=0.02, prompt_len=2)
        await a.start()
        await wait_ready(client)
        try:
            body = {"model": MODEL, "prompt": tok.encode("hi"), "max_tokens": len(script)}
            task = asyncio.create_task(client.post("/v1/completions", json=body))
            await _wait(lambda: not a.alive)
            await b.start()
            await _wait(lambda: "a-flaky" not in r.cluster.workers)
            a.alive = a.beating = True  # the partition heals: a speaks again
            await _wait(lambda: any(isinstance(m, Rejoin) for m in a.received))
            rid = (await (await task).json())["id"]
            # a late token of the old dispatch is stale: dropped, and the worker told to abort
            await a.sock.send_multipart(encode(TokenChunk(rid, "a-flaky", [1])))
            await a.sock.send_multipart(encode(a.hello()))
            await _wait(lambda: "a-flaky" in r.cluster.workers)
            await a.sock.send_multipart(encode(TokenChunk(rid, "a-flaky", [1])))
            await _wait(lambda: rid in a.aborted())
        finally:
            await a.close()
            await b.close()
