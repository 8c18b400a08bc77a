"""Live migration through the router, against scripted workers: POST /admin/migrate sends a
MigrateRequest to the worker running the request; tokens the destination sends before the
source's MigrationDone are held and delivered after the source's last ones, so the client's
stream has no gap, duplicate or reordering; a failed migration or a dead destination tells
the other side to cancel; bad requests get 4xx."""

from __future__ import annotations

import asyncio
import json
import os

import pytest
import zmq
import zmq.asyncio

from tests.unit.test_router import MODEL, router, tok, tokenizer_dir, wait_ready
from tideserve.protocol import (
    PROTOCOL_VERSION,
    CancelMigration,
    GenerateRequest,
    Heartbeat,
    Hello,
    MigrateRequest,
    MigrationDone,
    MigrationFailed,
    TokenChunk,
    decode,
    encode,
)

__all__ = ["tok", "tokenizer_dir"]
pytestmark = pytest.mark.usefixtures("quiet_gc")


class Scripted:
    """A colocated worker the test drives by hand."""

    def __init__(self, address: str, wid: str) -> None:
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, wid.encode())
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)
        self.wid, self.received, self.beating = wid, [], True
        self.tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        hello = Hello(PROTOCOL_VERSION, self.wid, "colocated", "127.0.0.1", "tcp://127.0.0.1:1",
                      MODEL, 1000, 16, 512, "cpu", os.getpid(), ("tcp",))  # fmt: skip
        await self.send(hello)
        self.tasks = [asyncio.create_task(self._recv()), asyncio.create_task(self._beat())]

    async def send(self, msg) -> None:
        await self.sock.send_multipart(encode(msg))

    async def _recv(self) -> None:
        while True:
            self.received.append(decode(await self.sock.recv_multipart())[0])

    async def _beat(self) -> None:
        while True:
            if self.beating:
                await self.send(Heartbeat(self.wid, "ready", 0, 1, 0, 10, 1000))
            await asyncio.sleep(0.1)

    def got(self, kind) -> list:
        return [m for m in self.received if isinstance(m, kind)]

    async def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.sock.close(0)
        self.ctx.term()


async def _until(cond, timeout_s: float = 5.0):
    for _ in range(int(timeout_s / 0.02)):
        if v := cond():
            return v
        await asyncio.sleep(0.02)
    raise TimeoutError("condition never held")


async def _start_stream(client, tok_ids):
    body = {"model": MODEL, "prompt": "hi", "max_tokens": len(tok_ids), "stream": True}
    return await client.post("/v1/completions", json=body)


async def _read_text(resp) -> tuple[str, str]:
    text, rid = [], ""
    async for line in resp.content:
        line = line.decode().strip()
        if line.startswith("data: {"):
            ev = json.loads(line[6:])
            assert "error" not in ev, ev
            rid = ev["id"]
            text.append(ev["choices"][0]["text"])
    return "".join(text), rid


async def test_migration_keeps_the_stream_whole_even_when_the_destination_is_early(
    tokenizer_dir, tok
):
    ids = tok.encode("abcdef")
    async with router(tokenizer_dir, heartbeat_timeout_s=1.0) as (r, client, addr):
        a, b = Scripted(addr, "a"), Scripted(addr, "b")
        await a.start()
        await b.start()
        try:
            await wait_ready(client)
            await _until(lambda: len(r.cluster.workers) == 2)
            resp_task = asyncio.create_task(_start_stream(client, ids))
            src = await _until(lambda: next((w for w in (a, b) if w.got(GenerateRequest)), None))
            dst = b if src is a else a
            wire = src.got(GenerateRequest)[0].request_id
            rid = next(iter(r.cluster.streams))
            early = await client.post(
                "/admin/migrate", json={"request_id": rid, "to_worker": dst.wid}
            )
            assert early.status == 409  # no token yet: still prefilling, nothing to move
            for t in ids[:3]:
                await src.send(TokenChunk(wire, src.wid, [t]))
            resp = await resp_task
            await _until(lambda: r.cluster.streams[rid].num_tokens_out == 3)

            bad = await client.post("/admin/migrate", json={"request_id": rid, "to_worker": "z"})
            assert bad.status == 404
            bad = await client.post(
                "/admin/migrate", json={"request_id": rid, "to_worker": src.wid}
            )
            assert bad.status == 409  # already there
            ok = await client.post("/admin/migrate", json={"request_id": rid, "to_worker": dst.wid})
            assert ok.status == 200
            [m] = await _until(lambda: src.got(MigrateRequest))
            assert (m.request_id, m.dest_worker_id) == (wire, dst.wid)
            again = await client.post(
                "/admin/migrate", json={"request_id": rid, "to_worker": dst.wid}
            )
            assert again.status == 409  # one migration at a time

            await dst.send(TokenChunk(wire, dst.wid, [ids[4]]))  # the destination is early
            await src.send(TokenChunk(wire, src.wid, [ids[3]]))  # the source's last token
            await src.send(MigrationDone(wire, src.wid, dst.wid, 2, 0.003))
            await dst.send(TokenChunk(wire, dst.wid, [ids[5]], "length"))
            text, _ = await _read_text(resp)
            assert text == tok.decode(ids)
            assert r.cluster.events["migrated"] == 1 and not r.cluster.migrations
            cluster = await (await client.get("/cluster")).json()
            assert cluster["migrations"]["done"] == 1 and cluster["migrations"]["pause_ms_max"]
            metrics = await (await client.get("/metrics")).text()
            assert "tideserve_migration_pause_seconds_count 1.0" in metrics
        finally:
            await a.close()
            await b.close()


async def test_failed_migration_and_dead_destination_cancel_the_other_side(tokenizer_dir, tok):
    ids = tok.encode("wxyz")
    async with router(tokenizer_dir, heartbeat_timeout_s=0.6) as (r, client, addr):
        a, b = Scripted(addr, "a"), Scripted(addr, "b")
        await a.start()
        await b.start()
        try:
            await wait_ready(client)
            await _until(lambda: len(r.cluster.workers) == 2)
            resp_task = asyncio.create_task(_start_stream(client, ids))
            src = await _until(lambda: next((w for w in (a, b) if w.got(GenerateRequest)), None))
            dst = b if src is a else a
            wire = src.got(GenerateRequest)[0].request_id
            await src.send(TokenChunk(wire, src.wid, [ids[0]]))
            resp = await resp_task
            rid = next(iter(r.cluster.streams))
            await _until(lambda: r.cluster.streams[rid].num_tokens_out == 1)
            r.cluster.migrate(rid, dst.wid)
            await src.send(MigrationFailed(wire, src.wid, "the destination refused"))
            await _until(lambda: dst.got(CancelMigration))  # drop what stages it has
            assert r.cluster.streams[rid].migrating_to is None

            r.cluster.migrate(rid, dst.wid)  # again; this time the destination dies
            dst.beating = False
            await _until(lambda: src.got(CancelMigration))  # the source keeps the request
            for t in ids[1:-1]:
                await src.send(TokenChunk(wire, src.wid, [t]))
            await src.send(TokenChunk(wire, src.wid, [ids[-1]], "length"))
            text, _ = await _read_text(resp)
            assert text == tok.decode(ids)
            assert r.cluster.events["migration_failed"] == 1
        finally:
            await a.close()
            await b.close()
