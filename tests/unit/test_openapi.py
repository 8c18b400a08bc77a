"""The published OpenAPI document: valid OpenAPI 3.1, served without a key, covering every
route the app has, and stating the same limits as the request parser."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import TestClient, TestServer

from router.app import build
from router.config import RouterConfig
from router.openai_api import (
    MAX_INT32,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    SEED_RANGE,
    ApiError,
    parse_chat,
    parse_completion,
)
from router.openapi import openapi_schema
from tests.factories import make_tiny_tokenizer
from tideserve.launcher import free_port


@pytest.fixture(scope="module")
def router(tmp_path_factory):
    tok = make_tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    cfg = RouterConfig(
        model_path=str(tok),
        served_model_name="tiny",
        worker_address=f"tcp://127.0.0.1:{free_port()}",
        api_key="secret",
    )
    return build(cfg)


def test_schema_is_valid_openapi_31():
    doc = openapi_schema(1 << 20)
    assert doc["openapi"].startswith("3.1") and doc["info"]["title"] and doc["paths"]
    schemas = doc["components"]["schemas"]
    refs = {r.split("/")[-1] for r in _refs(doc)}
    assert refs <= set(schemas), f"dangling $refs: {refs - set(schemas)}"
    for path, ops in doc["paths"].items():
        for op in ops.values():
            assert op["responses"] and all(code.isdigit() for code in op["responses"]), path
    schemathesis = pytest.importorskip("schemathesis")
    loaded = list(schemathesis.openapi.from_dict(doc).get_all_operations())
    assert len(loaded) == sum(len(ops) for ops in doc["paths"].values())
    assert all(op.ok() for op in loaded)  # every operation parses
    validator = pytest.importorskip("openapi_spec_validator")  # the full meta-schema check
    validator.OpenAPIV31SpecValidator(doc).validate()


def _refs(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref":
                yield v
            yield from _refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _refs(v)


def test_every_route_is_described(router):
    paths = openapi_schema(router.cfg.max_body_bytes)["paths"]
    routed = {
        (r.method.lower(), r.resource.canonical)
        for r in router.app().router.routes()
        if r.method != "HEAD"  # aiohttp adds HEAD beside each GET
    }
    described = {(m, p) for p, ops in paths.items() for m in ops}
    assert routed == described


async def test_schema_is_served_without_the_api_key(router):
    client = TestClient(TestServer(router.app()))
    await client.start_server()
    try:
        resp = await client.get("/openapi.json")
        assert resp.status == 200
        assert await resp.json() == openapi_schema(router.cfg.max_body_bytes)
        assert (await client.get("/v1/models")).status == 401
    finally:
        await client.close()


def _parses(body: dict) -> bool:
    try:
        if "messages" in body:
            parse_chat(body, None, "tiny")
        else:
            parse_completion(body, None, "tiny")
        return True
    except ApiError as e:
        assert e.status == 400
        return False


@pytest.mark.parametrize(
    "field,ok,bad",
    [
        ("max_tokens", [1, MAX_INT32], [0, MAX_INT32 + 1]),
        ("max_completion_tokens", [1, MAX_INT32], [0, MAX_INT32 + 1]),
        ("min_tokens", [0, MAX_INT32], [-1, MAX_INT32 + 1]),
        ("top_k", [-1, MAX_INT32], [-2, MAX_INT32 + 1]),
        ("seed", list(SEED_RANGE), [SEED_RANGE[0] - 1, SEED_RANGE[1] + 1]),
        ("temperature", [0, 2.0], [-0.01, 2.01]),
        ("top_p", [1e-9, 1], [0, 1.01]),
    ],
)
def test_schema_limits_are_the_parser_limits(field, ok, bad):
    props = openapi_schema(1)["components"]["schemas"]["CompletionRequest"]["properties"]
    schema = props[field]
    if "exclusiveMinimum" in schema:
        assert schema["exclusiveMinimum"] == bad[0]
    else:
        assert schema["minimum"] == min(ok)
    assert schema["maximum"] == max(ok)
    for v in ok:
        assert _parses({"prompt": "x", field: v}), (field, v)
    for v in bad:
        assert not _parses({"prompt": "x", field: v}), (field, v)


def test_stop_limits_match():
    props = openapi_schema(1)["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    one, many = props["stop"]["anyOf"][1], props["stop"]["anyOf"][2]
    assert one["maxLength"] == MAX_STOP_STRING_CHARS and many["maxItems"] == MAX_STOP_STRINGS
    msgs = [{"role": "user", "content": "hi"}]
    assert _parses({"messages": msgs, "stop": ["x" * MAX_STOP_STRING_CHARS] * MAX_STOP_STRINGS})
    assert not _parses({"messages": msgs, "stop": ["x" * (MAX_STOP_STRING_CHARS + 1)]})
    assert not _parses({"messages": msgs, "stop": ["x"] * (MAX_STOP_STRINGS + 1)})
