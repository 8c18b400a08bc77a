"""API-key authentication on the router's HTTP API, in-process with no workers (/v1/models
answers without one; a generation endpoint that gets past the key answers 503).

What a client notices: with no key configured nothing changes; with one, /v1/* and unknown
paths answer an OpenAI-shaped 401 unless the request carries `Authorization: Bearer <key>`,
/health stays open, /metrics is open unless protect_metrics, /cluster always needs the key,
the official openai client works with the key, and the key never shows up in a log.
"""

from __future__ import annotations

import contextlib
import logging

import pytest
from aiohttp.test_utils import TestClient, TestServer

from router.app import build
from router.config import RouterConfig
from tests.factories import make_tiny_tokenizer
from tideserve.launcher import free_port

MODEL = "tiny"
KEY = "sk-tideserve-test-0123456789"
BEARER = {"Authorization": f"Bearer {KEY}"}


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
    client = TestClient(TestServer(build(cfg).app()))
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()


async def assert_401(resp) -> dict:
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    body = await resp.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "authentication_error"
    assert body["error"]["code"] == "invalid_api_key"
    assert KEY not in body["error"]["message"]
    return body


async def test_no_key_configured_is_open(tokenizer_dir):
    async with router(tokenizer_dir) as client:
        assert (await client.get("/v1/models")).status == 200
        assert (await client.get("/cluster")).status == 200
        assert (await client.get("/metrics")).status == 200


async def test_v1_needs_the_bearer_key(tokenizer_dir):
    async with router(tokenizer_dir, api_key=KEY) as client:
        await assert_401(await client.get("/v1/models"))
        body = await assert_401(
            await client.get("/v1/models", headers={"Authorization": "Bearer wrong"})
        )
        assert "incorrect" in body["error"]["message"]
        await assert_401(
            await client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}x"})
        )
        await assert_401(await client.get("/v1/models", headers={"Authorization": KEY}))
        body = await assert_401(
            await client.get("/v1/models", headers={"Authorization": f"Basic {KEY}"})
        )
        assert "Bearer" in body["error"]["message"]
        resp = await client.get("/v1/models", headers=BEARER)
        assert resp.status == 200 and (await resp.json())["data"][0]["id"] == MODEL
        resp = await client.get("/v1/models", headers={"Authorization": f"bearer  {KEY}"})
        assert resp.status == 200  # the scheme is case-insensitive


async def test_key_is_checked_before_the_body_or_the_route(tokenizer_dir):
    async with router(tokenizer_dir, api_key=KEY) as client:
        await assert_401(await client.post("/v1/completions", data=b"not json"))
        await assert_401(await client.post("/v1/chat/completions", json={"model": MODEL}))
        await assert_401(await client.get("/v1/no-such-endpoint"))
        await assert_401(await client.get("/admin/anything"))
        resp = await client.post(
            "/v1/completions", json={"model": MODEL, "prompt": "hi"}, headers=BEARER
        )
        assert resp.status == 503  # past the key: no worker is ready
        assert (await client.get("/v1/no-such-endpoint", headers=BEARER)).status == 404


async def test_health_stays_open_and_cluster_needs_the_key(tokenizer_dir):
    async with router(tokenizer_dir, api_key=KEY) as client:
        assert (await client.get("/health")).status == 503  # answered: no worker yet
        assert (await client.head("/health")).status == 503
        await assert_401(await client.get("/cluster"))
        assert (await client.get("/cluster", headers=BEARER)).status == 200


@pytest.mark.parametrize("protect_metrics", [False, True])
async def test_metrics_protected_only_on_request(tokenizer_dir, protect_metrics):
    async with router(tokenizer_dir, api_key=KEY, protect_metrics=protect_metrics) as client:
        await assert_401(await client.get("/v1/models"))
        resp = await client.get("/metrics")
        if protect_metrics:
            await assert_401(resp)
        else:
            assert resp.status == 200
        resp = await client.get("/metrics", headers=BEARER)
        assert resp.status == 200
        assert 'status="401"' in await resp.text()  # refusals are counted like other errors


async def test_openai_client_with_the_key(tokenizer_dir):
    openai = pytest.importorskip("openai")
    async with router(tokenizer_dir, api_key=KEY) as client:
        base = str(client.make_url("/v1"))
        good = openai.AsyncOpenAI(base_url=base, api_key=KEY, max_retries=0)
        bad = openai.AsyncOpenAI(base_url=base, api_key="sk-wrong", max_retries=0)
        try:
            models = await good.models.list()
            assert [m.id for m in models.data] == [MODEL]
            with pytest.raises(openai.AuthenticationError):
                await bad.models.list()
        finally:
            await good.close()
            await bad.close()


async def test_the_key_is_never_logged(tokenizer_dir, caplog):
    caplog.set_level(logging.DEBUG)
    cfg = RouterConfig(model_path=str(tokenizer_dir), api_key=KEY)
    assert KEY not in repr(cfg)
    async with router(tokenizer_dir, api_key=KEY) as client:
        await client.get("/v1/models", headers={"Authorization": f"Bearer {KEY[:-1]}"})
        await client.get("/v1/models", headers=BEARER)
        await client.post("/v1/completions", data=b"{", headers=BEARER)
    assert caplog.records  # something was logged, and none of it is the key
    assert KEY not in caplog.text and KEY[:-1] not in caplog.text


def test_config_rejects_a_useless_or_odd_key(tokenizer_dir):
    with pytest.raises(ValueError, match="whitespace"):
        RouterConfig(model_path=str(tokenizer_dir), api_key="two words")
    with pytest.raises(ValueError, match="needs an api_key"):
        RouterConfig(model_path=str(tokenizer_dir), protect_metrics=True)
