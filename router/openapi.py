"""The router's OpenAPI 3.1 description, served at `GET /openapi.json`.

It states what `openai_api.parse_completion` / `parse_chat` accept, with the same limits (the
constants come from there), so a request the schema allows is one the parser can answer with
2xx or a 4xx that depends on run-time state (the model name, the vocabulary, the context
length, capacity), and a request it forbids is a 400. The HTTP fuzz test holds both halves.
Unknown fields are ignored, as OpenAI clients send fields this server does not use.
"""

from __future__ import annotations

from router.openai_api import (
    MAX_INT32,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    SEED_RANGE,
    SLO_CLASSES,
)
from tideserve import __version__


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(type_: str, **limits) -> dict:
    return {"type": [type_, "null"], **limits}


def _json(schema: dict) -> dict:
    return {"content": {"application/json": {"schema": schema}}}


_STOP_STRING = {"type": "string", "minLength": 1, "maxLength": MAX_STOP_STRING_CHARS}
_TOKEN_IDS = {
    "type": "array",
    "minItems": 1,
    "items": {"type": "integer", "minimum": 0, "maximum": MAX_INT32},
    "description": "token ids; each must be below the model's vocabulary size",
}

_SAMPLING = {
    "model": _nullable("string", description="must be the served model's name (default)"),
    "max_tokens": _nullable(
        "integer",
        minimum=1,
        maximum=MAX_INT32,
        description="prompt + max_tokens must fit the context; default 16 for completions, "
        "what the context leaves for chat",
    ),
    "max_completion_tokens": _nullable(
        "integer", minimum=1, maximum=MAX_INT32, description="wins over max_tokens"
    ),
    "temperature": _nullable("number", minimum=0, maximum=2, description="0 is greedy"),
    "top_p": _nullable("number", exclusiveMinimum=0, maximum=1),
    "top_k": _nullable("integer", minimum=-1, maximum=MAX_INT32, description="0 or -1: all"),
    "seed": _nullable("integer", minimum=SEED_RANGE[0], maximum=SEED_RANGE[1]),
    "stop": {
        "anyOf": [
            {"type": "null"},
            _STOP_STRING,
            {"type": "array", "maxItems": MAX_STOP_STRINGS, "items": _STOP_STRING},
        ],
        "description": "text that ends the output (not included in it)",
    },
    "ignore_eos": _nullable("boolean"),
    "min_tokens": _nullable("integer", minimum=0, maximum=MAX_INT32),
    "stream": _nullable("boolean", description="server-sent events, ended by `data: [DONE]`"),
    "stream_options": {
        "type": ["object", "null"],
        "properties": {"include_usage": _nullable("boolean")},
    },
    "slo_class": {
        "enum": [*SLO_CLASSES, None],
        "description": "scheduling class (interactive runs first); wins over X-SLO-Class",
    },
    "n": _nullable("integer", minimum=1, maximum=1, description="only 1 is supported"),
    "best_of": _nullable("integer", minimum=1, maximum=1, description="only 1 is supported"),
    "logprobs": {"enum": [False, None], "description": "not supported yet"},
    "top_logprobs": {"type": "null", "description": "not supported yet"},
}

_COMPLETION_REQUEST = {
    "type": "object",
    "required": ["prompt"],
    "properties": {
        "prompt": {
            "anyOf": [
                {"type": "string", "minLength": 1},
                _TOKEN_IDS,
                {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": 1,
                    "items": {"anyOf": [{"type": "string", "minLength": 1}, _TOKEN_IDS]},
                    "description": "a batch of one prompt",
                },
            ]
        },
        "echo": _nullable("boolean", description="prepend a text prompt to the output"),
        **_SAMPLING,
    },
}

_TEXT_PART = {
    "type": "object",
    "required": ["type", "text"],
    "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
}

_CHAT_REQUEST = {
    "type": "object",
    "required": ["messages"],
    "properties": {
        "messages": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["role", "content"],
                "properties": {
                    "role": {"type": "string", "minLength": 1},
                    "content": {
                        "anyOf": [{"type": "string"}, {"type": "array", "items": _TEXT_PART}]
                    },
                },
            },
        },
        **_SAMPLING,
    },
}

_USAGE = {
    "type": "object",
    "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
    "properties": {
        k: {"type": "integer", "minimum": 0}
        for k in ("prompt_tokens", "completion_tokens", "total_tokens")
    },
}

_FINISH = {"enum": ["stop", "length", "abort", None]}


def _completion_object(obj: str, choice: dict) -> dict:
    return {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices", "usage"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": obj},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {"type": "array", "items": choice},
            "usage": _ref("Usage"),
        },
    }


_COMPLETION = _completion_object(
    "text_completion",
    {
        "type": "object",
        "required": ["index", "text", "finish_reason"],
        "properties": {
            "index": {"type": "integer"},
            "text": {"type": "string"},
            "logprobs": {"type": "null"},
            "finish_reason": _FINISH,
        },
    },
)

_CHAT_COMPLETION = _completion_object(
    "chat.completion",
    {
        "type": "object",
        "required": ["index", "message", "finish_reason"],
        "properties": {
            "index": {"type": "integer"},
            "message": {
                "type": "object",
                "required": ["role", "content"],
                "properties": {"role": {"const": "assistant"}, "content": {"type": "string"}},
            },
            "logprobs": {"type": "null"},
            "finish_reason": _FINISH,
        },
    },
)


def _chunk(obj: str, choice: dict) -> dict:
    return {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": obj},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {"type": "array", "maxItems": 1, "items": choice},
            "usage": _ref("Usage"),
        },
        "description": "one streamed chunk; the last (with stream_options.include_usage) has "
        "no choices and the usage",
    }


_COMPLETION_CHUNK = _chunk("text_completion", _COMPLETION["properties"]["choices"]["items"])

_CHAT_COMPLETION_CHUNK = _chunk(
    "chat.completion.chunk",
    {
        "type": "object",
        "required": ["index", "delta", "finish_reason"],
        "properties": {
            "index": {"type": "integer"},
            "delta": {
                "type": "object",
                "properties": {"role": {"const": "assistant"}, "content": {"type": "string"}},
            },
            "logprobs": {"type": "null"},
            "finish_reason": _FINISH,
        },
    },
)


def _sse_event(chunk: str) -> dict:
    """One server-sent event: `data: <chunk JSON>`, an error object if generation fails after
    the first event, and `data: [DONE]` last."""
    return {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {
                "anyOf": [
                    {"const": "[DONE]"},
                    {
                        "type": "string",
                        "contentMediaType": "application/json",
                        "contentSchema": {"anyOf": [_ref(chunk), _ref("Error")]},
                    },
                ]
            }
        },
    }


_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "integer", "null"]},
            },
        }
    },
}

_MODEL_LIST = {
    "type": "object",
    "required": ["object", "data"],
    "properties": {
        "object": {"const": "list"},
        "data": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["id", "object", "created", "owned_by"],
                "properties": {
                    "id": {"type": "string"},
                    "object": {"const": "model"},
                    "created": {"type": "integer"},
                    "owned_by": {"type": "string"},
                    "max_model_len": {"type": ["integer", "null"]},
                },
            },
        },
    },
}

_HEALTH = {
    "type": "object",
    "required": ["status"],
    "properties": {"status": {"enum": ["ok", "unavailable"]}},
}

_LAYER_RANGE = {
    "type": "array",
    "items": {"type": "integer", "minimum": 0},
    "minItems": 2,
    "maxItems": 2,
}

_CLUSTER = {
    "type": "object",
    "required": ["workers", "requests_inflight"],
    "properties": {
        "requests_inflight": {"type": "integer", "minimum": 0},
        "kv_transfers": {
            "description": "prefill -> decode KV transfers that landed, by transport",
            "type": "object",
            "additionalProperties": {"type": "integer", "minimum": 0},
        },
        "workers": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["id", "role", "state"],
                "properties": {
                    "id": {"type": "string"},
                    "role": {"enum": ["prefill", "decode", "colocated", "partial"]},
                    "address": {"type": "string"},
                    "host": {"type": "string"},
                    "state": {"type": "string"},
                    "device": {"type": "string"},
                    "pid": {"type": "integer"},
                    "load": {"type": "object"},
                    "kv_blocks_used": {"type": "integer"},
                    "kv_blocks_total": {"type": "integer"},
                    "layers": {
                        "description": "its layer ranges [start, end); [] = the whole model",
                        "type": "array",
                        "items": _LAYER_RANGE,
                    },
                    "replicas": {
                        "description": "replicas of its layer ranges, where they run, and "
                        "replicas it hosts for other workers ('for': whose layers)",
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["layers", "host", "share"],
                            "properties": {
                                "layers": _LAYER_RANGE,
                                "host": {"type": "string"},
                                "share": {"type": "number"},
                                "seqs": {"type": "integer", "minimum": 0},
                                "for": {"type": "string"},
                                "kv_bytes": {"type": "integer", "minimum": 0},
                            },
                        },
                    },
                },
            },
        },
    },
}

_UNAUTHORIZED = "no or a wrong API key (only when the server has one: --api-key)"
_ERRORS = {
    "400": "invalid request (the message says which field and why)",
    "401": _UNAUTHORIZED,
    "404": "unknown model",
    "413": "body larger than the limit",
    "429": "too many requests in flight (Retry-After)",
    "500": "internal error (the message has the request id)",
    "503": "no worker ready or able to take it (Retry-After)",
    "504": "no token within the request timeout",
}


def _error_responses() -> dict:
    return {code: {"description": d, **_json(_ref("Error"))} for code, d in _ERRORS.items()}


def _generation(summary: str, request: str, response: str, chunk: str, max_body_bytes: int) -> dict:
    return {
        "post": {
            "summary": summary,
            "parameters": [
                {
                    "name": "X-SLO-Class",
                    "in": "header",
                    "required": False,
                    "schema": {"enum": list(SLO_CLASSES)},
                    "description": "scheduling class when the body has no slo_class",
                }
            ],
            "requestBody": {
                "required": True,
                "description": f"a JSON object of at most {max_body_bytes} bytes",
                **_json(_ref(request)),
            },
            "responses": {
                "200": {
                    "description": "the whole output, or server-sent events when stream is true",
                    "content": {
                        "application/json": {"schema": _ref(response)},
                        "text/event-stream": {"schema": _sse_event(chunk)},
                    },
                },
                **_error_responses(),
            },
        }
    }


def _get(summary: str, responses: dict, is_open: bool = False) -> dict:
    """A GET operation; an open one never needs the API key, the others may."""
    if is_open:
        return {"get": {"summary": summary, "responses": responses, "security": []}}
    responses = {**responses, "401": {"description": _UNAUTHORIZED, **_json(_ref("Error"))}}
    return {"get": {"summary": summary, "responses": responses}}


_WORKER_ID = {"name": "worker_id", "in": "path", "required": True, "schema": {"type": "string"}}


def _admin(summary: str, body: dict | None = None, required: bool = True) -> dict:
    """A POST on one worker (operators and the autoscaler)."""
    op = {
        "summary": summary,
        "parameters": [_WORKER_ID],
        "responses": {
            "200": {"description": "done", **_json({"type": "object"})},
            "400": {"description": "a bad body", **_json(_ref("Error"))},
            "401": {"description": _UNAUTHORIZED, **_json(_ref("Error"))},
            "404": {"description": "no such worker", **_json(_ref("Error"))},
            "409": {"description": "the worker is not drained and idle", **_json(_ref("Error"))},
        },
    }
    if body is not None:
        op["requestBody"] = {"required": required, **_json(body)}
    return {"post": op}


def openapi_schema(max_body_bytes: int) -> dict:
    """The OpenAPI 3.1 document of this router's HTTP API."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "tideserve",
            "version": __version__,
            "description": "OpenAI-compatible completions and chat completions.",
        },
        "paths": {
            "/v1/completions": _generation(
                "Text completion",
                "CompletionRequest",
                "Completion",
                "CompletionChunk",
                max_body_bytes,
            ),
            "/v1/chat/completions": _generation(
                "Chat completion",
                "ChatCompletionRequest",
                "ChatCompletion",
                "ChatCompletionChunk",
                max_body_bytes,
            ),
            "/v1/models": _get(
                "The served model", {"200": {"description": "one model", **_json(_ref("Models"))}}
            ),
            "/health": _get(
                "Readiness",
                {
                    "200": {"description": "a worker can serve", **_json(_ref("Health"))},
                    "503": {"description": "no worker is ready", **_json(_ref("Health"))},
                },
                is_open=True,
            ),
            "/metrics": _get(
                "Prometheus metrics",
                {
                    "200": {
                        "description": "text exposition format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            ),
            "/cluster": _get(
                "Workers and their load",
                {"200": {"description": "cluster state", **_json(_ref("Cluster"))}},
            ),
            "/openapi.json": _get(
                "This document",
                {"200": {"description": "OpenAPI 3.1", **_json({"type": "object"})}},
                is_open=True,
            ),
            "/admin/stats": _get(
                "Rates, latency p90s and load over the last window (the autoscaler's input)",
                {"200": {"description": "stats", **_json({"type": "object"})}},
            ),
            "/admin/workers/{worker_id}/drain": _admin(
                "Give the worker no new work; with migrate, move its running requests away",
                {"type": "object", "properties": {"migrate": {"type": "boolean"}}},
                required=False,
            ),
            "/admin/requests": _get(
                "Every request in flight: its workers, tokens so far, migration",
                {"200": {"description": "requests", **_json({"type": "object"})}},
            ),
            "/admin/migrate": {
                "post": {
                    "summary": "Live-migrate one running request to another decode worker",
                    "requestBody": {
                        "required": True,
                        **_json(
                            {
                                "type": "object",
                                "required": ["request_id", "to_worker"],
                                "properties": {
                                    "request_id": {"type": "string"},
                                    "to_worker": {"type": "string"},
                                },
                            }
                        ),
                    },
                    "responses": {
                        "200": {"description": "migrating", **_json({"type": "object"})},
                        "400": {"description": "a bad body", **_json(_ref("Error"))},
                        "401": {"description": _UNAUTHORIZED, **_json(_ref("Error"))},
                        "404": {"description": "no such request or worker", **_json(_ref("Error"))},
                        "409": {"description": "it cannot move now", **_json(_ref("Error"))},
                    },
                }
            },
            "/admin/workers/{worker_id}/resume": _admin("Give the worker new work again"),
            "/admin/workers/{worker_id}/limits": _admin(
                "Cap the worker's running batch",
                {
                    "type": "object",
                    "required": ["max_num_seqs"],
                    "properties": {
                        "max_num_seqs": {"type": "integer", "minimum": 1, "maximum": 1 << 16}
                    },
                },
            ),
            "/admin/workers/{worker_id}/role": _admin(
                "Switch a drained, idle worker to another role (it keeps its weights)",
                {
                    "type": "object",
                    "required": ["role"],
                    "properties": {"role": {"enum": ["prefill", "decode", "colocated", "partial"]}},
                },
            ),
            "/admin/workers/{worker_id}/modules": _admin(
                "Replicate, unreplicate or migrate a layer range of an elastic worker",
                {
                    "type": "object",
                    "required": ["action", "layers"],
                    "properties": {
                        "action": {"enum": ["replicate", "unreplicate", "migrate"]},
                        "layers": _LAYER_RANGE,
                        "share": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
                        "target": {
                            "type": "string",
                            "description": "the worker to host the replica, or to move a "
                            "migrated stage to (default: itself)",
                        },
                    },
                },
            ),
        },
        "security": [{}, {"apiKey": []}],  # the key is needed only when the server has one
        "components": {
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "CompletionRequest": _COMPLETION_REQUEST,
                "ChatCompletionRequest": _CHAT_REQUEST,
                "Completion": _COMPLETION,
                "ChatCompletion": _CHAT_COMPLETION,
                "CompletionChunk": _COMPLETION_CHUNK,
                "ChatCompletionChunk": _CHAT_COMPLETION_CHUNK,
                "Usage": _USAGE,
                "Models": _MODEL_LIST,
                "Health": _HEALTH,
                "Cluster": _CLUSTER,
                "Error": _ERROR,
            },
        },
    }
