"""A request inside the engine: its tokens, sampling parameters and KV block table.

Lifecycle: WAITING --schedule--> RUNNING --finish--> FINISHED_*; RUNNING --preempt--> WAITING
(its blocks are freed and its tokens recomputed later). A sequence whose KV is imported from
another worker starts in IMPORTING and joins RUNNING when the last layer has arrived.
Torch-free: the scheduler and block accounting are tested without a model.
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    """How to pick tokens for one request (the OpenAI / vLLM parameters)."""

    max_tokens: int = 16  # output tokens to generate at most
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0  # nucleus sampling mass, (0, 1]
    top_k: int = 0  # keep the k most likely tokens; 0 or -1 keeps all
    seed: int | None = None  # per-request seed: the same seed gives the same tokens
    stop_token_ids: tuple[int, ...] = ()  # extra token ids that end the output
    ignore_eos: bool = False  # keep generating past the end-of-sequence token
    min_tokens: int = 0  # no stop (eos or stop id) before this many output tokens
    logprobs: int | None = None  # None: no logprobs; k >= 0: chosen token's plus the top k

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not self.temperature >= 0:  # NaN too: it would sample garbage
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 or a positive integer, got {self.top_k}")
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens], got {self.min_tokens}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be in [0, 20], got {self.logprobs}")
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    IMPORTING = "importing"
    PAUSED = "paused"  # out of the batch, blocks kept: the last stage of a migration
    FINISHED_STOPPED = "stop"  # eos or a stop token
    FINISHED_LENGTH = "length"  # max_tokens or the context length
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self in _FINISHED


def stop_reason(
    params: SamplingParams,
    num_output_tokens: int,
    num_tokens: int,
    token: int,
    eos_token_ids: frozenset[int],
    max_model_len: int,
) -> SequenceStatus | None:
    """Why a sequence ends after sampling `token` (its `num_output_tokens`-th), or None."""
    if num_output_tokens >= params.min_tokens:
        if (token in eos_token_ids and not params.ignore_eos) or token in params.stop_token_ids:
            return SequenceStatus.FINISHED_STOPPED
    if num_output_tokens >= params.max_tokens or num_tokens >= max_model_len:
        return SequenceStatus.FINISHED_LENGTH
    return None


_FINISHED = {
    SequenceStatus.FINISHED_STOPPED,
    SequenceStatus.FINISHED_LENGTH,
    SequenceStatus.FINISHED_ABORTED,
}
_arrival_counter = itertools.count()


@dataclass(eq=False)
class Sequence:
    """One request's state. `num_computed_tokens` tokens already have KV in `block_table`."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0  # lower runs first (FCFS among equals)
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[dict[int, float]] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    hold_kv: bool = False  # keep blocks after finishing until released (KV export)
    num_preemptions: int = 0
    arrival: int = field(default_factory=lambda: next(_arrival_counter))
    arrival_time: float = field(default_factory=time.monotonic)  # for priority aging

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_prefill(self) -> bool:
        """True while more than the last sampled token still needs its KV computed."""
        return self.num_tokens - self.num_computed_tokens > 1

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def sort_key(self) -> tuple[int, int]:
        return (self.priority, self.arrival)

    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output, without copying the whole sequence."""
        n = len(self.prompt_token_ids)
        if start >= n:
            return self.output_token_ids[start - n : end - n]
        if end <= n:
            return self.prompt_token_ids[start:end]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n]
