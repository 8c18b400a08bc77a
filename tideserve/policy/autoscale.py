"""How many workers each pool wants, and how large a batch each decode worker may run: pure
scaling policies (observation in, actions out; no I/O, no clock, no randomness).

Each tick the autoscaler service (or the simulator) builds an `Observation` from the router's
registry and metrics and calls `policy.decide(obs)`. The policy answers with actions:
`ScaleTo` (role -> desired worker count, only the roles it changes; both pools of a coordinated
move travel in one action) and `SetMaxBatch` (a worker's batch cap). The shell carries them out:
it starts processes, drains then stops them (scale-in never drops a request), and sends
`SetLimits`. The next observation shows the result: launched processes in `starting`, drained
ones as `draining` until they leave. A policy keeps state between ticks (cooldown timers,
stabilization windows, the caps it set), derived only from the observations, so the same
sequence of observations always gives the same actions.

A pool's count is its ready and starting workers (registered and not draining, plus processes
launched but not registered); draining workers do not count. A cluster runs either
disaggregated (prefill + decode pools) or colocated (only "colocated" workers, which then play
the decode pool: decode throughput and TPOT drive them).

Policies (docs/autoscaling.md has the options):
  static       the baseline: never acts.
  utilization  HPA-like: busy fraction and queue length per pool, tolerance, stabilization.
  coordinated  HeteroScale: decode tokens/s sets the decode count, prefill follows a P/D ratio
               (configured or measured), both in one action; a latency guard adds a worker when
               TTFT or TPOT p90 breaches the SLO before throughput shows it.
  modules      CoCoServe + KunServe: replicates layers of a hot decode worker onto a spare one,
               drops half the layers of two KV-starved replicas (tideserve/policy/modules.py).
  slo          Chiron: local backpressure moves each decode worker's batch cap (AIMD on TPOT);
               global backpressure adds a worker when interactive requests queue, removes one
               after sustained slack. Interactive demand drives it; batch work fills spare
               capacity and adds a worker only when its deadline is threatened.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Protocol

ROLES = ("prefill", "decode", "colocated", "partial")


@dataclass(frozen=True)
class WorkerObs:
    worker_id: str
    role: str  # "prefill", "decode" or "colocated"
    state: str  # "starting", "ready" or "draining"
    num_running: int  # sequences in its running batch
    num_waiting: int  # sequences queued in its engine
    queued_prefill_tokens: int  # prompt tokens not yet prefilled
    kv_blocks_used: int
    kv_blocks_total: int
    max_num_seqs: int = 0  # its current batch cap (0 = unknown)
    tpot_p90_s: float | None = None  # its own interactive TPOT p90 (None: use the cluster's)
    gpu_util_pct: float | None = None  # NVML GPU utilization, 0-100 (None: no GPU or no NVML)
    # its layer stages, [start, end) each (the `modules` policy replicates or moves only a
    # whole stage past layer 0); None: unknown (any range), (): not elastic (none)
    layers: tuple[tuple[int, int], ...] | None = None


@dataclass(frozen=True)
class Observation:
    now: float  # seconds, from the shell's clock; policies never read one
    workers: tuple[WorkerObs, ...]  # registered with the router (incl. draining)
    starting: dict[str, int]  # role -> processes launched but not yet registered
    window_s: float  # the span the rates/percentiles below cover
    decode_tokens_per_s: float  # output tokens/s the cluster produced over the window
    prefill_tokens_per_s: float  # prompt tokens/s prefilled over the window
    ttft_p90_s: float | None  # interactive class, over the window (None: no requests)
    tpot_p90_s: float | None
    queue_wait_p90_s: float | None  # admission -> first scheduled, interactive (None if unknown)
    inflight: dict[str, int]  # SLO class ("interactive", "batch") -> requests in flight
    waiting: dict[str, int]  # SLO class -> requests queued (admitted, not yet running)
    batch_oldest_wait_s: float | None = None  # longest a queued batch request has waited so far


@dataclass(frozen=True)
class ScaleTo:
    targets: dict[str, int]  # role -> desired number of workers (only the roles it changes)
    reason: str  # one line, human readable, with the numbers that triggered it


@dataclass(frozen=True)
class SetMaxBatch:
    worker_id: str
    max_num_seqs: int
    reason: str


Action = ScaleTo | SetMaxBatch


@dataclass(frozen=True)
class Bounds:
    min_prefill: int = 0
    max_prefill: int = 4
    min_decode: int = 1
    max_decode: int = 4
    min_colocated: int = 0
    max_colocated: int = 4
    min_partial: int = 0
    max_partial: int = 4

    def of(self, role: str) -> tuple[int, int]:
        return getattr(self, f"min_{role}"), getattr(self, f"max_{role}")


@dataclass(frozen=True)
class SLO:
    ttft_s: float = 2.0  # interactive TTFT p90 target
    tpot_s: float = 0.2  # interactive TPOT p90 target
    batch_deadline_s: float = 600.0  # a batch request should finish within this of admission


class Policy(Protocol):
    name: str

    def decide(self, obs: Observation) -> list[Action]: ...


# --- what every policy reads off an observation -------------------------------------------


def count(obs: Observation, role: str) -> int:
    """Ready + starting workers of a role (draining ones do not count)."""
    live = sum(1 for w in obs.workers if w.role == role and w.state != "draining")
    return live + obs.starting.get(role, 0)


def num_starting(obs: Observation, role: str) -> int:
    registered = sum(1 for w in obs.workers if w.role == role and w.state == "starting")
    return registered + obs.starting.get(role, 0)


def ready(obs: Observation, role: str) -> list[WorkerObs]:
    return [w for w in obs.workers if w.role == role and w.state == "ready"]


def is_colocated(obs: Observation, bounds: Bounds) -> bool:
    """Colocated workers present, or bounds that allow only colocated ones."""
    if count(obs, "colocated") > 0:
        return True
    if count(obs, "prefill") + count(obs, "decode") > 0:
        return False
    return bounds.max_colocated > 0 and bounds.max_prefill == 0 and bounds.max_decode == 0


def has_demand(obs: Observation) -> bool:
    return sum(obs.inflight.values()) + sum(obs.waiting.values()) > 0


def _ceil(x: float) -> int:
    return math.ceil(x - 1e-9)  # NOTE: 2.0000000001 workers is 2, not 3


def _s(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3g} s"


class _Damper:
    """One pool's hysteresis: grow at once (at most once per up_cooldown_s); shrink only when
    every tick of the last down_window_s wanted fewer than the current count, then to the most
    any of them wanted, and not within down_cooldown_s of the pool's last change."""

    def __init__(self, up_cooldown_s: float, down_cooldown_s: float, down_window_s: float):
        self.up_cooldown_s = up_cooldown_s
        self.down_cooldown_s = down_cooldown_s
        self.down_window_s = down_window_s
        self.last_up = -math.inf
        self.last_change = -math.inf
        self.below_since: float | None = None  # first tick of the current run of "fewer"
        self.peak = 0  # the most any tick of that run wanted

    def step(self, now: float, current: int, desired: int) -> int:
        if desired >= current:
            self.below_since = None
            if desired > current and now - self.last_up >= self.up_cooldown_s:
                self.moved(now, up=True)
                return desired
            return current
        if self.below_since is None:
            self.below_since, self.peak = now, desired
        self.peak = max(self.peak, desired)
        waited = now - self.below_since >= self.down_window_s
        if waited and now - self.last_change >= self.down_cooldown_s:
            self.moved(now, up=False)
            return self.peak
        return current

    def moved(self, now: float, up: bool) -> None:
        self.last_change = now
        self.last_up = now if up else self.last_up
        self.below_since = None


def _bounded(bounds: Bounds, role: str, desired: int, demand: bool) -> tuple[int, str]:
    """The desired count within the role's bounds (and >= 1 while requests are in flight), with
    a note when that moved it."""
    lo, hi = bounds.of(role)
    if desired > hi:
        return hi, f"capped at max_{role} {hi}"
    if desired < lo:
        return lo, f"held at min_{role} {lo}"
    if desired < 1 and demand and hi >= 1:
        return 1, "requests in flight need one"
    return desired, ""


def _note(role: str, old: int, new: int, why: str, bound: str) -> str:
    if not why:
        return f"{role} {old}->{new}: {bound}"
    return f"{role} {old}->{new}: {why}" + (f" ({bound})" if bound else "")


def _peak(new: int, desired: int, window_s: float) -> str:
    """A scale-in goes to the most any tick of its stabilization window wanted: say so."""
    return f", the most wanted over {window_s:.0f} s is {new}" if new > desired else ""


# --- static --------------------------------------------------------------------------------


class StaticPolicy:
    """Whatever was provisioned stays."""

    name = "static"

    def decide(self, obs: Observation) -> list[Action]:
        return []


# --- utilization (HPA-like) ----------------------------------------------------------------


@dataclass(frozen=True)
class UtilizationOptions:
    target_busy: float = 0.7  # busy fraction per worker to hold (running / batch cap)
    tolerance: float = 0.1  # no change while busy / target_busy is within 1 +- this
    queue_per_worker: float = 4.0  # more waiting requests per ready worker than this adds one
    down_stabilization_s: float = 30.0  # shrink to the most wanted over this window
    up_cooldown_s: float = 15.0  # between two scale-ups of a pool
    down_cooldown_s: float = 30.0  # after any change of a pool, before it shrinks
    # NOTE: off by default: a decode loop keeps NVML's utilization near 100% at batch 1, so
    # it says "a kernel ran", not "no room left"; turn it on for compute-bound pools
    use_gpu_utilization: bool = False  # busy = max(running / cap, GPU utilization)

    def __post_init__(self) -> None:
        _check(0 < self.target_busy <= 1, "target_busy must be in (0, 1]", self.target_busy)
        _check(0 <= self.tolerance < 1, "tolerance must be in [0, 1)", self.tolerance)
        _check(self.queue_per_worker >= 0, "queue_per_worker must be >= 0", self.queue_per_worker)
        _check_times(self, "down_stabilization_s", "up_cooldown_s", "down_cooldown_s")


def busy_fraction(w: WorkerObs, use_gpu_utilization: bool = False) -> float:
    if w.max_num_seqs > 0:
        busy = min(1.0, w.num_running / w.max_num_seqs)
    else:
        busy = 1.0 if w.num_running > 0 else 0.0
    if use_gpu_utilization and w.gpu_util_pct is not None:
        busy = max(busy, min(1.0, w.gpu_util_pct / 100.0))
    return busy


class UtilizationPolicy:
    """Per pool: desired = ceil(sum of busy fractions / target_busy), one more when the queue
    per worker passes a threshold; blind to SLO classes and latency (that is the baseline)."""

    name = "utilization"

    def __init__(self, bounds: Bounds, opts: UtilizationOptions):
        self.bounds, self.opts = bounds, opts
        self.dampers: dict[str, _Damper] = {}

    def decide(self, obs: Observation) -> list[Action]:
        o, targets, why = self.opts, {}, []
        roles = ("colocated",) if is_colocated(obs, self.bounds) else ("prefill", "decode")
        for role in roles:
            cur, ws = count(obs, role), ready(obs, role)
            usage = sum(busy_fraction(w, o.use_gpu_utilization) for w in ws)  # starting: none
            queue = sum(w.num_waiting for w in ws) / max(1, len(ws))
            desired = _ceil(usage / o.target_busy)
            if cur and abs(usage / (o.target_busy * cur) - 1) <= o.tolerance:
                desired = cur
            mean = usage / max(1, len(ws))
            reason = f"mean busy {mean:.2f} over {len(ws)} ready vs target {o.target_busy}"
            if queue > o.queue_per_worker:
                desired = max(desired, cur + 1)
                reason += f", {queue:.1f} waiting per worker > {o.queue_per_worker}"
            if num_starting(obs, role):
                desired = max(desired, cur)  # wait for the ones coming up before shrinking
            desired, bound = _bounded(self.bounds, role, desired, has_demand(obs))
            damper = self.dampers.setdefault(
                role, _Damper(o.up_cooldown_s, o.down_cooldown_s, o.down_stabilization_s)
            )
            new = damper.step(obs.now, cur, desired)
            if new != cur:
                targets[role] = new
                reason += f" wants {desired}" + _peak(new, desired, o.down_stabilization_s)
                why.append(_note(role, cur, new, reason, bound))
        return [ScaleTo(targets, "; ".join(why))] if targets else []


# --- coordinated (HeteroScale) -------------------------------------------------------------


@dataclass(frozen=True)
class CoordinatedOptions:
    decode_tps_per_worker: float = 0.0  # required: profiled decode tokens/s of one worker at SLO
    headroom: float = 0.8  # run each worker at this share of it (room for bursts and start-up)
    pd_ratio: float | None = None  # prefill workers per decode worker, or:
    prefill_tps_per_worker: float | None = None  # profiled prompt tokens/s of one prefill worker
    down_stabilization_s: float = 60.0  # shrink only when wanted fewer for this long
    up_cooldown_s: float = 30.0  # between two scale-ups of a pool
    down_cooldown_s: float = 60.0  # after any change of a pool, before it shrinks
    latency_guard: bool = True  # TTFT / TPOT p90 over the SLO adds one worker

    def __post_init__(self) -> None:
        _check(
            self.decode_tps_per_worker > 0,
            "coordinated needs decode_tps_per_worker > 0 (the profiled decode tokens/s of one "
            "worker at its SLO)",
            self.decode_tps_per_worker,
        )
        _check(0 < self.headroom <= 1, "headroom must be in (0, 1]", self.headroom)
        if self.pd_ratio is not None:
            _check(self.pd_ratio > 0, "pd_ratio must be > 0", self.pd_ratio)
        if self.prefill_tps_per_worker is not None:
            tps = self.prefill_tps_per_worker
            _check(tps > 0, "prefill_tps_per_worker must be > 0", tps)
        if self.pd_ratio is not None and self.prefill_tps_per_worker is not None:
            raise ValueError("coordinated takes pd_ratio or prefill_tps_per_worker, not both")
        _check_times(self, "down_stabilization_s", "up_cooldown_s", "down_cooldown_s")


class CoordinatedPolicy:
    """Decode tokens/s sets the decode count; prefill follows in the same action."""

    name = "coordinated"

    def __init__(self, bounds: Bounds, slo: SLO, opts: CoordinatedOptions):
        self.bounds, self.slo, self.opts = bounds, slo, opts
        self.dampers: dict[str, _Damper] = {}

    def decide(self, obs: Observation) -> list[Action]:
        colocated = is_colocated(obs, self.bounds)
        dl = "colocated" if colocated else "decode"
        cur_d, new_d, why_d = self._decode(obs, dl, ttft_too=colocated)
        targets, why = {}, []
        if new_d != cur_d:
            targets[dl] = new_d
            why.append(_note(dl, cur_d, new_d, why_d, ""))
        if not colocated:
            cur_p, new_p, why_p = self._prefill(obs, cur_d, new_d)
            if new_p != cur_p:
                targets["prefill"] = new_p
                why.append(_note("prefill", cur_p, new_p, why_p, ""))
        return [ScaleTo(targets, "; ".join(why))] if targets else []

    def _decode(self, obs: Observation, role: str, ttft_too: bool) -> tuple[int, int, str]:
        o, cur = self.opts, count(obs, role)
        tps = obs.decode_tokens_per_s
        desired = _ceil(tps / (o.decode_tps_per_worker * o.headroom))
        why = (
            f"{tps:.0f} tok/s over {cur} worker(s) vs {o.headroom} x "
            f"{o.decode_tps_per_worker:.0f} tok/s target wants {desired}"
        )
        guard = self._guard(obs, role, obs.tpot_p90_s, self.slo.tpot_s, "TPOT")
        if ttft_too and not guard:
            guard = self._guard(obs, role, obs.ttft_p90_s, self.slo.ttft_s, "TTFT")
        if guard:
            desired, why = max(desired, cur + 1), f"{guard} ({why})"
        new, bound = self._settle(obs, role, cur, desired)
        why += _peak(new, desired, o.down_stabilization_s)
        return cur, new, why + (f" ({bound})" if bound else "")

    def _prefill(self, obs: Observation, cur_d: int, new_d: int) -> tuple[int, int, str]:
        o, cur = self.opts, count(obs, "prefill")
        if o.pd_ratio is not None:
            desired = _ceil(new_d * o.pd_ratio)
            why = f"follows decode {new_d} x P/D ratio {o.pd_ratio}"
        else:
            tps, per = obs.prefill_tokens_per_s, o.prefill_tps_per_worker or 1.0
            desired = _ceil(tps / (per * o.headroom))
            why = f"{tps:.0f} prompt tok/s vs {o.headroom} x {per:.0f} tok/s target wants {desired}"
        guard = self._guard(obs, "prefill", obs.ttft_p90_s, self.slo.ttft_s, "TTFT")
        if guard:
            desired, why = max(desired, cur + 1), f"{guard} ({why})"
        if o.pd_ratio is None or new_d == cur_d or guard:
            new, bound = self._settle(obs, "prefill", cur, desired)
            why += _peak(new, desired, o.down_stabilization_s)
            return cur, new, why + (f" ({bound})" if bound else "")
        # NOTE: a ratio move goes with the decode move that set it, past prefill's own damping,
        # and only in the decode's direction (never undoes prefill that a TTFT breach added).
        desired, bound = _bounded(self.bounds, "prefill", desired, has_demand(obs))
        new = max(cur, desired) if new_d > cur_d else min(cur, desired)
        if new != cur:
            self._damper("prefill").moved(obs.now, up=new > cur)
        return cur, new, why + (f" ({bound})" if bound else "")

    def _guard(self, obs: Observation, role: str, p90: float | None, slo: float, what: str) -> str:
        """The breach that adds one worker now, or "" (one at a time: not while one starts)."""
        if not self.opts.latency_guard or p90 is None or p90 <= slo or num_starting(obs, role):
            return ""
        return f"{what} p90 {_s(p90)} > {_s(slo)} SLO"

    def _settle(self, obs: Observation, role: str, cur: int, desired: int) -> tuple[int, str]:
        """(the count to go to, a note when the bounds moved it)."""
        if num_starting(obs, role):
            desired = max(desired, cur)  # wait for the ones coming up before shrinking
        desired, bound = _bounded(self.bounds, role, desired, has_demand(obs))
        return self._damper(role).step(obs.now, cur, desired), bound

    def _damper(self, role: str) -> _Damper:
        o = self.opts
        return self.dampers.setdefault(
            role, _Damper(o.up_cooldown_s, o.down_cooldown_s, o.down_stabilization_s)
        )


# --- slo (Chiron) ------------------------------------------------------------------------


@dataclass(frozen=True)
class SLOOptions:
    batch_cap: int = 64  # largest batch cap local backpressure sets
    batch_floor: int = 4  # smallest
    batch_decrease: float = 0.5  # cap x this when TPOT p90 > the SLO
    batch_increase: int = 4  # cap + this when TPOT p90 < tpot_slack x SLO and the cap binds
    tpot_slack: float = 0.7  # "well under" the TPOT SLO
    batch_interval_s: float | None = None  # between two cap changes of a worker (None: window_s)
    queue_threat: float = 0.5  # interactive queue wait p90 > this x TTFT SLO adds a worker
    ttft_slack: float = 0.5  # scale-in needs TTFT p90 under this x TTFT SLO
    scale_in_busy: float = 0.5  # ... and interactive running to fit n-1 workers at this busy
    slack_window_s: float = 60.0  # ... all of it for this long
    batch_threat: float = 0.5  # a batch request queued > this x batch deadline adds a worker
    up_cooldown_s: float = 15.0  # between two scale-ups of a pool
    down_cooldown_s: float = 60.0  # after any change of a pool, before it shrinks

    def __post_init__(self) -> None:
        for name in ("batch_cap", "batch_floor", "batch_increase"):
            _check(
                isinstance(getattr(self, name), int), f"{name} must be an int", getattr(self, name)
            )
        _check(self.batch_floor >= 1, "batch_floor must be >= 1", self.batch_floor)
        _check(
            self.batch_cap >= self.batch_floor, "batch_cap must be >= batch_floor", self.batch_cap
        )
        _check(0 < self.batch_decrease < 1, "batch_decrease must be in (0, 1)", self.batch_decrease)
        _check(self.batch_increase >= 1, "batch_increase must be >= 1", self.batch_increase)
        for name in ("tpot_slack", "queue_threat", "ttft_slack", "scale_in_busy", "batch_threat"):
            _check(0 < getattr(self, name) <= 1, f"{name} must be in (0, 1]", getattr(self, name))
        _check_times(self, "batch_interval_s", "slack_window_s", "up_cooldown_s", "down_cooldown_s")


class SLOPolicy:
    """Local backpressure (each decode worker's batch cap) under global (instance count).

    Interactive demand drives scaling. Batch requests fill spare capacity: the router admits
    batch only up to its share of the in-flight limit, so interactive requests always find room,
    and the engine schedules interactive first (priority 0 vs 10), so a batch backlog neither
    delays interactive work nor holds workers up (scale-in looks at interactive load only). The
    batch starvation guard: a batch request queued long enough to threaten its deadline adds a
    worker, and blocks scale-in while it lasts.
    """

    name = "slo"

    def __init__(self, bounds: Bounds, slo: SLO, opts: SLOOptions):
        self.bounds, self.slo, self.opts = bounds, slo, opts
        self.caps: dict[str, tuple[int, float]] = {}  # worker id -> (cap we set, when)
        self.dampers: dict[str, _Damper] = {}

    def decide(self, obs: Observation) -> list[Action]:
        dl = "colocated" if is_colocated(obs, self.bounds) else "decode"
        actions: list[Action] = self._local(obs, dl)
        scale = self._global(obs, dl)
        return actions + [scale] if scale else actions

    def cap_of(self, w: WorkerObs, now: float, interval: float) -> int:
        """What its batch cap is now: ours while the worker may not have applied it yet."""
        mine = self.caps.get(w.worker_id)
        if mine and now - mine[1] < interval:
            return mine[0]
        return w.max_num_seqs or (mine[0] if mine else self.opts.batch_cap)

    def _local(self, obs: Observation, dl: str) -> list[Action]:
        o, slo = self.opts, self.slo.tpot_s
        interval = obs.window_s if o.batch_interval_s is None else o.batch_interval_s
        present = {w.worker_id for w in obs.workers}
        self.caps = {k: v for k, v in self.caps.items() if k in present}
        actions: list[Action] = []
        for w in ready(obs, dl):
            tpot = w.tpot_p90_s if w.tpot_p90_s is not None else obs.tpot_p90_s
            mine = self.caps.get(w.worker_id)
            if tpot is None or (mine and obs.now - mine[1] < interval):
                continue
            cap = self.cap_of(w, obs.now, interval)
            binds = w.num_running >= cap or w.num_waiting > 0
            if tpot > slo:
                new, why = max(o.batch_floor, int(cap * o.batch_decrease)), ">"
            elif tpot < o.tpot_slack * slo and binds and cap < o.batch_cap:
                new, why = min(o.batch_cap, cap + o.batch_increase), f"< {o.tpot_slack} x"
            else:
                continue
            if new != cap and (mine is None or new != mine[0]):  # NOTE: asked once is enough
                self.caps[w.worker_id] = (new, obs.now)
                reason = (
                    f"{w.worker_id} batch cap {cap}->{new}: TPOT p90 {_s(tpot)} {why} {_s(slo)}"
                )
                actions.append(SetMaxBatch(w.worker_id, new, reason + " SLO"))
        return actions

    def _global(self, obs: Observation, dl: str) -> ScaleTo | None:
        up_role, why = self._pressure(obs, dl)
        roles = (dl,) if dl == "colocated" else (dl, "prefill")
        targets, notes = {}, []
        for role in roles:
            cur = count(obs, role)
            if role == up_role and not num_starting(obs, role):
                desired, reason = cur + 1, why
            else:
                slack = "" if up_role else self._slack(obs, role, dl)
                desired, reason = (cur - 1, slack) if slack else (cur, "")
            desired, bound = _bounded(self.bounds, role, desired, has_demand(obs))
            new = self._damper(role).step(obs.now, cur, desired)
            if new != cur:
                targets[role] = new
                notes.append(_note(role, cur, new, reason, bound))
                break  # one worker at a time
        return ScaleTo(targets, "; ".join(notes)) if targets else None

    def _pressure(self, obs: Observation, dl: str) -> tuple[str, str]:
        """(the pool to grow by one, why), or ("", "") when nothing presses."""
        o, slo = self.opts, self.slo
        interval = obs.window_s if o.batch_interval_s is None else o.batch_interval_s
        ws = ready(obs, dl)
        caps = [self.cap_of(w, obs.now, interval) for w in ws]
        waiting = obs.waiting.get("interactive", 0)
        if waiting and ws and all(w.num_running >= c for w, c in zip(ws, caps)):
            return dl, f"{waiting} interactive waiting, all {len(ws)} {dl} at their batch cap"
        tpot = obs.tpot_p90_s
        if tpot is not None and tpot > slo.tpot_s and ws and max(caps) <= o.batch_floor:
            return dl, f"TPOT p90 {_s(tpot)} > {_s(slo.tpot_s)} SLO with batch caps at the floor"
        wait, what = obs.queue_wait_p90_s, "queue wait"
        if wait is None:
            wait, what = obs.ttft_p90_s, "TTFT"
        if wait is not None and wait > o.queue_threat * slo.ttft_s:
            why = (
                f"interactive {what} p90 {_s(wait)} > {o.queue_threat} x {_s(slo.ttft_s)} TTFT SLO"
            )
            return self._busier(obs, dl, "prefill"), why
        age, threat = obs.batch_oldest_wait_s, o.batch_threat * slo.batch_deadline_s
        if obs.waiting.get("batch", 0) and age is not None and age > threat:
            deadline = f"{o.batch_threat} x {slo.batch_deadline_s:.0f} s deadline"
            return self._busier(obs, dl, dl), f"batch request queued {age:.0f} s > {deadline}"
        return "", ""

    def _busier(self, obs: Observation, dl: str, default: str) -> str:
        """The pool with more requests waiting per ready worker (colocated: the only pool)."""
        if dl == "colocated":
            return dl

        def backlog(role: str) -> float:
            ws = ready(obs, role)
            return sum(w.num_waiting for w in ws) / max(1, len(ws))

        p, d = backlog("prefill"), backlog("decode")
        return default if p == d else "prefill" if p > d else "decode"

    def _slack(self, obs: Observation, role: str, dl: str) -> str:
        """Why this pool could lose a worker now, or "" (every clause must hold)."""
        o, slo = self.opts, self.slo
        ttft, tpot = obs.ttft_p90_s, obs.tpot_p90_s
        if obs.waiting.get("interactive", 0):
            return ""
        if ttft is not None and ttft >= o.ttft_slack * slo.ttft_s:
            return ""
        if tpot is not None and tpot >= o.tpot_slack * slo.tpot_s:
            return ""
        ws, n = ready(obs, role), count(obs, role)
        if role == dl:
            interval = obs.window_s if o.batch_interval_s is None else o.batch_interval_s
            cap = sum(self.cap_of(w, obs.now, interval) for w in ws) / max(1, len(ws))
            load, room = obs.inflight.get("interactive", 0), o.scale_in_busy * (n - 1) * cap
            what = f"{load} interactive in flight fit {n - 1} worker(s) at {o.scale_in_busy} busy"
        else:
            load = sum(1 for w in ws if w.num_running or w.num_waiting)
            room = o.scale_in_busy * (n - 1)
            what = f"{load} busy prefill worker(s) fit {n - 1} at {o.scale_in_busy} busy"
        if load > room:
            return ""
        return (
            f"slack for {o.slack_window_s:.0f} s: {what}, TTFT p90 {_s(ttft)}, TPOT p90 {_s(tpot)}"
        )

    def _damper(self, role: str) -> _Damper:
        o = self.opts
        return self.dampers.setdefault(
            role, _Damper(o.up_cooldown_s, o.down_cooldown_s, o.slack_window_s)
        )


# --- construction --------------------------------------------------------------------------


@dataclass(frozen=True)
class MitosisOptions:
    """`mitosis` (EcoServe): the partial pool grows and shrinks one instance at a time; the
    router splits and merges macro instances as it does (tideserve/policy/padg.py)."""

    ttft_threat: float = 0.8  # grow when interactive TTFT p90 > this x the SLO
    tpot_threat: float = 0.8  # ... or TPOT p90 > this x the SLO
    queue_per_instance: float = 2.0  # ... or more requests waiting per instance than this
    slack: float = 0.4  # shrink after slack_window_s with p90s under this x the SLO and
    slack_window_s: float = 60.0  # nobody waiting
    up_cooldown_s: float = 15.0
    down_cooldown_s: float = 60.0

    def __post_init__(self) -> None:
        for name in ("ttft_threat", "tpot_threat", "slack", "queue_per_instance"):
            if getattr(self, name) <= 0:
                raise ValueError(f"mitosis option {name} must be > 0")
        if min(self.slack_window_s, self.up_cooldown_s, self.down_cooldown_s) < 0:
            raise ValueError("mitosis windows and cooldowns must be >= 0")


class MitosisPolicy:
    """Scales the `partial` pool (macro instances grow one instance at a time)."""

    name = "mitosis"

    def __init__(self, bounds: Bounds, slo: SLO, opts: MitosisOptions) -> None:
        self.bounds, self.slo, self.opts = bounds, slo, opts
        self.damper = _Damper(opts.up_cooldown_s, opts.down_cooldown_s, opts.slack_window_s)

    def decide(self, obs: Observation) -> list[Action]:
        o, slo = self.opts, self.slo
        cur = count(obs, "partial")
        lo, hi = self.bounds.of("partial")
        waiting = obs.waiting.get("interactive", 0)
        ttft, tpot = obs.ttft_p90_s, obs.tpot_p90_s
        why, desired = "", cur
        if cur < max(lo, 1 if has_demand(obs) else 0):
            desired, why = max(lo, 1), "below the minimum"
        elif ttft is not None and ttft > o.ttft_threat * slo.ttft_s:
            desired, why = cur + 1, f"TTFT p90 {ttft:.2f} s > {o.ttft_threat} x {slo.ttft_s} s"
        elif tpot is not None and tpot > o.tpot_threat * slo.tpot_s:
            desired, why = cur + 1, f"TPOT p90 {tpot:.3f} s > {o.tpot_threat} x {slo.tpot_s} s"
        elif waiting > o.queue_per_instance * max(1, cur):
            desired, why = cur + 1, f"{waiting} interactive requests waiting over {cur}"
        elif (
            waiting == 0
            and (ttft is None or ttft < o.slack * slo.ttft_s)
            and (tpot is None or tpot < o.slack * slo.tpot_s)
        ):
            desired, why = cur - 1, "sustained slack: p90s well under the SLO, nobody waiting"
        if num_starting(obs, "partial") and desired > cur:
            return []  # one instance at a time
        new = min(hi, max(lo, self.damper.step(obs.now, cur, min(hi, max(lo, desired)))))
        if new == cur:
            return []
        return [ScaleTo({"partial": new}, f"partial {cur}->{new}: {why}")]


POLICIES: tuple[str, ...] = ("static", "utilization", "coordinated", "slo", "mitosis", "modules")
_OPTIONS = {
    "utilization": UtilizationOptions,
    "coordinated": CoordinatedOptions,
    "slo": SLOOptions,
    "mitosis": MitosisOptions,
}


def _options_class(name: str) -> type | None:
    if name == "modules":  # NOTE: imported here: tideserve.policy.modules imports this module
        from tideserve.policy.modules import ModulesOptions

        return ModulesOptions
    return _OPTIONS.get(name)


def _check(ok: bool, message: str, value: object) -> None:
    if not ok:
        raise ValueError(f"{message}, got {value!r}")


def _check_times(opts: object, *names: str) -> None:
    for name in names:
        value = getattr(opts, name)
        if value is not None:
            _check(value >= 0, f"{name} must be >= 0 seconds", value)


def check_bounds(bounds: Bounds) -> None:
    for role in ROLES:
        lo, hi = bounds.of(role)
        if lo < 0 or hi < 0:
            raise ValueError(f"bounds for {role} must not be negative, got min {lo} max {hi}")
        if lo > hi:
            raise ValueError(f"bounds for {role}: min_{role} {lo} > max_{role} {hi}")


def make_policy(name: str, bounds: Bounds, slo: SLO, **options) -> Policy:
    """The named policy; ValueError naming the problem for an unknown name or option, bad
    bounds or SLO, or an option out of range. An option given as None takes its default."""
    if name not in POLICIES:
        raise ValueError(
            f"unknown autoscaling policy {name!r}; choose one of {', '.join(POLICIES)}"
        )
    check_bounds(bounds)
    if slo.ttft_s <= 0 or slo.tpot_s <= 0 or slo.batch_deadline_s <= 0:
        raise ValueError(f"SLO targets must be > 0, got {slo}")
    cls = _options_class(name)
    known = {f.name for f in fields(cls)} if cls else set()
    unknown = sorted(set(options) - known)
    if unknown:
        takes = ", ".join(sorted(known)) or "no options"
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for policy {name!r}; it takes {takes}"
        )
    if cls is None:
        return StaticPolicy()
    opts = cls(**{k: v for k, v in options.items() if v is not None})
    if name == "utilization":
        return UtilizationPolicy(bounds, opts)
    if name == "coordinated":
        colocated_only = bounds.max_prefill == 0 and bounds.max_decode == 0
        if not colocated_only and opts.pd_ratio is None and opts.prefill_tps_per_worker is None:
            raise ValueError(
                "coordinated needs pd_ratio or prefill_tps_per_worker to size the prefill pool "
                "(or bounds with max_prefill=0 and max_decode=0 for a colocated cluster)"
            )
        return CoordinatedPolicy(bounds, slo, opts)
    if name == "mitosis":
        return MitosisPolicy(bounds, slo, opts)
    if name == "modules":
        from tideserve.policy.modules import ModulesPolicy

        return ModulesPolicy(bounds, slo, opts)
    return SLOPolicy(bounds, slo, opts)
