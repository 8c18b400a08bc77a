"""The router's HTTP API (aiohttp): OpenAI completions and chat completions, streaming or not.

A request: parse and validate (400s) -> chat template and tokenize -> check the context length
-> admit (429 when `max_inflight_requests` are in flight, 503 when no worker is ready) ->
`Cluster.submit` picks the workers -> TokenChunks arrive on the request's Stream ->
incremental detokenization and stop strings -> SSE chunks or one JSON body. A client that goes
away, or a stop string, aborts the request on every worker, which frees its KV.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import json
import logging
import time
import uuid
from pathlib import Path

import msgspec
from aiohttp import web

from router.auth import api_key_middleware
from router.cluster import Cluster, NoCapacity, PadgConfig, Stream
from router.config import RouterConfig
from router.metrics import RouterMetrics
from router.openai_api import (
    ApiError,
    GenerationSpec,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    models_response,
    parse_chat,
    parse_completion,
    usage,
    usage_chunk,
)
from router.openapi import openapi_schema
from router.window import SlidingWindow
from tideserve.engine.stop import StopChecker
from tideserve.engine.tokenizer import IncrementalDetokenizer, Tokenizer
from tideserve.protocol import ModuleCommand, RequestFailed, TokenChunk
from tideserve.security import load_curve_keys, warn_if_exposed

log = logging.getLogger(__name__)
RETRY_AFTER_S = "1"
current_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


class Router:
    def __init__(self, cfg: RouterConfig, tokenizer: Tokenizer, cluster: Cluster) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.cluster = cluster
        self.model = cfg.served_model_name or Path(cfg.model_path).name
        self.metrics = RouterMetrics(lambda: cluster.events, lambda: cluster.kv_transfers)
        self.pauses: collections.deque[float] = collections.deque(maxlen=1000)

        def on_pause(s: float) -> None:
            self.metrics.migration_pause.observe(s)
            self.pauses.append(s)

        cluster.on_migration_pause = on_pause
        self.created = int(time.time())
        self.inflight = 0
        self.inflight_by_class = dict.fromkeys(cfg.admission_limits, 0)
        self.waiting_by_class = dict.fromkeys(cfg.admission_limits, 0)  # no first token yet
        self.window = SlidingWindow(cfg.stats_window_s)

    # -- plumbing ------------------------------------------------------------------------------

    def app(self) -> web.Application:
        middlewares = [self.errors]  # outermost first: 401s are counted in the metrics too
        if self.cfg.api_key:
            middlewares.append(api_key_middleware(self.cfg.api_key, self.cfg.protect_metrics))
        app = web.Application(client_max_size=self.cfg.max_body_bytes, middlewares=middlewares)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.prometheus)
        app.router.add_get("/cluster", self.cluster_state)
        app.router.add_get("/openapi.json", self.openapi)
        app.router.add_get("/admin/stats", self.admin_stats)
        app.router.add_post("/admin/workers/{worker_id}/drain", self.admin_drain)
        app.router.add_post("/admin/workers/{worker_id}/resume", self.admin_resume)
        app.router.add_post("/admin/workers/{worker_id}/limits", self.admin_limits)
        app.router.add_post("/admin/workers/{worker_id}/role", self.admin_role)
        app.router.add_post("/admin/workers/{worker_id}/modules", self.admin_modules)
        app.router.add_post("/admin/migrate", self.admin_migrate)
        app.router.add_get("/admin/requests", self.admin_requests)
        app.on_startup.append(lambda _: self.cluster.start())
        app.on_cleanup.append(lambda _: self.cluster.close())
        return app

    @web.middleware
    async def errors(self, request: web.Request, handler):
        resource = request.match_info.route.resource  # NOTE: not the raw path, which a client
        endpoint = resource.canonical if resource is not None else "unmatched"  # could vary
        try:
            resp = await handler(request)
        except ApiError as e:
            resp = _error(e)
        except web.HTTPRequestEntityTooLarge:
            resp = _error(ApiError(413, f"request body exceeds {self.cfg.max_body_bytes} bytes"))
        except web.HTTPException as e:
            resp = _error(ApiError(e.status, e.reason or "HTTP error"))
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception:
            rid = current_request_id.get()
            log.exception("request %s: internal error", rid)
            resp = _error(ApiError(500, f"internal error (request id {rid})", "internal_error"))
        self.metrics.requests.labels(endpoint, str(resp.status)).inc()
        return resp

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response(
            models_response(self.model, self.cluster.max_model_len, self.created)
        )

    async def health(self, request: web.Request) -> web.Response:
        ok = self.cluster.is_ready
        return web.json_response(
            {"status": "ok" if ok else "unavailable"}, status=200 if ok else 503
        )

    async def prometheus(self, request: web.Request) -> web.Response:
        self.metrics.inflight.set(self.inflight)
        self.metrics.migrations_inflight.set(len(self.cluster.migrations))
        body = self.metrics.render(list(self.cluster.workers.values()))
        return web.Response(body=body, content_type="text/plain", charset="utf-8")

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(openapi_schema(self.cfg.max_body_bytes))

    async def cluster_state(self, request: web.Request) -> web.Response:
        workers = self._workers_json()
        return web.json_response(
            {
                "workers": workers,
                "requests_inflight": self.inflight,
                "requests_inflight_by_class": self.inflight_by_class,
                "requests_parked": len(self.cluster.parked),
                "migrations": self._migrations_json(),
                "kv_transfers": dict(self.cluster.kv_transfers),
            }
        )

    def _migrations_json(self) -> dict:
        c, now = self.cluster, time.monotonic()
        pauses = sorted(self.pauses)
        return {
            "inflight": [
                {"request_id": c.wire.get(w, w), "from": src, "to": dst, "for_s": now - t}
                for w, (src, dst, t) in c.migrations.items()
            ],
            "done": c.events["migrated"],
            "failed": c.events["migration_failed"],
            "pause_ms_p50": 1e3 * pauses[len(pauses) // 2] if pauses else None,
            "pause_ms_max": 1e3 * pauses[-1] if pauses else None,
        }

    def _workers_json(self) -> list[dict]:
        c = self.cluster
        out = []
        for wid, w in c.workers.items():
            j = w.as_json(c.requests_on(wid))
            if w.hello.role == "partial":
                group, active = c.macro_of(wid)
                st = w.stats
                j |= {
                    "macro_instance": group,
                    "prefill_active": active,
                    "phase": st.phase if st else "",
                    "min_slack_s": st.min_slack_s if st and st.min_slack_s >= 0 else None,
                }
            out.append(j)
        return out

    # -- admin: what the autoscaler reads and does ---------------------------------------------

    async def admin_stats(self, request: web.Request) -> web.Response:
        """The cluster over the last `stats_window_s`: the autoscaler's observation."""
        now, w = time.monotonic(), self.window
        return web.json_response(
            {
                "time": time.time(),
                "window_s": w.window_s,
                "decode_tokens_per_s": w.rate(now, "completion"),
                "prefill_tokens_per_s": w.rate(now, "prompt"),
                "ttft_p90_s": w.p90(now, "ttft"),
                "tpot_p90_s": w.p90(now, "tpot"),
                "inflight": self.inflight_by_class,
                "waiting": self.waiting_by_class,
                "parked": len(self.cluster.parked),
                "batch_oldest_wait_s": max(
                    (
                        now - s.admitted_at
                        for s in self.cluster.streams.values()
                        if s.waiting and s.priority > 0
                    ),
                    default=None,
                ),  # fmt: skip
                "workers": self._workers_json(),
            }
        )

    def _worker(self, request: web.Request) -> str:
        wid = request.match_info["worker_id"]
        if wid not in self.cluster.workers:
            raise ApiError(404, f"no worker {wid!r}", "not_found_error", "worker_id")
        return wid

    async def admin_drain(self, request: web.Request) -> web.Response:
        """No new work for the worker; its requests finish there, or with {"migrate": true}
        move to other workers. Poll `requests` until 0."""
        wid = self._worker(request)
        body = await _json(request) if request.can_read_body else {}
        migrate = isinstance(body, dict) and body.get("migrate") is True
        w = self.cluster.drain(wid, migrate=migrate)
        return web.json_response(w.as_json(self.cluster.requests_on(wid)))

    async def admin_resume(self, request: web.Request) -> web.Response:
        wid = self._worker(request)
        w = self.cluster.drain(wid, on=False)
        return web.json_response(w.as_json(self.cluster.requests_on(wid)))

    async def admin_limits(self, request: web.Request) -> web.Response:
        wid = self._worker(request)
        body = await _json(request)
        n = body.get("max_num_seqs") if isinstance(body, dict) else None
        if type(n) is not int or not 1 <= n <= 1 << 16:
            raise ApiError(400, "max_num_seqs must be an integer in 1..65536", param="max_num_seqs")
        self.cluster.set_limits(wid, n)
        return web.json_response({"id": wid, "max_num_seqs": n})

    async def admin_requests(self, request: web.Request) -> web.Response:
        """Every request in flight: where it runs and how far it got."""
        return web.json_response(
            {
                "requests": [
                    {
                        "request_id": s.request_id,
                        "prefill_worker": s.prefill,
                        "worker": s.target,
                        "tokens_out": s.num_tokens_out,
                        "dispatches": s.dispatches,
                        "migrating_to": s.migrating_to,
                        "parked": s.parked_until is not None,
                    }
                    for s in self.cluster.streams.values()
                ]
            }
        )

    async def admin_migrate(self, request: web.Request) -> web.Response:
        """Moves one running request, KV and all, to another decode worker."""
        body = await _json(request)
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        rid, to = body.get("request_id"), body.get("to_worker")
        if not isinstance(rid, str) or not isinstance(to, str):
            raise ApiError(400, "request_id and to_worker must be strings", param="request_id")
        if rid not in self.cluster.streams:
            raise ApiError(404, f"no running request {rid!r}", "not_found_error", "request_id")
        if to not in self.cluster.workers:
            raise ApiError(404, f"no worker {to!r}", "not_found_error", "to_worker")
        try:
            self.cluster.migrate(rid, to)
        except ValueError as e:
            raise ApiError(409, str(e), "conflict_error") from None
        return web.json_response({"request_id": rid, "to_worker": to, "status": "migrating"})

    async def admin_role(self, request: web.Request) -> web.Response:
        """Switches a drained, idle worker to another role (it keeps its weights)."""
        wid = self._worker(request)
        body = await _json(request)
        role = body.get("role") if isinstance(body, dict) else None
        if role not in ("prefill", "decode", "colocated", "partial"):
            raise ApiError(400, "role must be prefill, decode, colocated or partial", param="role")
        try:
            self.cluster.switch_role(wid, role)
        except ValueError as e:
            raise ApiError(409, str(e), "conflict_error") from None
        return web.json_response({"id": wid, "role": role, "status": "switching"})

    async def admin_modules(self, request: web.Request) -> web.Response:
        """Changes an elastic worker's layers between two of its steps: {"action": "replicate"|
        "unreplicate"|"migrate", "layers": [start, end], "share": 0.5, "target": a worker id
        (default: itself) to host the replica, or to move a whole stage to with migrate; an
        unreplicate moves it back}, or {"action": "drop"|"restore", "target": the partner}. The
        worker's next heartbeat (on /cluster) shows the result."""
        wid = self._worker(request)
        body = await _json(request)
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        action = body.get("action")
        if action in ("drop", "restore"):  # KunServe: a pair of workers, no layers needed
            partner = body.get("target")
            if not isinstance(partner, str) or not partner or partner == wid:
                raise ApiError(400, f"{action} needs target: the partner worker's id",
                               param="target")  # fmt: skip
            try:
                sent = self.cluster.drop_layers(wid, partner, action == "drop")
            except ValueError as e:
                raise ApiError(409, str(e), "conflict_error") from None
            return web.json_response({"id": wid, "action": action, "target": partner,
                                      "layers": sent, "status": "sent"})  # fmt: skip
        if action not in ("replicate", "unreplicate", "migrate"):
            raise ApiError(400, "action must be replicate, unreplicate, migrate, drop or restore",
                           param="action")  # fmt: skip
        layers, share = body.get("layers"), body.get("share", 0.5)
        if (
            not isinstance(layers, list)
            or len(layers) != 2
            or any(type(x) is not int for x in layers)
            or not 0 <= layers[0] < layers[1]
        ):
            raise ApiError(400, "layers must be [start, end] with 0 <= start < end", param="layers")
        if type(share) not in (int, float) or not 0 < share < 1:
            raise ApiError(400, "share must be a number in (0, 1)", param="share")
        target = body.get("target", wid)
        if not isinstance(target, str) or not target:
            raise ApiError(400, "target must be a worker id", param="target")
        cmd = ModuleCommand(action, layers[0], layers[1], float(share),
                            "" if target == wid else target)  # fmt: skip
        try:
            self.cluster.change_modules(wid, cmd)
        except ValueError as e:
            raise ApiError(409, str(e), "conflict_error") from None
        return web.json_response({"id": wid, "action": action, "layers": layers, "status": "sent"})

    # -- the two generation endpoints ----------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        spec = parse_completion(await _json(request), _slo_header(request), self.model)
        return await self._generate(request, spec, "cmpl", chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        spec = parse_chat(await _json(request), _slo_header(request), self.model)
        return await self._generate(request, spec, "chatcmpl", chat=True)

    async def _generate(self, request, spec: GenerationSpec, prefix: str, chat: bool):
        if spec.model != self.model:
            raise ApiError(
                404,
                f"model {spec.model!r} does not exist; this server serves {self.model!r}",
                "not_found_error",
                "model",
                "model_not_found",
            )
        self._admit(spec.slo_class)  # before any costly work: a rejection must be cheap
        prompt_ids = self._tokenize(spec)
        max_tokens = self._check_length(spec, len(prompt_ids))
        rid = f"{prefix}-{uuid.uuid4().hex}"
        current_request_id.set(rid)
        stream = Stream(rid, prompt_ids, spec.params(max_tokens), spec.priority)
        try:
            self.cluster.submit(stream)
        except NoCapacity as e:
            raise _overloaded(503, f"no worker is ready to serve this request: {e}") from None
        self.inflight += 1
        self.inflight_by_class[spec.slo_class] += 1
        self.waiting_by_class[spec.slo_class] += 1
        stream.waiting = True  # until its first token: the autoscaler's queue signal
        gen = self._events(stream, spec)
        try:
            if spec.stream:
                return await self._sse(request, rid, spec, chat, gen, len(prompt_ids))
            return await self._whole(rid, spec, chat, gen, len(prompt_ids))
        finally:
            self.inflight -= 1
            self.inflight_by_class[spec.slo_class] -= 1
            if stream.waiting:
                self.waiting_by_class[spec.slo_class] -= 1
            self.cluster.abort(rid)  # no-op once finished; frees KV on a disconnect or error

    def _admit(self, slo_class: str) -> None:
        """429 past the in-flight limit, or past the request's SLO class share of it."""
        if self.inflight >= self.cfg.max_inflight_requests:
            raise _overloaded(429, "too many requests in flight; retry shortly")
        limit = self.cfg.admission_limits[slo_class]
        if self.inflight_by_class[slo_class] >= limit:
            raise _overloaded(
                429, f"too many {slo_class} requests in flight (limit {limit}); retry shortly"
            )

    def _tokenize(self, spec: GenerationSpec) -> list[int]:
        try:
            if spec.messages is not None:
                return self.tokenizer.apply_chat_template(
                    spec.messages, add_generation_prompt=True, tokenize=True
                )
            if isinstance(spec.prompt, str):
                return self.tokenizer.encode(spec.prompt)
            self.tokenizer.check_ids(spec.prompt)
            return list(spec.prompt)
        except ValueError as e:
            raise ApiError(400, str(e), param="messages" if spec.messages else "prompt") from None

    def _check_length(self, spec: GenerationSpec, n: int) -> int:
        ctx = self.cluster.max_model_len
        if ctx is None:
            raise _overloaded(503, "no worker is ready yet")
        limit = f"this model's maximum context length is {ctx} tokens"
        if n >= ctx:
            msg = f"{limit}, but the prompt has {n} tokens; shorten it"
            raise ApiError(400, msg, param="prompt", code="context_length_exceeded")
        if spec.max_tokens is None:
            return ctx - n
        if n + spec.max_tokens > ctx:
            msg = (
                f"{limit}; you requested {n + spec.max_tokens} ({n} in the prompt, "
                f"{spec.max_tokens} to generate); lower max_tokens"
            )
            raise ApiError(400, msg, param="max_tokens", code="context_length_exceeded")
        return spec.max_tokens

    # -- token events -> text --------------------------------------------------------------------

    async def _events(self, stream: Stream, spec: GenerationSpec):
        """Yields (text_delta, finish_reason, completion_tokens); finish_reason ends it."""
        detok = IncrementalDetokenizer(self.tokenizer)
        stop = StopChecker(spec.stop)
        t0 = time.monotonic()
        t_first = None
        n = 0
        labels = (spec.slo_class,)
        queue = stream.queue
        while True:
            try:
                if queue.empty():  # NOTE: a timer, not wait_for's task per token
                    async with asyncio.timeout(self.cfg.request_timeout_s):
                        msg = await queue.get()
                else:
                    msg = queue.get_nowait()
            except TimeoutError:
                raise ApiError(
                    504,
                    f"no token in {self.cfg.request_timeout_s:.0f} s; request aborted",
                    "timeout_error",
                ) from None
            if isinstance(msg, RequestFailed):
                raise ApiError(
                    503 if msg.retryable else 400 if n == 0 else 500,
                    msg.message,
                    "server_error" if msg.retryable else "invalid_request_error",
                )
            assert isinstance(msg, TokenChunk)
            now = time.monotonic()
            if t_first is None:
                t_first = now
                self.metrics.ttft.labels(*labels).observe(t_first - t0)
                stream.waiting = False
                self.waiting_by_class[spec.slo_class] -= 1
                self.window.add_tokens(now, "prompt", len(stream.prompt_token_ids))
                if spec.slo_class == "interactive":
                    self.window.add_latency(now, "ttft", t_first - t0)
            n += len(msg.token_ids)
            self.window.add_tokens(now, "completion", len(msg.token_ids))
            text, stopped = stop.feed(detok.add(msg.token_ids))
            finish = "stop" if stopped else msg.finish_reason
            if finish is not None:
                if not stopped:
                    text2, stopped = stop.feed(detok.flush())
                    text += text2 + ("" if stopped else stop.flush())
                self._observe_end(labels, t0, t_first, n, len(stream.prompt_token_ids))
                yield text, finish, n
                return
            if text:
                yield text, None, n

    def _observe_end(self, labels, t0: float, t_first: float, n: int, num_prompt: int) -> None:
        now = time.monotonic()
        self.metrics.e2e.labels(*labels).observe(now - t0)
        if n > 1:
            self.metrics.tpot.labels(*labels).observe((now - t_first) / (n - 1))
            if labels[0] == "interactive":
                self.window.add_latency(now, "tpot", (now - t_first) / (n - 1))
        self.metrics.tokens.labels("prompt").inc(num_prompt)
        self.metrics.tokens.labels("completion").inc(n)

    async def _whole(self, rid: str, spec: GenerationSpec, chat: bool, gen, num_prompt: int):
        parts, finish, n = [], None, 0
        async for text, fin, count in gen:
            parts.append(text)
            finish, n = fin, count
        text = "".join(parts)
        u = usage(num_prompt, n)
        if chat:
            return web.json_response(
                chat_response(rid, self.model, int(time.time()), text, finish, u)
            )
        if spec.echo and isinstance(spec.prompt, str):
            text = spec.prompt + text
        return web.json_response(
            completion_response(rid, self.model, int(time.time()), text, finish, u)
        )

    async def _sse(self, request, rid: str, spec: GenerationSpec, chat: bool, gen, num_prompt: int):
        created = int(time.time())
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        first = None
        try:  # the first event before the headers: errors still get a proper status
            first = await gen.__anext__()
        except StopAsyncIteration:
            pass
        await resp.prepare(request)

        async def send(obj: dict | None) -> None:
            payload = b"[DONE]" if obj is None else _json_bytes(obj)
            await resp.write(b"data: " + payload + b"\n\n")

        try:
            await self._stream_events(
                send, rid, created, spec, chat, _chain(first, gen), num_prompt
            )
            await resp.write_eof()
        except ConnectionResetError:
            pass  # the client left; _generate's cleanup aborts the request on its workers
        return resp

    async def _stream_events(self, send, rid, created, spec, chat: bool, events, num_prompt: int):
        if chat:
            role = {"role": "assistant", "content": ""}
            await send(chat_chunk(rid, self.model, created, role, None))
        n = 0
        try:
            async for text, finish, count in events:
                n = count
                if chat:
                    delta = {"content": text} if text else {}
                    await send(chat_chunk(rid, self.model, created, delta, finish))
                else:
                    await send(completion_chunk(rid, self.model, created, text, finish))
        except ApiError as e:
            await send(e.body())
        if spec.include_usage:
            obj = "chat.completion.chunk" if chat else "text_completion"
            await send(usage_chunk(rid, self.model, created, obj, usage(num_prompt, n)))
        await send(None)  # data: [DONE]


_json_encoder = msgspec.json.Encoder()


def _json_bytes(obj: dict) -> bytes:
    """One SSE payload: msgspec's encoder (C, ~5x json.dumps; this runs once per token)."""
    return _json_encoder.encode(obj)


async def _chain(first, gen):
    if first is not None:
        yield first
        if first[1] is not None:
            return
    async for item in gen:
        yield item


def _slo_header(request: web.Request) -> str | None:
    return request.headers.get("X-SLO-Class")


async def _json(request: web.Request):
    try:
        return await request.json()
    except UnicodeDecodeError:
        raise ApiError(400, "the body is not valid UTF-8") from None
    except json.JSONDecodeError as e:
        raise ApiError(400, f"the body is not valid JSON: {e}") from None
    except ValueError:  # an integer of more than 4300 digits
        raise ApiError(400, "the body holds a number too long to read") from None
    except RecursionError:
        raise ApiError(400, "the body is nested too deeply") from None


def _error(e: ApiError) -> web.Response:
    headers = {"Retry-After": RETRY_AFTER_S} if e.status in (429, 503) else None
    return web.json_response(e.body(), status=e.status, headers=headers)


def _overloaded(status: int, message: str) -> ApiError:
    return ApiError(status, message, "server_error" if status == 503 else "rate_limit_error")


def build(cfg: RouterConfig) -> Router:
    tokenizer = Tokenizer.from_dir(cfg.model_path)
    cluster = Cluster(
        cfg.worker_address,
        cfg.heartbeat_timeout_s,
        cfg.max_redispatch,
        cfg.kv_transports,
        redispatch_wait_s=cfg.redispatch_wait_s,
        migration=cfg.migration,
        padg=PadgConfig(cfg.ttft_slo_s, cfg.macro_n_max, cfg.macro_n_min),
        curve=load_curve_keys(cfg.curve_keys),
    )
    return Router(cfg, tokenizer, cluster)


def run(cfg: RouterConfig) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    router = build(cfg)
    log.info("router: http://%s:%d, workers connect to %s", cfg.host, cfg.port, cfg.worker_address)
    warn_if_exposed("the HTTP API", cfg.host, bool(cfg.api_key), "--api-key")
    web.run_app(
        router.app(),
        host=cfg.host,
        port=cfg.port,
        print=None,
        handler_cancellation=True,
        access_log=None,
    )
