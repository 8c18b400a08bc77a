"""OpenAI request validation and response shapes (completions and chat completions).

`parse_completion` / `parse_chat` turn a JSON body into a `GenerationSpec` or raise `ApiError`
with the status and message a client can act on; the `*_chunk` / `*_response` functions build
the JSON the OpenAI clients expect.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from tideserve.protocol import Params

MAX_STOP_STRINGS = 4
MAX_STOP_STRING_CHARS = 256  # longer stop strings make every detokenized delta costlier to scan
MAX_INT32 = 2**31 - 1  # upper bound of max_tokens, min_tokens, top_k and prompt token ids
SEED_RANGE = (-(2**63), 2**63 - 1)  # int64, what the sampler's generator takes
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
        raise ApiError(400, f"'{key}' must be {what}, got {_show(v)}", param=key)
    return v


def _get_int(body: dict, key: str, default: int | None, lo: int, hi: int) -> int | None:
    """An integer field in [lo, hi]; 16.0 counts as 16 (JSON does not tell them apart)."""
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        msg = f"'{key}' must be an integer in [{lo}, {hi}], got {_show(v)}"
        raise ApiError(400, msg, param=key)
    return v


def _show(v: Any) -> str:
    """A value for an error message, cut short: the message must not echo a huge field."""
    text = repr(v) if not isinstance(v, int) or abs(v) < 10**40 else "a huge integer"
    return text if len(text) <= 60 else text[:57] + "..."


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


def _check_unicode(value: Any, param: str) -> None:
    """JSON may spell unpaired UTF-16 surrogates ("\\ud800"); no tokenizer can take them."""
    try:
        json.dumps(value, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        msg = f"'{param}' contains an unpaired UTF-16 surrogate (\\ud800-\\udfff)"
        raise ApiError(400, msg, param=param) from None
    except RecursionError:
        raise ApiError(400, f"'{param}' is nested too deeply", param=param) from None


def _stop_strings(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise ApiError(400, "'stop' must be a string or a list of strings", param="stop")
    if len(stop) > MAX_STOP_STRINGS or not all(0 < len(s) <= MAX_STOP_STRING_CHARS for s in stop):
        raise ApiError(
            400,
            f"'stop' takes up to {MAX_STOP_STRINGS} strings of 1 to {MAX_STOP_STRING_CHARS} "
            "characters",
            param="stop",
        )
    _check_unicode(stop, "stop")
    return stop


def _slo_class(body: dict, header_slo: str | None) -> str:
    """The body's slo_class, else the X-SLO-Class header, else interactive; both are checked."""
    classes = sorted(SLO_CLASSES)
    if header_slo is not None and header_slo not in SLO_CLASSES:
        msg = f"the X-SLO-Class header must be one of {classes}, got {_show(header_slo)}"
        raise ApiError(400, msg, param="X-SLO-Class")
    slo = body.get("slo_class")
    if slo is not None and not (isinstance(slo, str) and slo in SLO_CLASSES):
        msg = f"slo_class must be one of {classes}, got {_show(slo)}"
        raise ApiError(400, msg, param="slo_class")
    return slo or header_slo or "interactive"


def _common(body: Any, header_slo: str | None, default_model: str) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    for key in ("n", "best_of"):
        v = body.get(key)
        if v is not None and (isinstance(v, bool) or v != 1):
            raise ApiError(400, f"only {key}=1 is supported", param=key)
    if not (body.get("logprobs") is None or body["logprobs"] is False):
        raise ApiError(400, "logprobs are not supported yet", param="logprobs")
    if body.get("top_logprobs") is not None:
        raise ApiError(400, "logprobs are not supported yet", param="top_logprobs")
    max_tokens = _get_int(body, "max_tokens", None, 1, MAX_INT32)
    max_completion_tokens = _get_int(body, "max_completion_tokens", None, 1, MAX_INT32)
    opts = _get(body, "stream_options", dict, {})
    num = (int, float)
    temperature = _get(body, "temperature", num, 1.0, lambda v: 0 <= v <= 2, "a number in [0, 2]")
    top_p = _get(body, "top_p", num, 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]")
    return dict(
        model=_get(body, "model", str, default_model),
        max_tokens=max_tokens if max_completion_tokens is None else max_completion_tokens,
        temperature=float(temperature),
        top_p=float(top_p),
        top_k=_get_int(body, "top_k", 0, -1, MAX_INT32),
        seed=_get_int(body, "seed", None, *SEED_RANGE),
        stop=_stop_strings(body),
        ignore_eos=_get(body, "ignore_eos", bool, False),
        min_tokens=_get_int(body, "min_tokens", 0, 0, MAX_INT32),
        stream=_get(body, "stream", bool, False),
        include_usage=bool(_get(opts, "include_usage", bool, False)),
        slo_class=_slo_class(body, header_slo),
    )


def _prompt(body: dict) -> str | list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if prompt is None:
        raise ApiError(400, "'prompt' is required", param="prompt")
    if isinstance(prompt, str):
        if not prompt:
            raise ApiError(400, "'prompt' is empty", param="prompt")
        _check_unicode(prompt, "prompt")
        return prompt
    if isinstance(prompt, list) and not prompt:
        raise ApiError(400, "'prompt' is empty", param="prompt")
    if isinstance(prompt, list):
        ids = [int(t) if isinstance(t, float) and t.is_integer() else t for t in prompt]
        if all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= MAX_INT32 for t in ids):
            return ids
    raise ApiError(
        400,
        "'prompt' must be a string or a list of token ids (one prompt per request)",
        param="prompt",
    )


def parse_completion(body: Any, header_slo: str | None, default_model: str) -> GenerationSpec:
    common = _common(body, header_slo, default_model)
    prompt = _prompt(body)
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
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not m["role"]:
            raise ApiError(
                400,
                f"messages[{i}] must be an object with a non-empty string 'role'",
                param="messages",
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
    _check_unicode(messages, "messages")
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
