"""Module elasticity through the router, against scripted fake workers: /cluster shows each
worker's layer ranges and replicas from its heartbeats, and `POST /admin/workers/{id}/modules`
checks its body against them and sends the worker a `ModuleCommand`."""

from __future__ import annotations

import asyncio

import pytest

from tests.unit.test_router import FakeWorker, router, tokenizer_dir, wait_ready  # noqa: F401
from tideserve.protocol import Heartbeat, LayerReplica, ModuleCommand, encode

pytestmark = pytest.mark.usefixtures("quiet_gc")


class ElasticFake(FakeWorker):
    """Two layer stages [0, 2) and [2, 4); carries out replicate/unreplicate as it hears them."""

    def __init__(self, address: str, wid: str, layers=((0, 2), (2, 4))) -> None:
        super().__init__(address, wid, [1])
        self.layers = [tuple(r) for r in layers]
        self.replicas: list[LayerReplica] = []

    async def _beat(self) -> None:
        while True:
            for m in self.received:
                if isinstance(m, ModuleCommand) and m.action == "replicate":
                    self.replicas = [LayerReplica(m.start, m.end, self.wid, m.share, 0)]
                elif isinstance(m, ModuleCommand) and m.action == "unreplicate":
                    self.replicas = []
            self.received = [m for m in self.received if not isinstance(m, ModuleCommand)]
            hb = Heartbeat(self.wid, "ready", 0, 0, 0, 0, 1000, layers=self.layers,
                           replicas=self.replicas)  # fmt: skip
            await self.sock.send_multipart(encode(hb))
            await asyncio.sleep(0.05)


async def _workers(client) -> dict[str, dict]:
    return {w["id"]: w for w in (await (await client.get("/cluster")).json())["workers"]}


async def _until(client, wid: str, check, timeout_s: float = 5.0) -> dict:
    for _ in range(int(timeout_s / 0.05)):
        w = (await _workers(client)).get(wid)
        if w is not None and check(w):
            return w
        await asyncio.sleep(0.05)
    raise TimeoutError(f"/cluster never showed what was expected for {wid}")


async def test_cluster_shows_layers_and_replicas_and_admin_changes_them(tokenizer_dir):  # noqa: F811
    async with router(tokenizer_dir) as (_, client, addr):
        w = ElasticFake(addr, "e0")
        plain = FakeWorker(addr, "w0", [1])
        await w.start()
        await plain.start()
        try:
            await wait_ready(client)
            got = await _until(client, "e0", lambda j: j["layers"])
            assert got["layers"] == [[0, 2], [2, 4]] and got["replicas"] == []
            assert (await _until(client, "w0", lambda j: True))["layers"] == []  # whole model

            url = "/admin/workers/e0/modules"
            r = await client.post(url, json={"action": "replicate", "layers": [2, 4], "share": 0.5})
            assert r.status == 200, await r.text()
            got = await _until(client, "e0", lambda j: j["replicas"])
            assert got["replicas"] == [{"layers": [2, 4], "host": "e0", "share": 0.5, "seqs": 0}]

            # already replicated, not a stage, not an edge, another host: refused, with why
            for body, status, word in [
                ({"action": "replicate", "layers": [2, 4]}, 409, "already"),
                ({"action": "replicate", "layers": [1, 3]}, 409, "whole stage"),
                ({"action": "migrate", "layers": [0, 1]}, 409, "edge"),
                ({"action": "replicate", "layers": [0, 2], "target": "w0"}, 409, "another"),
            ]:
                r = await client.post(url, json=body)
                assert r.status == status and word in (await r.json())["error"]["message"]

            r = await client.post(url, json={"action": "unreplicate", "layers": [2, 4]})
            assert r.status == 200
            await _until(client, "e0", lambda j: not j["replicas"])
            r = await client.post(url, json={"action": "unreplicate", "layers": [2, 4]})
            assert r.status == 409 and "no replica" in (await r.json())["error"]["message"]
        finally:
            await w.close()
            await plain.close()


@pytest.mark.parametrize(
    "body, param",
    [
        ([1, 2], None),
        ({"layers": [0, 2]}, "action"),
        ({"action": "drop", "layers": [0, 2]}, "action"),
        ({"action": "replicate"}, "layers"),
        ({"action": "replicate", "layers": [2, 2]}, "layers"),
        ({"action": "replicate", "layers": [0, 2.0]}, "layers"),
        ({"action": "replicate", "layers": [0, 1, 2]}, "layers"),
        ({"action": "replicate", "layers": [0, 2], "share": 1}, "share"),
        ({"action": "replicate", "layers": [0, 2], "share": "half"}, "share"),
    ],
)
async def test_bad_module_bodies_are_400_naming_the_field(tokenizer_dir, body, param):  # noqa: F811
    async with router(tokenizer_dir) as (_, client, addr):
        w = ElasticFake(addr, "e0")
        await w.start()
        try:
            await wait_ready(client)
            r = await client.post("/admin/workers/e0/modules", json=body)
            assert r.status == 400
            assert (await r.json())["error"]["param"] == param
            r = await client.post("/admin/workers/nope/modules", json={"action": "replicate"})
            assert r.status == 404
        finally:
            await w.close()


async def test_a_worker_without_layer_stages_is_409(tokenizer_dir):  # noqa: F811
    async with router(tokenizer_dir) as (_, client, addr):
        plain = FakeWorker(addr, "w0", [1])
        await plain.start()
        try:
            await wait_ready(client)
            await _until(client, "w0", lambda j: True)
            body = {"action": "replicate", "layers": [0, 2]}
            r = await client.post("/admin/workers/w0/modules", json=body)
            assert r.status == 409 and "--layer-stages" in (await r.json())["error"]["message"]
            assert not any(isinstance(m, ModuleCommand) for m in plain.received)
        finally:
            await plain.close()
