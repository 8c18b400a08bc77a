"""OpenAI request validation and response shapes (completions and chat completions).

`parse_completion` / `parse_chat` turn a JSON body into a `GenerationSpec` or raise `ApiError`
with the status and message a client can act on; the `*_chunk` / `*_response` functions build
the JSON the OpenAI clients expect.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from tideserve.protocol import Params

MAX_STOP_STRINGS = 4
SLO_CLASSES = {"interactive": 0, "batch": 10}  # SLO class -> engine priority (lower runs first)


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type_,
            param,
            code,
        )

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code or self.status,
            }
        }


@dataclass
class GenerationSpec:
    model: str
    prompt: str | list[int] | None  # completions
    messages: list[dict] | None  # chat
    max_tokens: int | None  # None: what the context leaves
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: list[str]
    ignore_eos: bool
    min_tokens: int
    stream: bool
    include_usage: bool
    slo_class: str
    echo: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def params(self, max_tokens: int, stop_token_ids: tuple[int, ...] = ()) -> Params:
        return Params(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            stop_token_ids=stop_token_ids,
            ignore_eos=self.ignore_eos,
            min_tokens=min(self.min_tokens, max_tokens),
        )

    @property
    def priority(self) -> int:
        return SLO_CLASSES[self.slo_class]


def _get(body: dict, key: str, types: type | tuple, default=None, check=None, what: str = ""):
    if key not in body or body[key] is None:
        return default
    v = body[key]
    if isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise ApiError(400, f"'{key}' must be {what or _names(types)}, got a boolean", param=key)
    if not isinstance(v, types):
        raise ApiError(
            400, f"'{key}' must be {what or _names(types)}, got {type(v).__name__}", param=key
        )
    if check is not None and not check(v):
        raise ApiError(400, f"'{key}' must be {what}, got {v!r}", param=key)
    return v


def _names(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join(
        {
            int: "an integer",
            float: "a number",
            str: "a string",
            bool: "a boolean",
            list: "a list",
            dict: "an object",
        }.get(t, t.__name__)
        for t in types
    )


def _common(body: dict, header_slo: str | None, default_model: str) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    n = _get(body, "n", int, 1)
    if n != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    if body.get("best_of") not in (None, 1):
        raise ApiError(400, "best_of is not supported", param="best_of")
    if body.get("logprobs") not in (None, False) or body.get("top_logprobs") is not None:
        raise ApiError(400, "logprobs are not supported yet", param="logprobs")
    max_tokens = _get(body, "max_completion_tokens", int, None, lambda v: v >= 1, "an integer >= 1")
    if max_tokens is None:
        max_tokens = _get(body, "max_tokens", int, None, lambda v: v >= 1, "an integer >= 1")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise ApiError(400, "'stop' must be a string or a list of strings", param="stop")
    if len(stop) > MAX_STOP_STRINGS or any(not s for s in stop):
        raise ApiError(
            400, f"'stop' takes up to {MAX_STOP_STRINGS} non-empty strings", param="stop"
        )
    opts = _get(body, "stream_options", dict, {})
    slo = _get(body, "slo_class", str, None) or header_slo or "interactive"
    if slo not in SLO_CLASSES:
        raise ApiError(
            400, f"slo_class must be one of {sorted(SLO_CLASSES)}, got {slo!r}", param="slo_class"
        )
    return dict(
        model=_get(body, "model", str, default_model),
        max_tokens=max_tokens,
        temperature=float(
            _get(
                body, "temperature", (int, float), 1.0, lambda v: 0 <= v <= 2, "a number in [0, 2]"
            )
        ),
        top_p=float(
            _get(body, "top_p", (int, float), 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]")
        ),
        top_k=_get(body, "top_k", int, 0, lambda v: v >= -1, "an integer >= -1"),
        seed=_get(body, "seed", int, None),
        stop=stop,
        ignore_eos=_get(body, "ignore_eos", bool, False),
        min_tokens=_get(body, "min_tokens", int, 0, lambda v: v >= 0, "an integer >= 0"),
        stream=_get(body, "stream", bool, False),
        include_usage=bool(_get(opts, "include_usage", bool, False)),
        slo_class=slo,
    )


def parse_completion(body: Any, header_slo: str | None, default_model: str) -> GenerationSpec:
    common = _common(body, header_slo, default_model)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise ApiError(400, "'prompt' is empty", param="prompt")
    elif (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    ):
        pass
    elif prompt is None:
        raise ApiError(400, "'prompt' is required", param="prompt")
    elif isinstance(prompt, list) and not prompt:
        raise ApiError(400, "'prompt' is empty", param="prompt")
    else:
        raise ApiError(
            400,
            "'prompt' must be a string or a list of token ids (one prompt per request)",
            param="prompt",
        )
    if common["max_tokens"] is None:
        common["max_tokens"] = 16  # the OpenAI completions default
    echo = _get(body, "echo", bool, False)
    return GenerationSpec(prompt=prompt, messages=None, echo=echo, **common)


def parse_chat(body: Any, header_slo: str | None, default_model: str) -> GenerationSpec:
    common = _common(body, header_slo, default_model)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(
                400, f"messages[{i}] must be an object with a string 'role'", param="messages"
            )
        content = m.get("content")
        if isinstance(content, list):
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                for p in content
            ):
                raise ApiError(
                    400, f"messages[{i}].content: only text parts are supported", param="messages"
                )
        elif not isinstance(content, str):
            raise ApiError(
                400,
                f"messages[{i}].content must be a string or a list of text parts",
                param="messages",
            )
    return GenerationSpec(prompt=None, messages=messages, **common)


# -- responses ---------------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_chunk(rid: str, model: str, created: int, text: str, finish: str | None) -> dict:
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
    }


def chat_chunk(rid: str, model: str, created: int, delta: dict, finish: str | None) -> dict:
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


def usage_chunk(rid: str, model: str, created: int, obj: str, u: dict) -> dict:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": u}


def completion_response(rid, model, created, text, finish, u) -> dict:
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
        "usage": u,
    }


def chat_response(rid, model, created, text, finish, u) -> dict:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish,
            }
        ],
        "usage": u,
    }


def models_response(model: str, max_model_len: int | None, created: int | None = None) -> dict:
    return {
        "object": "list",
        "data": [
            {
                "id": model,
                "object": "model",
                "created": created or int(time.time()),
                "owned_by": "tideserve",
                "max_model_len": max_model_len,
            }
        ],
    }
