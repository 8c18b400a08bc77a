"""A streaming OpenAI-completions client that times each request (TTFT, TPOT, E2E).

Used by the benchmarks against any OpenAI-compatible endpoint: tideserve, vLLM, llama-server.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass

import aiohttp


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
    ttft, n = None, 0
    try:
        async with session.post(
            url + "/v1/completions", json=body, timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as resp:
            if resp.status != 200:
                return RequestTiming(0, 0, 0, f"HTTP {resp.status}: {(await resp.text())[:200]}")
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                obj = json.loads(line[6:])
                if obj.get("usage"):
                    n = obj["usage"]["completion_tokens"]
                if (
                    obj.get("choices")
                    and ttft is None
                    and obj["choices"][0].get("text") is not None
                ):
                    ttft = time.perf_counter() - t0
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        return RequestTiming(0, 0, 0, f"{type(e).__name__}: {e}")
    e2e = time.perf_counter() - t0
    return RequestTiming(ttft if ttft is not None else e2e, e2e, n)


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
