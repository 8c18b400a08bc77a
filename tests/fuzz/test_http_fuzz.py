"""The router's HTTP API fuzzed against its own OpenAPI schema (schemathesis + hypothesis).

A real router listens on 127.0.0.1 in a background thread, with a fast fake colocated worker
(tests/unit/test_router.py's), so generation requests run to completion. Every operation gets
schema-valid cases (positive: the answer is 2xx or 4xx) and schema-violating ones (negative:
the answer is 4xx); no case may get a 5xx, hang past `TIMEOUT_S` or kill the server. Hand-written
hostile bodies (deep nesting, huge numbers, NaN, bad UTF-8, oversized bodies, random paths)
follow as a table. Generation is derandomized, so a run is the same on every machine.
"""

from __future__ import annotations

import asyncio
import collections
import json
import threading

import pytest
import requests
import schemathesis
from aiohttp import web
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from router.app import build
from router.config import RouterConfig
from router.openai_api import MAX_STOP_STRING_CHARS
from router.openapi import openapi_schema
from tests.factories import make_tiny_tokenizer
from tests.unit.test_router import MODEL, FakeWorker
from tideserve.launcher import free_port

TIMEOUT_S = 10.0  # per request: a hang is a failure, not a stuck test
MAX_BODY_BYTES = 1 << 20
POST_PATHS = ("/v1/completions", "/v1/chat/completions")
CONFORMANCE = [status_code_conformance, content_type_conformance, response_schema_conformance]


class LiveRouter:
    """The router's aiohttp app on a real port, and a fake worker, on one event loop in a
    thread of their own; `url` is where it listens."""

    def __init__(self, tokenizer_dir) -> None:
        self.cfg = RouterConfig(
            model_path=str(tokenizer_dir),
            served_model_name=MODEL,
            port=free_port(),
            worker_address=f"tcp://127.0.0.1:{free_port()}",
            max_body_bytes=MAX_BODY_BYTES,
        )
        self.url = f"http://127.0.0.1:{self.cfg.port}"
        self.router = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        self.router = build(self.cfg)
        runner = web.AppRunner(self.router.app(), handler_cancellation=True)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.cfg.port).start()
        tokens = self.router.tokenizer.encode("Hello, fuzzy world!")
        worker = FakeWorker(self.cfg.worker_address, "w0", tokens)
        await worker.start()
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await worker.close()
            await runner.cleanup()

    def start(self) -> LiveRouter:
        self._thread.start()
        assert self._ready.wait(30), "the router did not start"
        for _ in range(100):
            if requests.get(self.url + "/health", timeout=TIMEOUT_S).status_code == 200:
                return self
            self._thread.join(0.05)
        raise TimeoutError("the fake worker never joined the router")

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        if self._loop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    srv = LiveRouter(make_tiny_tokenizer(tmp_path_factory.mktemp("tok"))).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def schema():
    return schemathesis.openapi.from_dict(openapi_schema(MAX_BODY_BYTES))


@pytest.fixture
def session():
    with requests.Session() as s:
        yield s


def fuzz(operation, mode: GenerationMode, num_cases: int, url: str, session) -> collections.Counter:
    """Runs up to `num_cases` generated cases of one operation; returns status-class counts.
    Raises (with hypothesis' minimal failing case) on a 5xx, a timeout, or a negative case
    that is not a 4xx."""
    counts: collections.Counter = collections.Counter()

    @settings(
        max_examples=num_cases,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.generate, Phase.shrink],
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case) -> None:
        resp = case.call(base_url=url, session=session, timeout=TIMEOUT_S)
        status = resp.status_code
        counts[f"{status // 100}xx"] += 1
        what = f"{case.method} {case.path} {mode.value}: {status} {resp.text[:300]!r}\n"
        what += f"body={case.body!r:.500} headers={case.headers!r}"
        assert status < 500, what
        if mode.is_negative:
            assert 400 <= status < 500, what
        case.validate_response(resp, checks=CONFORMANCE)  # documented status, type and shape

    run()
    return counts


def run_all(schema, live: LiveRouter, session, cases_per_post_mode: int) -> collections.Counter:
    total: collections.Counter = collections.Counter()
    for result in schema.get_all_operations():
        op = result.ok()
        is_post = op.path in POST_PATHS
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            if not is_post and mode.is_negative:
                continue  # a GET without parameters has nothing to violate
            n = cases_per_post_mode if is_post else 20
            counts = fuzz(op, mode, n, live.url, session)
            total.update({f"{op.method.upper()} {op.path} {mode.value}": counts.total()})
            total.update({f"{mode.value} {k}": v for k, v in counts.items()})
    total["cases"] = sum(v for k, v in total.items() if k.count(" ") == 2)
    return total


def check_still_serving(live: LiveRouter) -> None:
    assert live.is_alive, "the router's thread died"
    assert requests.get(live.url + "/health", timeout=TIMEOUT_S).status_code == 200
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 5}
    resp = requests.post(live.url + "/v1/completions", json=body, timeout=TIMEOUT_S)
    assert resp.status_code == 200 and resp.json()["choices"][0]["text"] == "Hello"
    assert live.router.inflight == 0 and not live.router.cluster.streams  # nothing leaked


def report(total: collections.Counter) -> None:
    print(f"\nHTTP fuzz: {total['cases']} cases")
    for k, v in sorted(total.items()):
        if k != "cases":
            print(f"  {k}: {v}")


def test_http_fuzz_thousands(schema, live, session):
    total = run_all(schema, live, session, cases_per_post_mode=500)
    report(total)
    assert total["cases"] >= 2000
    assert total["positive 2xx"] >= 300  # valid requests really run on the worker
    check_still_serving(live)


# -- hand-written hostile input ----------------------------------------------------------------


def _completion(**fields) -> bytes:
    return json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 4, **fields}).encode()


HOSTILE = [
    # (what, body bytes, expected status)
    ("not JSON", b"{", 400),
    ("empty body", b"", 400),
    ("invalid UTF-8", b'{"prompt": "\xff\xfe"}', 400),
    ("a JSON array", b"[1, 2]", 400),
    ("a JSON string", b'"hi"', 400),
    ("deep nesting", b"[" * 100_000 + b"]" * 100_000, 400),
    ("deep nesting in a field", b'{"prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", 400),
    ("a 5000-digit integer", b'{"prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}", 400),
    ("NaN temperature", b'{"prompt": "hi", "temperature": NaN}', 400),
    ("Infinity top_p", b'{"prompt": "hi", "top_p": Infinity}', 400),
    ("-Infinity seed", b'{"prompt": "hi", "seed": -Infinity}', 400),
    ("seed past int64", _completion(seed=2**64), 400),
    ("seed below int64", _completion(seed=-(2**63) - 1), 400),
    ("seed at int64 max", _completion(seed=2**63 - 1), 200),
    ("top_k past int32", _completion(top_k=2**63), 400),
    ("max_tokens 10**30", _completion(max_tokens=10**30), 400),
    ("min_tokens 10**30", _completion(min_tokens=10**30), 400),
    ("huge token ids", _completion(prompt=[2**70, -1]), 400),
    ("token id past the vocab", _completion(prompt=[1, 100_000]), 400),
    ("bool token ids", _completion(prompt=[True, False]), 400),
    ("nested token ids", _completion(prompt=[[1, [2]]]), 400),
    ("batch of two", _completion(prompt=["a", "b"]), 400),
    ("five stop strings", _completion(stop=list("abcde")), 400),
    ("a stop string at the cap", _completion(stop="x" * MAX_STOP_STRING_CHARS), 200),
    ("a stop string past the cap", _completion(stop=["x" * (MAX_STOP_STRING_CHARS + 1)]), 400),
    ("a non-string stop", _completion(stop=[1]), 400),
    ("best_of true", _completion(best_of=True), 400),
    ("logprobs 0", _completion(logprobs=0), 400),
    ("empty slo_class", _completion(slo_class=""), 400),
    ("unicode everywhere", _completion(prompt="\U0001f600\u0000\ud7ff\u202e"), 200),
    ("lone surrogate", b'{"model": "tiny", "prompt": "\\ud800", "max_tokens": 2}', 400),
    ("surrogate pair", b'{"model": "tiny", "prompt": "\\ud83d\\ude00", "max_tokens": 2}', 200),
    ("an integer prompt", b'{"prompt": 5}', 400),
    ("integral floats", _completion(prompt=[5.0], max_tokens=2.0, seed=1.0), 200),
    ("fractional max_tokens", _completion(max_tokens=2.5), 400),
    ("max_tokens 1e300", b'{"prompt": "hi", "max_tokens": 1e300}', 400),
    ("body over the limit", b'{"prompt": "' + b"a" * MAX_BODY_BYTES + b'"}', 413),
]


@pytest.mark.parametrize("what,body,expected", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_bodies(live, session, what, body, expected):
    headers = {"Content-Type": "application/json"}
    resp = session.post(live.url + "/v1/completions", data=body, headers=headers, timeout=30)
    assert resp.status_code == expected, resp.text[:500]
    if resp.status_code != 200:
        assert resp.json()["error"]["message"]


def test_hostile_chat_and_headers(live, session):
    post = lambda body, **headers: session.post(
        live.url + "/v1/chat/completions", json=body, headers=headers, timeout=TIMEOUT_S
    )
    msgs = [{"role": "user", "content": "hi"}]
    assert post({"messages": msgs}, **{"X-SLO-Class": "nope"}).status_code == 400
    assert post({"messages": msgs, "slo_class": "batch"}, **{"X-SLO-Class": "x"}).status_code == 400
    assert post({"messages": [{"role": "", "content": "hi"}]}).status_code == 400
    assert post({"messages": [{"role": "user", "content": [{"type": "image"}]}]}).status_code == 400
    assert post({"messages": [{"role": "user", "content": None}]}).status_code == 400
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    assert post({"messages": [{"role": "user", "content": parts}], "max_tokens": 2}).ok
    raw = lambda text: session.post(
        live.url + "/v1/chat/completions", data=text.encode(), timeout=TIMEOUT_S
    )
    for depth in (900, 950, 980, 990, 1000):  # parses, yet may be deeper than re-encoding goes
        deep = "[" * depth + "]" * depth
        body = '{"messages": [{"role": "user", "content": "hi", "x": ' + deep + "}]}"
        assert raw(body).status_code < 500, depth
    assert raw('{"messages": [{"role": "\\udfff", "content": "hi"}]}').status_code == 400
    assert raw('{"messages": [{"role": "u", "content": "hi", "x": "\\ud800"}]}').status_code == 400
    check_still_serving(live)


def test_random_paths_do_not_grow_metrics(live, session):
    """Each unknown path is a 404, not a new metrics series (label cardinality is bounded)."""
    before = len(session.get(live.url + "/metrics", timeout=TIMEOUT_S).text)
    for i in range(200):
        assert session.get(f"{live.url}/nope/{i}", timeout=TIMEOUT_S).status_code == 404
    after = len(session.get(live.url + "/metrics", timeout=TIMEOUT_S).text)
    assert after - before < 2000, "every unknown path became its own metrics series"
    check_still_serving(live)
