"""Partial disaggregation (EcoServe PaDG), as pure functions: no clock reads, no I/O.

We have only the paper's abstract; these rules are our specification.

**Temporal disaggregation inside an instance.** An instance (a colocated worker in `partial`
mode) alternates between a *prefill phase*, a step that runs queued prompts while decoding
pauses, and a *decode phase*, steps that only decode. A running request's *slack* is what it
has banked against its TPOT SLO: `tpot_slo * tokens generated - time since its first token`
(decoding faster than the SLO banks time; a pause spends it). A prefill phase may run only if
its estimated duration is at most the smallest slack among the running requests minus one
decode step (the step that follows it), so no running request's average TPOT exceeds the SLO.
With nothing running, a prefill phase may always run. A phase of fewer than `MIN_CHUNK` prompt
tokens (unless that is all that waits) is not worth its pause: the instance decodes until the
slack allows one. Phase lengths come from the engine's measured step times (`PhaseEstimator`:
an EWMA of seconds per prompt token and per decode step).

**Macro instances and rolling activation.** Instances are grouped into macro instances. In
each group one instance at a time is *prefill-active*. A new request goes to its group's
active instance when it can meet the request's TTFT deadline (queued prompt tokens plus this
one, at its measured prefill speed), the prefill fits that instance's slack, and it has the
free KV; otherwise activation rolls to the next instance of the group that does. When none
does, the request goes to the instance that would start it soonest (it waits there; nothing is
refused). Groups are chosen by the most free KV.

**Mitosis.** A macro instance grows one instance at a time (a new instance joins the smallest
group). A group larger than `n_max` splits in two halves; two groups both smaller than `n_min`
merge. No KV moves: only the router's ownership of instances changes.
"""

from __future__ import annotations

from dataclasses import dataclass

# -- the phase rule ---------------------------------------------------------------------------

# NOTE: every step pays a fixed cost (the weights read once, launch overhead), and a short
# prefill phase pays it for few tokens: on the 2-core CPU a 16-token phase costs ~3 ms a token,
# a 128-token one ~1.5 ms (docs/padg.md). A higher floor costs no TPOT: under load the slack
# rule gives prefill the same share of time, (tpot_slo - decode step) / tpot_slo, whatever the
# chunk size; the instance only decodes a few more steps to bank the slack one chunk needs.
MIN_CHUNK = 128  # prompt tokens: a shorter prefill phase (unless that is all) is not worth it


@dataclass(frozen=True)
class Decoding:
    """One running request, as the phase rule sees it."""

    first_token_at: float  # when its first token was produced
    num_generated: int  # output tokens so far


def slack(r: Decoding, now: float, tpot_slo_s: float) -> float:
    return tpot_slo_s * r.num_generated - (now - r.first_token_at)


def min_slack(running: list[Decoding], now: float, tpot_slo_s: float) -> float | None:
    return min((slack(r, now, tpot_slo_s) for r in running), default=None)


def may_prefill(
    now: float,
    running: list[Decoding],
    tpot_slo_s: float,
    est_prefill_s: float,
    est_decode_step_s: float,
) -> bool:
    """Whether a prefill phase of `est_prefill_s` may run now."""
    least = min_slack(running, now, tpot_slo_s)
    return least is None or est_prefill_s <= least - est_decode_step_s


def prefill_token_budget(
    now: float,
    running: list[Decoding],
    tpot_slo_s: float,
    prefill_s_per_token: float,
    decode_step_s: float,
    max_tokens: int,
) -> int:
    """How many prompt tokens a prefill phase may take now (0: decode instead): the most
    whose estimated time fits the smallest slack minus one decode step."""
    least = min_slack(running, now, tpot_slo_s)
    if least is None:
        return max_tokens
    room = least - decode_step_s
    if room <= 0 or prefill_s_per_token <= 0:
        return 0 if room <= 0 else max_tokens
    return min(max_tokens, int(room / prefill_s_per_token))


@dataclass
class PhaseEstimator:
    """Seconds per prompt token (prefill phases) and per decode step, as EWMAs of what the
    engine measured; starts from `prefill_s_per_token` / `decode_step_s` guesses."""

    prefill_s_per_token: float = 2e-3
    decode_step_s: float = 0.05
    alpha: float = 0.3

    def prefill(self, num_tokens: int) -> float:
        return self.prefill_s_per_token * num_tokens

    def observe_prefill(self, num_tokens: int, seconds: float) -> None:
        if num_tokens > 0:
            x = seconds / num_tokens
            self.prefill_s_per_token += self.alpha * (x - self.prefill_s_per_token)

    def observe_decode(self, seconds: float) -> None:
        self.decode_step_s += self.alpha * (seconds - self.decode_step_s)


# -- rolling activation -------------------------------------------------------------------------


@dataclass(frozen=True)
class Instance:
    """A partial-mode worker as the router sees it (from its heartbeats)."""

    worker_id: str
    ready: bool
    free_blocks: int
    block_size: int
    queued_prefill_tokens: int
    min_slack_s: float | None  # None: nothing running
    prefill_s_per_token: float
    decode_step_s: float


def accepts(i: Instance, num_prompt_tokens: int, ttft_slo_s: float) -> bool:
    """The three conditions for the active instance to take a new request."""
    if not i.ready:
        return False
    est = i.prefill_s_per_token * num_prompt_tokens
    meets_ttft = i.prefill_s_per_token * (i.queued_prefill_tokens + num_prompt_tokens) <= ttft_slo_s
    fits_slack = i.min_slack_s is None or est <= i.min_slack_s - i.decode_step_s
    has_kv = i.free_blocks >= -(-(num_prompt_tokens + 1) // i.block_size)
    return meets_ttft and fits_slack and has_kv


@dataclass(frozen=True)
class Placement:
    worker_id: str
    group: int
    active: str  # the group's prefill-active instance after this decision
    rolled: bool  # activation moved


def place(
    groups: list[list[str]],
    active: dict[int, str],
    instances: dict[str, Instance],
    num_prompt_tokens: int,
    ttft_slo_s: float,
) -> Placement | None:
    """Where a new request goes, and which instance is active afterwards; None when no
    instance is ready."""
    order = sorted(
        range(len(groups)),
        key=lambda g: -sum(instances[w].free_blocks for w in groups[g] if w in instances),
    )
    for g in order:
        members = [w for w in groups[g] if w in instances and instances[w].ready]
        if not members:
            continue
        cur = active.get(g)
        start = members.index(cur) if cur in members else 0
        rotation = members[start:] + members[:start]
        for k, wid in enumerate(rotation):
            if accepts(instances[wid], num_prompt_tokens, ttft_slo_s):
                return Placement(wid, g, wid, k > 0)
    ready = [i for i in instances.values() if i.ready]
    if not ready:
        return None

    def wait(i: Instance) -> float:  # when it could start this prompt
        return i.prefill_s_per_token * i.queued_prefill_tokens - (i.min_slack_s or 0.0)

    best = min(ready, key=lambda i: (wait(i), -i.free_blocks, i.worker_id))
    g = next((g for g, ws in enumerate(groups) if best.worker_id in ws), 0)
    return Placement(best.worker_id, g, active.get(g, best.worker_id), False)


# -- mitosis ------------------------------------------------------------------------------------


def join(groups: list[list[str]], worker_id: str, n_max: int) -> list[list[str]]:
    """A new instance joins the smallest group (a first group when there is none)."""
    groups = [list(g) for g in groups if g]
    if not groups:
        return [[worker_id]]
    smallest = min(range(len(groups)), key=lambda g: (len(groups[g]), g))
    groups[smallest].append(worker_id)
    return regroup(groups, n_max, 1)


def leave(groups: list[list[str]], worker_id: str, n_min: int, n_max: int):
    groups = [[w for w in g if w != worker_id] for g in groups]
    return regroup([g for g in groups if g], n_max, n_min)


def regroup(groups: list[list[str]], n_max: int, n_min: int) -> list[list[str]]:
    """Splits groups over `n_max` in two halves; merges two groups both under `n_min`."""
    if n_max < 1 or n_min < 1 or n_min > n_max:
        raise ValueError(f"need 1 <= n_min <= n_max, got n_min={n_min} n_max={n_max}")
    out: list[list[str]] = []
    for g in groups:
        while len(g) > n_max:
            half = len(g) // 2
            out.append(g[:half])
            g = g[half:]
        out.append(list(g))
    small = [g for g in out if len(g) < n_min]
    while len(small) >= 2:
        a, b = small[0], small[1]
        if len(a) + len(b) > n_max:
            break
        out.remove(a)
        out.remove(b)
        out.append(a + b)
        small = [g for g in out if len(g) < n_min]
    return out
