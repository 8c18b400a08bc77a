"""Token sampling for a batch of rows with per-row parameters.

Greedy rows take the argmax. Random rows apply temperature, top-k and top-p, then sample with
the exponential race (argmax of p / E, E ~ Exp(1)), which needs no sort of the whole row when
no top-p is set; a row with a seed draws its noise from its own generator, so its tokens do not
depend on what else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tideserve.engine.sequence import SamplingParams


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[dict[int, float] | None]  # per row: chosen token's (and top-k) logprobs


class Sampler:
    def __init__(self, argmax_rows=None) -> None:
        self._generators: dict[str, torch.Generator] = {}
        # NOTE: the CPU kernel reads bf16 logits in place: a float32 copy of [32, 49152] logits
        # and torch's argmax over it cost ~1.5 ms a decode step here, the kernel ~0.3 ms.
        self.argmax_rows = argmax_rows  # cpu_kernels' row argmax, or None for torch's

    def forget(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def _generator(self, request_id: str, seed: int, device: torch.device) -> torch.Generator:
        gen = self._generators.get(request_id)
        if gen is None:
            gen = torch.Generator(device=device).manual_seed(seed)
            self._generators[request_id] = gen
        return gen

    @torch.inference_mode()
    def __call__(
        self, logits: torch.Tensor, params: list[SamplingParams], request_ids: list[str]
    ) -> SampleResult:  # logits: [N, V] in the model's dtype (or float32)
        chosen = self._argmax(logits)  # [N]
        random_rows = [i for i, p in enumerate(params) if not p.is_greedy]
        if random_rows:
            idx = torch.tensor(random_rows, device=logits.device)
            probs = self._probs(logits[idx].float(), [params[i] for i in random_rows])  # [R, V]
            noise = torch.empty_like(probs)
            for r, i in enumerate(random_rows):
                seed = params[i].seed
                gen = None if seed is None else self._generator(request_ids[i], seed, logits.device)
                noise[r].exponential_(generator=gen)
            chosen[idx] = (probs / noise).argmax(dim=-1)
        token_ids = chosen.tolist()
        return SampleResult(token_ids, self._logprobs(logits, chosen, params))

    def _argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """First index of each row's maximum; the same in any dtype (widening is exact)."""
        if self.argmax_rows is not None and logits.device.type == "cpu":
            return self.argmax_rows(logits.contiguous())
        if logits.device.type == "cpu":
            logits = logits.float()  # torch's CPU argmax is ~2x slower on bf16 than on fp32
        return logits.argmax(dim=-1)

    @staticmethod
    def _probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        temps = torch.tensor([p.temperature for p in params], device=logits.device)
        logits = logits / temps[:, None]  # [R, V]
        for r, p in enumerate(params):
            if p.top_k > 0 and p.top_k < logits.shape[-1]:
                kth = torch.topk(logits[r], p.top_k).values[-1]
                logits[r].masked_fill_(logits[r] < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        top_p_rows = [r for r, p in enumerate(params) if p.top_p < 1.0]
        for r in top_p_rows:
            sorted_p, order = probs[r].sort(descending=True)
            cum = sorted_p.cumsum(0)
            drop = cum - sorted_p > params[r].top_p  # keep the smallest prefix reaching top_p
            sorted_p[drop] = 0.0
            probs[r] = torch.zeros_like(probs[r]).scatter_(0, order, sorted_p)
        return probs

    @staticmethod
    def _logprobs(logits, chosen, params: list[SamplingParams]) -> list[dict[int, float] | None]:
        rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        out: list[dict[int, float] | None] = [None] * len(params)
        if not rows:
            return out
        lp = torch.log_softmax(logits[rows].float(), dim=-1)  # [R, V]
        for r, i in enumerate(rows):
            tok = int(chosen[i])
            d = {tok: float(lp[r, tok])}
            k = params[i].logprobs
            if k:
                top = torch.topk(lp[r], k)
                d.update({int(t): float(v) for t, v in zip(top.indices, top.values)})
                d[tok] = float(lp[r, tok])
            out[i] = d
        return out
