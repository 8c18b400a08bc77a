"""`tideserve profile`: measure the real engine on this machine and fit the step model.

Lifecycle: start an `LLMEngine` (timed: that is the worker's start-up) -> for each shape, add
requests and time `engine.step()`: prefill steps of one prompt of P tokens, then decode steps
of D sequences at a context of L tokens -> each step becomes a `StepSample` (prefill tokens,
decodes, context tokens read, seconds) -> `fit_step` -> a `PerfModel` with the engine's KV
capacity, written as JSON. The only module of tideserve.sim that imports torch, and only
inside `profile_engine`.
"""

from __future__ import annotations

import time
from dataclasses import astuple

from tideserve.sim.perf import PerfModel, StepSample, attention_pairs, fit_quality, fit_step

PREFILL_TOKENS = (16, 64, 128, 256, 512, 1024)
DECODE_BATCHES = (1, 4, 8, 16, 32)
DECODE_CONTEXTS = (64, 256, 512)
DECODE_STEPS = 4  # timed decode steps per shape


def profile_engine(
    model: str | None,
    quick: bool = False,
    kv_cache_bytes: int = 512 << 20,
    num_threads: int | None = 1,
    dtype: str = "auto",
):
    """A measured `PerfModel` of this machine's engine (CPU or GPU, whichever it runs on),
    with `num_threads` torch threads (1: as `tideserve serve` gives each worker on 2 cores)."""
    from tideserve.config import EngineConfig
    from tideserve.engine.engine import LLMEngine
    from tideserve.engine.sequence import SamplingParams

    cfg = EngineConfig(
        model=model, kv_cache_bytes=kv_cache_bytes, num_threads=num_threads, dtype=dtype
    )
    t0 = time.perf_counter()
    engine = LLMEngine.from_config(cfg)
    startup_s = time.perf_counter() - t0
    prefills = PREFILL_TOKENS[:4] if quick else PREFILL_TOKENS
    batches = DECODE_BATCHES[:3] if quick else DECODE_BATCHES
    contexts = DECODE_CONTEXTS[:2] if quick else DECODE_CONTEXTS
    samples: list[StepSample] = []
    n = 0

    def timed_steps(limit: int | None) -> None:
        steps = 0
        while engine.has_unfinished() and (limit is None or steps < limit):
            sched = engine.scheduler
            before = [(s, s.num_computed_tokens, s.is_prefill) for s in sched.running]
            before += [(s, s.num_computed_tokens, True) for s in sched.waiting]
            t = time.perf_counter()
            engine.step()
            dt = time.perf_counter() - t
            p, d = engine.last_step
            ctx = pairs = 0
            for seq, start, was_prefill in before:
                n = seq.num_computed_tokens - start  # NOTE: 0 when preempted or not scheduled
                if n > 0:
                    ctx += seq.num_computed_tokens
                    if was_prefill:
                        pairs += attention_pairs(start, n)
            samples.append(StepSample(p, d, max(ctx, p + d), dt, pairs))
            steps += 1

    engine.add_request("warm-up", [1] * 32, SamplingParams(max_tokens=2, temperature=0))
    timed_steps(None)
    samples.clear()
    for p in prefills:
        n += 1
        params = SamplingParams(max_tokens=1, min_tokens=1, ignore_eos=True, temperature=0)
        engine.add_request(f"p{n}", [1 + i % 100 for i in range(p)], params)
        timed_steps(None)
    for ctx in contexts:
        for d in batches:
            params = SamplingParams(
                max_tokens=DECODE_STEPS + 1, min_tokens=DECODE_STEPS + 1, ignore_eos=True,
                temperature=0,
            )  # fmt: skip
            for _ in range(d):
                n += 1
                engine.add_request(f"d{n}", [1 + i % 100 for i in range(ctx)], params)
            while any(s.is_prefill for s in engine.scheduler.running) or engine.scheduler.waiting:
                engine.step()
            timed_steps(None)
    mc = engine.model_config
    dtype_bytes = engine.runner.kv.tensor.element_size()
    step = fit_step(samples)
    return PerfModel(
        name=f"measured/{engine.model_path.name}",
        step=step,
        block_size=cfg.block_size,
        num_kv_blocks=engine.num_total_blocks,
        max_model_len=engine.max_model_len,
        kv_bytes_per_token=2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * dtype_bytes,
        startup_s=startup_s,
        source="measured",
        fit={**fit_quality(step, samples), "samples": [astuple(x) for x in samples]},
    )
