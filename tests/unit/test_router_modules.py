"""Module elasticity through the router, against scripted fake workers: /cluster shows each
worker's layer ranges and replicas from its heartbeats, and `POST /admin/workers/{id}/modules`
checks its body against them and sends the worker a `ModuleCommand`."""

from __future__ import annotations

import asyncio

import pytest

from tests.unit.test_router import FakeWorker, router, tokenizer_dir, wait_ready  # noqa: F401
from tideserve.protocol import Heartbeat, HostReplica, LayerReplica, ModuleCommand, encode

pytestmark = pytest.mark.usefixtures("quiet_gc")


class ElasticFake(FakeWorker):
    """Two layer stages [0, 2) and [2, 4); carries out replicate/unreplicate as it hears them.
    With a target it asks the router to have the target host the replica (HostReplica), as the
    real worker does; a HostReplica it gets is listed as hosted until an unreplicate is seen by
    its head (`hosted_by_others` is cleared by the test)."""

    def __init__(self, address: str, wid: str, layers=((0, 2), (2, 4))) -> None:
        super().__init__(address, wid, [1])
        self.layers = [tuple(r) for r in layers]
        self.replicas: list[LayerReplica] = []
        self.hosted: list[LayerReplica] = []
        self.host_asks: list[HostReplica] = []
        self.commands: list[ModuleCommand] = []

    async def _beat(self) -> None:
        while True:
            self.commands += [m for m in self.received if isinstance(m, ModuleCommand)]
            for m in self.received:
                if isinstance(m, ModuleCommand) and m.action == "replicate":
                    host = m.target or self.wid
                    self.replicas = [LayerReplica(m.start, m.end, host, m.share, 0)]
                    if m.target:
                        ask = HostReplica(self.wid, m.target, m.start, m.end, m.share, 100,
                                          "tcp://h:1", "tcp://h:2")  # fmt: skip
                        await self.sock.send_multipart(encode(ask))
                elif isinstance(m, ModuleCommand) and m.action == "unreplicate":
                    self.replicas = []
                elif isinstance(m, HostReplica):
                    self.host_asks.append(m)
                    self.hosted = [LayerReplica(m.start, m.end, self.wid, m.share, 0,
                                                m.worker_id, 4096)]  # fmt: skip
            self.received = [
                m for m in self.received if not isinstance(m, (ModuleCommand, HostReplica))
            ]
            hb = Heartbeat(self.wid, "ready", 0, 0, 0, 0, 1000, layers=self.layers,
                           replicas=self.replicas + self.hosted)  # fmt: skip
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
        ({"action": "shrink", "layers": [0, 2]}, "action"),
        ({"action": "drop", "layers": [0, 2]}, "target"),  # drop/restore need a partner
        ({"action": "restore", "target": "e0"}, "target"),  # not itself
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


async def test_replicate_onto_another_worker_goes_through_the_router(tokenizer_dir):  # noqa: F811
    """The hot worker gets the command with its target, its HostReplica reaches the target
    through the router, and /cluster shows the replica on both; the 409 rules for targets."""
    async with router(tokenizer_dir) as (_, client, addr):
        hot, spare, third = ElasticFake(addr, "hot"), ElasticFake(addr, "spare"), None
        plain = FakeWorker(addr, "w0", [1])
        for w in (hot, spare, plain):
            await w.start()
        try:
            await wait_ready(client)
            for wid in ("hot", "spare", "w0"):
                await _until(client, wid, lambda j: True)
            url = "/admin/workers/hot/modules"
            for body, word in [
                ({"action": "replicate", "layers": [2, 4], "target": "nope"}, "not a registered"),
                ({"action": "replicate", "layers": [0, 2], "target": "spare"}, "layer 0"),
                ({"action": "migrate", "layers": [1, 2], "target": "spare"}, "whole stage"),
                ({"action": "migrate", "layers": [0, 2], "target": "spare"}, "layer 0"),
                ({"action": "migrate", "layers": [2, 4], "target": "nope"}, "not a registered"),
            ]:
                r = await client.post(url, json=body)
                assert r.status == 409, await r.text()
                assert word in (await r.json())["error"]["message"]
            r = await client.post(url, json={"action": "replicate", "layers": [2, 4], "target": 3})
            assert r.status == 400 and (await r.json())["error"]["param"] == "target"
            assert not any(isinstance(m, ModuleCommand) for m in hot.received)

            body = {"action": "replicate", "layers": [2, 4], "share": 0.25, "target": "spare"}
            r = await client.post(url, json=body)
            assert r.status == 200, await r.text()
            got = await _until(client, "hot", lambda j: j["replicas"])
            assert got["replicas"] == [{"layers": [2, 4], "host": "spare", "share": 0.25,
                                        "seqs": 0}]  # fmt: skip
            on_spare = await _until(client, "spare", lambda j: j["replicas"])
            want = {"layers": [2, 4], "host": "spare", "share": 0.25, "seqs": 0, "for": "hot"}
            assert on_spare["replicas"] == [{**want, "kv_bytes": 4096}]
            (ask,) = spare.host_asks
            assert (ask.worker_id, ask.start, ask.end, ask.num_kv_blocks) == ("hot", 2, 4, 100)

            # the spare hosts one already; a hosted replica is not the spare's own
            third = ElasticFake(addr, "third")
            await third.start()
            await _until(client, "third", lambda j: j["layers"])
            r = await client.post("/admin/workers/third/modules", json=body)
            assert r.status == 409 and "already hosts" in (await r.json())["error"]["message"]
            r = await client.post("/admin/workers/spare/modules",
                                  json={"action": "unreplicate", "layers": [2, 4]})  # fmt: skip
            assert r.status == 409 and "no replica" in (await r.json())["error"]["message"]
            # unreplicate naming the wrong host is refused; naming the right one goes to hot
            r = await client.post(url, json={"action": "unreplicate", "layers": [2, 4],
                                             "target": "w0"})  # fmt: skip
            assert r.status == 409 and "is on spare" in (await r.json())["error"]["message"]
            r = await client.post(url, json={"action": "unreplicate", "layers": [2, 4],
                                             "target": "spare"})  # fmt: skip
            assert r.status == 200
            await _until(client, "hot", lambda j: not j["replicas"])
            # migrate a whole stage onto another worker: the same checks (spare still hosts)
            mig = {"action": "migrate", "layers": [2, 4], "target": "spare"}
            r = await client.post(url, json=mig)
            assert r.status == 409 and "already hosts" in (await r.json())["error"]["message"]
            r = await client.post(url, json={**mig, "target": "third"})
            assert r.status == 200, await r.text()
            for _ in range(100):
                if any(m.action == "migrate" for m in hot.commands):
                    break
                await asyncio.sleep(0.02)
            (m,) = [m for m in hot.commands if m.action == "migrate"]
            assert (m.start, m.end, m.target) == (2, 4, "third")
        finally:
            for w in (hot, spare, plain, third):
                if w is not None:
                    await w.close()
