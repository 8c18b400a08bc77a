"""The offline API: `LLM(model=None).generate(prompts, params)`.

Every prompt becomes one engine request; the engine steps until all finish, so the prompts
share continuous batches. Outputs come back in prompt order.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field, fields

from tideserve.config import EngineConfig
from tideserve.engine.engine import LLMEngine
from tideserve.engine.sequence import SamplingParams

Prompt = str | list[int]


@dataclass
class CompletionOutput:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    logprobs: list[dict[int, float]] = field(default_factory=list)


class LLM:
    """A single-process engine with a tokenizer. Keyword arguments are `EngineConfig` fields."""

    def __init__(self, model: str | None = None, **engine_kwargs) -> None:
        names = {f.name for f in fields(EngineConfig)}
        unknown = sorted(set(engine_kwargs) - names)
        if unknown:
            raise TypeError(f"unknown LLM options {unknown}; valid: {sorted(names - {'model'})}")
        self.engine = LLMEngine.from_config(EngineConfig(model=model, **engine_kwargs))
        self.tokenizer = _load_tokenizer(self.engine)
        self._ids = itertools.count()

    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model folder has no tokenizer.json: pass token id lists")
            if not prompt:
                raise ValueError("prompt is empty: give a non-empty string or token ids")
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, Seq) and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        raise TypeError(f"a prompt is a string or a list of token ids, got {type(prompt).__name__}")

    def generate(
        self,
        prompts: Prompt | list[Prompt],
        params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[CompletionOutput]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            return []
        params = SamplingParams() if params is None else params
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        encoded = [self.encode(p) for p in prompts]
        rids = [f"offline-{next(self._ids)}" for _ in prompts]
        added = []
        try:
            for rid, ids, p in zip(rids, encoded, params):
                self.engine.add_request(rid, ids, p)
                added.append(rid)
            done = {}
            while len(done) < len(rids):
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
        except BaseException:
            for rid in added:
                self.engine.abort(rid)
            raise
        return [self._output(ids, done[rid]) for rid, ids in zip(rids, encoded)]

    def _output(self, prompt_ids: list[int], out) -> CompletionOutput:
        text = self.tokenizer.decode(out.token_ids) if self.tokenizer is not None else ""
        return CompletionOutput(
            prompt_ids, list(out.token_ids), text, out.finish_reason, list(out.logprobs)
        )


def _load_tokenizer(engine: LLMEngine):
    from tideserve.engine.tokenizer import Tokenizer

    if not (engine.model_path / "tokenizer.json").is_file():
        return None
    return Tokenizer.from_dir(engine.model_path)
