"""Continuous batching with chunked prefill and preemption by recompute. Torch-free.

Each `schedule()` call picks the work of one model step under a token budget:
  1. running sequences first, in priority order: a decode takes 1 token, an unfinished
     prefill takes the next chunk of its prompt; when the pool has no block for one, the
     lowest-priority running sequence is preempted (blocks freed, back to waiting, recomputed
     later) until it fits;
  2. then waiting sequences, FCFS within priority, while budget, sequence slots and blocks last.
A scheduled chunk that reaches the end of a sequence's known tokens samples one new token.
`update()` applies the sampled tokens, finishes sequences and frees their blocks.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass

from tideserve.engine.block_pool import BlockPool
from tideserve.engine.sequence import Sequence, SequenceStatus, stop_reason


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64  # sequences in one step at most
    max_num_batched_tokens: int = 1024  # token budget of one step (prefill chunks + decodes)
    max_model_len: int = 2048  # prompt + output tokens of one sequence at most
    enable_chunked_prefill: bool = True  # split long prompts across steps
    priority_aging_s: float = 120.0  # a lower-priority (batch) sequence waiting this long
    # runs as interactive: batch work fills spare capacity but never starves

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                "without chunked prefill, max_num_batched_tokens must be >= max_model_len "
                f"({self.max_num_batched_tokens} < {self.max_model_len})"
            )


@dataclass
class ScheduledSeq:
    seq: Sequence
    start: int  # first position computed this step (== num_computed_tokens before the step)
    num_tokens: int  # tokens computed this step
    sample: bool  # this chunk reaches the end of the known tokens: sample one token


@dataclass
class SchedulerOutput:
    decodes: list[ScheduledSeq]  # one token each, run first in the batch
    prefills: list[ScheduledSeq]  # prompt chunks (or recompute after preemption)
    preempted: list[Sequence]

    @property
    def scheduled(self) -> list[ScheduledSeq]:
        return self.decodes + self.prefills

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_tokens for s in self.decodes) + sum(s.num_tokens for s in self.prefills)

    @property
    def is_empty(self) -> bool:
        return not self.decodes and not self.prefills


class Scheduler:
    def __init__(self, config: SchedulerConfig, pool: BlockPool) -> None:
        self.config = config
        self.pool = pool
        self.waiting: list[Sequence] = []  # sorted by (priority, arrival)
        self.running: list[Sequence] = []  # sorted by (priority, arrival)
        self.importing: dict[str, Sequence] = {}
        self.num_preemptions = 0  # since start, for metrics

    # -- queue management ------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        bisect.insort(self.waiting, seq, key=lambda s: s.sort_key)

    def add_running(self, seq: Sequence) -> None:
        """A sequence whose KV is already in its blocks (imported) joins the running batch."""
        self.importing.pop(seq.request_id, None)
        seq.status = SequenceStatus.RUNNING
        bisect.insort(self.running, seq, key=lambda s: s.sort_key)

    def pause(self, seq: Sequence) -> None:
        """Takes a running sequence out of the batch; its blocks stay (migration)."""
        self.running.remove(seq)
        seq.status = SequenceStatus.PAUSED

    def resume(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.RUNNING
        bisect.insort(self.running, seq, key=lambda s: s.sort_key)

    def abort(self, seq: Sequence) -> None:
        for queue in (self.waiting, self.running):
            if seq in queue:
                queue.remove(seq)
        self.importing.pop(seq.request_id, None)
        seq.status = SequenceStatus.FINISHED_ABORTED
        self.release(seq)

    def release(self, seq: Sequence) -> None:
        if seq.block_table:
            self.pool.free(seq.block_table)
            seq.block_table = []

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step ----------------------------------------------------------------------------

    def _age(self, now: float) -> None:
        """Promotes sequences that waited `priority_aging_s` to the top priority (0)."""
        aged = False
        for seq in self.waiting:
            if seq.priority > 0 and now - seq.arrival_time > self.config.priority_aging_s:
                seq.priority = 0
                aged = True
        if aged:
            self.waiting.sort(key=lambda s: s.sort_key)

    def schedule(
        self, now: float | None = None, phase: str = "", token_budget: int | None = None
    ) -> SchedulerOutput:
        """One step's work. `phase` (partial disaggregation): "decode" runs only decodes and
        admits nothing; "prefill" runs only prompts (new ones, and chunks of started ones),
        at most `token_budget` tokens; "" mixes both (chunked prefill)."""
        self._age(time.monotonic() if now is None else now)
        out = SchedulerOutput(decodes=[], prefills=[], preempted=[])
        budget = self.config.max_num_batched_tokens
        if token_budget is not None:
            budget = min(budget, token_budget)
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if (phase == "decode" and seq.is_prefill) or (
                phase == "prefill" and not seq.is_prefill
            ):
                i += 1
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self._reserve(seq, n, out):
                break  # seq itself was preempted; everything after it too
            self._emit(out, seq, n)
            budget -= n
            i += 1
        if out.preempted or phase == "decode":
            return out  # the pool is tight (or decoding only): admit nothing new this step
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            n = seq.num_tokens - seq.num_computed_tokens
            if n > budget and not self.config.enable_chunked_prefill:
                break
            n = min(n, budget)
            if not self.pool.grow_table(seq.block_table, seq.num_computed_tokens + n):
                break
            self.waiting.pop(0)
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=lambda s: s.sort_key)
            self._emit(out, seq, n)
            budget -= n
        return out

    def _reserve(self, seq: Sequence, n: int, out: SchedulerOutput) -> bool:
        """Blocks for `n` more tokens of `seq`, preempting from the back; False if seq was."""
        while not self.pool.grow_table(seq.block_table, seq.num_computed_tokens + n):
            victim = self.running[-1]
            self._preempt(victim, out)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        for group in (out.decodes, out.prefills):
            group[:] = [s for s in group if s.seq is not seq]
        self.release(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        out.preempted.append(seq)
        self.add(seq)

    @staticmethod
    def _emit(out: SchedulerOutput, seq: Sequence, n: int) -> None:
        sample = seq.num_computed_tokens + n == seq.num_tokens
        item = ScheduledSeq(seq=seq, start=seq.num_computed_tokens, num_tokens=n, sample=sample)
        (out.decodes if n == 1 and sample else out.prefills).append(item)

    # -- after the step ----------------------------------------------------------------------

    def update(
        self,
        out: SchedulerOutput,
        sampled: dict[str, int],
        logprobs: dict[str, dict[int, float]] | None = None,
        eos_token_ids: frozenset[int] = frozenset(),
    ) -> list[Sequence]:
        """Advance computed counts, append sampled tokens, finish sequences; returns finished."""
        finished = []
        for item in out.scheduled:
            seq = item.seq
            seq.num_computed_tokens += item.num_tokens
            if not item.sample:
                continue
            token = sampled[seq.request_id]
            seq.output_token_ids.append(token)
            if logprobs is not None and seq.request_id in logprobs:
                seq.output_logprobs.append(logprobs[seq.request_id])
            status = stop_reason(
                seq.params,
                seq.num_output_tokens,
                seq.num_tokens,
                token,
                eos_token_ids,
                self.config.max_model_len,
            )
            if status is not None:
                seq.status = status
                self.running.remove(seq)
                if not seq.hold_kv:
                    self.release(seq)
                finished.append(seq)
        return finished
