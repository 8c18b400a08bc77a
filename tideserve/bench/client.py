"""A streaming OpenAI-completions client that times each token of a request.

Used by `tideserve bench` and the benchmarks against any OpenAI-compatible endpoint: tideserve,
vLLM, SGLang, llama-server. Lifecycle of one request: the caller notes its send time and calls
``stream_request`` with a ready JSON body -> POST ``/v1/completions`` -> each SSE ``data:`` line
is decoded; a chunk whose text is not empty stamps a token time; a ``usage`` chunk gives the
server's own token counts; an ``error`` chunk or a non-200 status ends it as a failure -> a
``StreamResult``. Nothing here raises for a failed request: the failure is in the result.

``stream_completion``, ``RequestTiming``, ``percentile`` and ``summarize`` are the older, simple
interface of ``benchmarks/serving.py``.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgspec

_JSON = {"Content-Type": "application/json"}
_ERROR_BODY_CHARS = 500  # kept of a failed response's body


class _Delta(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    text: str | None = None
    delta: _Delta | None = None
    finish_reason: str | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class _Chunk(msgspec.Struct):
    choices: list[_Choice] = []
    usage: _Usage | None = None
    error: Any = None


_decode_chunk = msgspec.json.Decoder(_Chunk).decode


@dataclass
class StreamResult:
    """What came back for one streamed request (times from ``time.perf_counter``)."""

    status: int | None = None  # HTTP status; None when no response came
    error: str | None = None  # why it failed; None when it succeeded
    token_times_s: list[float] = field(default_factory=list)  # chunks that carried text
    end_s: float = 0.0  # when the stream ended or failed
    completion_tokens: int | None = None  # from the server's usage chunk, when sent
    prompt_tokens: int | None = None  # from the server's usage chunk, when sent
    finish_reason: str | None = None

    @property
    def num_output_tokens(self) -> int:
        """The server's count when it reports one, else the text chunks seen."""
        if self.completion_tokens is not None:
            return self.completion_tokens
        return len(self.token_times_s)


async def stream_request(
    session: aiohttp.ClientSession, url: str, body: bytes, timeout_s: float = 600.0
) -> StreamResult:
    """POST a JSON completions body with ``"stream": true`` to ``url`` and time the tokens."""
    res = StreamResult()
    try:
        async with session.post(
            url, data=body, headers=_JSON, timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as resp:
            res.status = resp.status
            if resp.status != 200:
                text = await resp.text(errors="replace")
                res.error = f"HTTP {resp.status}: {text[:_ERROR_BODY_CHARS]}"
            else:
                await _read_stream(resp, res)
    except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as e:
        res.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    res.end_s = time.perf_counter()
    if res.error is None and not res.token_times_s:
        res.error = "the stream ended without any token"
    return res


async def _read_stream(resp: aiohttp.ClientResponse, res: StreamResult) -> None:
    async for raw in resp.content:
        if not raw.startswith(b"data:"):
            continue
        data = raw[5:].strip()
        if data == b"[DONE]":
            break
        now = time.perf_counter()
        try:
            chunk = _decode_chunk(data)
        except msgspec.DecodeError as e:
            res.error = f"bad stream chunk ({e}): {data[:200].decode(errors='replace')}"
            return
        if chunk.error is not None:
            res.error = f"error in stream: {str(chunk.error)[:_ERROR_BODY_CHARS]}"
            return
        if chunk.usage is not None:
            res.prompt_tokens = chunk.usage.prompt_tokens
            res.completion_tokens = chunk.usage.completion_tokens
        if chunk.choices:
            c = chunk.choices[0]
            text = c.text if c.delta is None else c.delta.content
            if text:
                res.token_times_s.append(now)
            if c.finish_reason is not None:
                res.finish_reason = c.finish_reason


# -- the older, simple interface ----------------------------------------------------------------


@dataclass
class RequestTiming:
    ttft_s: float
    e2e_s: float
    num_output_tokens: int
    error: str | None = None

    @property
    def tpot_s(self) -> float | None:
        if self.num_output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.num_output_tokens - 1)


async def stream_completion(
    session: aiohttp.ClientSession,
    url: str,
    model: str,
    prompt,
    max_tokens: int,
    timeout_s: float = 600.0,
    extra: dict | None = None,
) -> RequestTiming:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
        **(extra or {}),
    }
    t0 = time.perf_counter()
    res = await stream_request(
        session, url + "/v1/completions", msgspec.json.encode(body), timeout_s
    )
    if res.error is not None:
        return RequestTiming(0, 0, 0, res.error)
    return RequestTiming(res.token_times_s[0] - t0, res.end_s - t0, res.num_output_tokens)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100])."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(-(-q * len(s) // 100)) - 1))
    return s[k]


def summarize(timings: list[RequestTiming], wall_s: float) -> dict:
    ok = [t for t in timings if t.error is None]
    ttfts = [t.ttft_s for t in ok]
    tpots = [t.tpot_s for t in ok if t.tpot_s is not None]
    out_tokens = sum(t.num_output_tokens for t in ok)
    return {
        "requests": len(timings),
        "errors": len(timings) - len(ok),
        "output_tok_s": out_tokens / wall_s if wall_s else 0.0,
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p90_s": percentile(ttfts, 90),
        "tpot_p50_s": percentile(tpots, 50),
        "tpot_p90_s": percentile(tpots, 90),
        "e2e_mean_s": statistics.fmean([t.e2e_s for t in ok]) if ok else float("nan"),
        "wall_s": wall_s,
    }
