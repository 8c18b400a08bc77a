"""Temporal disaggregation inside one instance (`--role partial`, EcoServe PaDG).

Before each engine step the instance picks a phase with the pure rule in
tideserve/policy/padg.py: a *prefill phase* (prompts only, decoding paused) takes as many
prompt tokens as fit the smallest slack of the running requests minus one decode step, once
that is at least MIN_CHUNK tokens (or all that is pending); else a *decode phase* (decodes
only, nothing admitted). With nothing decoding, prompts always run.
Step times are measured and fed back into the estimates; the instance reports its phase, its
smallest slack and its speeds in every heartbeat, which the router's rolling activation uses.
"""

from __future__ import annotations

import time

from tideserve.policy.padg import (
    MIN_CHUNK,
    Decoding,
    PhaseEstimator,
    min_slack,
    prefill_token_budget,
)


class PhaseController:
    def __init__(self, engine, tpot_slo_s: float) -> None:
        self.engine = engine
        self.tpot_slo_s = tpot_slo_s
        self.est = PhaseEstimator()
        self.first_token_at: dict[str, float] = {}
        self.phase = "decode"

    def decoding(self) -> list[Decoding]:
        out = []
        for seq in self.engine.scheduler.running:
            t = self.first_token_at.get(seq.request_id)
            if t is not None and not seq.is_prefill:
                out.append(Decoding(t, seq.num_output_tokens))
        return out

    def plan(self, now: float) -> tuple[str, int | None]:
        sched = self.engine.scheduler
        pending = sum(s.num_tokens - s.num_computed_tokens for s in sched.waiting)
        pending += sum(s.num_tokens - s.num_computed_tokens for s in sched.running if s.is_prefill)
        decoding = self.decoding()
        if pending == 0:
            return "decode", None
        if not decoding:
            return "prefill", None
        budget = prefill_token_budget(
            now, decoding, self.tpot_slo_s, self.est.prefill_s_per_token, self.est.decode_step_s,
            sched.config.max_num_batched_tokens,
        )  # fmt: skip
        if budget >= min(MIN_CHUNK, pending):
            return "prefill", budget
        return "decode", None

    def step(self, on_layer) -> list:
        phase, budget = self.plan(time.monotonic())
        self.phase = phase  # NOTE: before the step: heartbeats sent during it report this phase
        t0 = time.perf_counter()
        outs = self.engine.step(on_layer=on_layer, phase=phase, token_budget=budget)
        dt = time.perf_counter() - t0
        prompt_tokens, decodes = self.engine.last_step
        if prompt_tokens and not decodes:
            self.est.observe_prefill(prompt_tokens, dt)
        elif decodes and not prompt_tokens:
            self.est.observe_decode(dt)
        now = time.monotonic()
        for out in outs:
            if out.new_token_ids and out.request_id not in self.first_token_at:
                self.first_token_at[out.request_id] = now
            if out.finish_reason is not None:
                self.first_token_at.pop(out.request_id, None)
        return outs

    def forget(self, request_id: str) -> None:
        self.first_token_at.pop(request_id, None)

    def report(self) -> dict:
        least = min_slack(self.decoding(), time.monotonic(), self.tpot_slo_s)
        return {
            "phase": self.phase,
            "min_slack_s": -1.0 if least is None else max(0.0, least),
            "prefill_s_per_token": self.est.prefill_s_per_token,
            "decode_step_s": self.est.decode_step_s,
        }
