"""Module-level elasticity, pure: which decoder layers to replicate onto a spare worker
(CoCoServe), when a pair of replicas drops half its layers to borrow KV memory and when it
restores them (KunServe), and the `modules` autoscaling policy built on both.

No torch, no I/O, no clock: observation in, actions out, as every policy in tideserve/policy/.

Replication cost model (`evaluate`, `best_replication`). A hot worker runs a step of T seconds,
the sum of its measured per-layer times t_i at its full batch. Replicating layers [s, e) onto
a spare worker and sending it a share f of the batch there splits that range in two branches
that run at the same time:

    local   = R * h(1 - f)                           the hot worker, the rest of the batch
    remote  = 2 * (lat + f * A / bw) + rho * R * h(f)  hidden states out and back, the replica
    T'      = T - R + max(local, remote)                with R = sum(t_i for s <= i < e)

A is the activation bytes of one step (batch tokens x hidden x dtype bytes), bw and lat the
link's bandwidth and latency, rho the replica's per-layer time over the hot worker's, and
h(x) = phi + (1 - phi) * x (x > 0; h(0) = 0) the share of a layer's time a batch share x
costs: phi is the part that does not shrink with the batch (reading the weights). The gain is
T - T'. Loading the range costs (e - s) * weight bytes per layer, in memory on the replica and
in time at the load bandwidth (the hot worker keeps serving meanwhile). A range is worth it
when the step time it saves over `horizon_s` outweighs its load time:

    net_s = gain / T * horizon_s - load_s

`best_replication` takes the range (and share) with the highest net_s among those that fit the
replica's free memory and gain at least `min_gain` of T; ties go to fewer layers, then the
earlier range. The latency term makes a range of one cheap layer a loss, so the model picks
how many layers as well as which.

Parameter dropping (`DropWatermarks`). Two replicas of a model that are both short of KV
memory (usage >= the high watermark) while requests queue each drop half their layers and run
as one two-stage pipeline, so the freed weight memory joins the KV pool. They restore when the
usage the pair would have after restoring (the pipeline's used tokens over the two full
replicas' capacity) is at or below the low watermark and nothing queues, held for
`restore_window_s`. NOTE: low < high, and a change waits `min_dwell_s` after the last one, so
a pair never flaps: right after a drop its would-be usage is still >= high > low.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tideserve.policy.autoscale import SLO, Bounds, Observation, WorkerObs, busy_fraction, ready

# --- the replication cost model ------------------------------------------------------------


@dataclass(frozen=True)
class ReplicationInputs:
    layer_step_s: tuple[float, ...]  # each layer's step time on the hot worker, full batch
    weight_bytes_per_layer: int  # one decoder layer's parameters, in the serving dtype
    batch_tokens: int  # tokens the hot worker runs per step (decode: its running sequences)
    hidden_size: int
    dtype_bytes: int  # bytes per activation element (2: bf16/fp16, 4: fp32)
    link_bandwidth_bytes_per_s: float  # hot worker <-> replica (shm, tcp, nccl)
    link_latency_s: float  # one crossing, fixed part
    load_bandwidth_bytes_per_s: float  # reading a layer's weights from the checkpoint
    replica_speed: float = 1.0  # replica's per-layer time / the hot worker's (> 1: slower)
    fixed_share: float = 0.0  # phi: share of a layer's time that does not shrink with batch
    replica_free_bytes: int | None = None  # memory the replica has for weights (None: no cap)

    def __post_init__(self) -> None:
        _check(len(self.layer_step_s) > 0, "layer_step_s must name at least one layer", ())
        _check(min(self.layer_step_s) >= 0, "layer_step_s must be >= 0", self.layer_step_s)
        for name in ("weight_bytes_per_layer", "batch_tokens", "hidden_size", "dtype_bytes"):
            _check(getattr(self, name) >= 0, f"{name} must be >= 0", getattr(self, name))
        for name in ("link_bandwidth_bytes_per_s", "load_bandwidth_bytes_per_s", "replica_speed"):
            _check(getattr(self, name) > 0, f"{name} must be > 0", getattr(self, name))
        _check(self.link_latency_s >= 0, "link_latency_s must be >= 0", self.link_latency_s)
        _check(0 <= self.fixed_share <= 1, "fixed_share must be in [0, 1]", self.fixed_share)


@dataclass(frozen=True)
class ReplicationPlan:
    start: int  # first replicated layer
    end: int  # one past the last
    share: float  # of the hot worker's batch that runs the range on the replica
    step_s: float  # the hot worker's step time now
    new_step_s: float  # ... with the replica
    load_bytes: int  # weights the replica loads (and holds)
    load_s: float  # time to load them
    activation_bytes: int  # hidden states sent per step, both directions together
    net_s: float  # gain / step_s * horizon_s - load_s (0 from `evaluate`)

    @property
    def num_layers(self) -> int:
        return self.end - self.start

    @property
    def gain_s(self) -> float:
        return self.step_s - self.new_step_s


def activation_bytes(batch_tokens: int, hidden_size: int, dtype_bytes: int) -> int:
    """Bytes of one step's hidden states: [batch_tokens, hidden_size] in the model dtype."""
    return batch_tokens * hidden_size * dtype_bytes


def evaluate(inp: ReplicationInputs, start: int, end: int, share: float) -> ReplicationPlan:
    """The expected step time of the hot worker with layers [start, end) replicated and `share`
    of its batch running them on the replica (the model in the module docstring)."""
    n = len(inp.layer_step_s)
    if not 0 <= start < end <= n:
        raise ValueError(f"layer range [{start}, {end}) outside the model's {n} layers")
    _check(0 <= share <= 1, "share must be in [0, 1]", share)
    step = sum(inp.layer_step_s)
    r = sum(inp.layer_step_s[start:end])
    act = activation_bytes(inp.batch_tokens, inp.hidden_size, inp.dtype_bytes)
    local = r * _h(1 - share, inp.fixed_share)
    remote = 0.0
    if share > 0:
        crossing = inp.link_latency_s + share * act / inp.link_bandwidth_bytes_per_s
        remote = 2 * crossing + inp.replica_speed * r * _h(share, inp.fixed_share)
    load_bytes = (end - start) * inp.weight_bytes_per_layer
    return ReplicationPlan(
        start=start,
        end=end,
        share=share,
        step_s=step,
        new_step_s=step - r + max(local, remote),
        load_bytes=load_bytes,
        load_s=load_bytes / inp.load_bandwidth_bytes_per_s,
        activation_bytes=int(2 * share * act),
        net_s=0.0,
    )


def best_replication(
    inp: ReplicationInputs,
    shares: tuple[float, ...] = (0.5,),
    horizon_s: float = 60.0,
    min_gain: float = 0.05,
    ranges: tuple[tuple[int, int], ...] | None = None,
) -> ReplicationPlan | None:
    """The plan with the highest net_s over every contiguous range (or only `ranges`: what a
    served worker can hand over, its whole stages) and candidate share, among those that fit
    `replica_free_bytes` and cut the step time by at least `min_gain` of it with net_s > 0;
    None when no plan pays. Ties: fewer layers, then the earlier range."""
    _check(horizon_s > 0, "horizon_s must be > 0", horizon_s)
    best, best_key = None, None
    n = len(inp.layer_step_s)
    if ranges is None:
        ranges = tuple((s, s + size) for size in range(1, n + 1) for s in range(n - size + 1))
    for start, end in ranges:
        size = end - start
        if inp.replica_free_bytes is not None:
            if size * inp.weight_bytes_per_layer > inp.replica_free_bytes:
                continue
        for share in shares:
            plan = evaluate(inp, start, end, share)
            if plan.step_s <= 0 or plan.gain_s < min_gain * plan.step_s:
                continue
            net = plan.gain_s / plan.step_s * horizon_s - plan.load_s
            key = (-round(net, 9), size, start, share)
            if net > 0 and (best_key is None or key < best_key):
                best = ReplicationPlan(**{**plan.__dict__, "net_s": net})
                best_key = key
    return best


def _h(x: float, phi: float) -> float:
    return 0.0 if x <= 0 else phi + (1 - phi) * x


# --- parameter dropping watermarks ---------------------------------------------------------


@dataclass(frozen=True)
class PairUsage:
    """What a pair of replicas looks like this tick."""

    usage: tuple[float, float]  # each one's KV blocks used / total, in its current layout
    num_queued: int  # requests waiting on either
    restore_usage: float  # dropped: the pair's usage if restored now (full layout: = max(usage))


@dataclass(frozen=True)
class Watermarks:
    high: float = 0.9  # both replicas at or above this KV usage (and a queue): drop
    low: float = 0.6  # would-be usage after a restore at or below this (no queue): restore
    restore_window_s: float = 30.0  # ... held this long
    min_dwell_s: float = 30.0  # no change within this of the pair's last one

    def __post_init__(self) -> None:
        _check(0 < self.low < self.high <= 1, "watermarks need 0 < low < high <= 1", self)
        _check(self.restore_window_s >= 0, "restore_window_s must be >= 0", self.restore_window_s)
        _check(self.min_dwell_s >= 0, "min_dwell_s must be >= 0", self.min_dwell_s)


class DropWatermarks:
    """One pair's state machine: "full" <-> "dropped", with hysteresis (module docstring)."""

    def __init__(self, marks: Watermarks) -> None:
        self.marks = marks
        self.dropped = False
        self.last_change = -math.inf
        self.calm_since: float | None = None  # first tick of the current run of restore-able

    def step(self, now: float, pair: PairUsage) -> str | None:
        """ "drop", "restore" or None (and the state moves with it)."""
        m = self.marks
        dwelt = now - self.last_change >= m.min_dwell_s
        if not self.dropped:
            if min(pair.usage) >= m.high and pair.num_queued > 0 and dwelt:
                self._change(now, dropped=True)
                return "drop"
            return None
        if pair.restore_usage > m.low or pair.num_queued > 0:
            self.calm_since = None
            return None
        if self.calm_since is None:
            self.calm_since = now
        if now - self.calm_since >= m.restore_window_s and dwelt:
            self._change(now, dropped=False)
            return "restore"
        return None

    def _change(self, now: float, dropped: bool) -> None:
        self.dropped, self.last_change, self.calm_since = dropped, now, None


# --- the `modules` autoscaling policy ------------------------------------------------------


@dataclass(frozen=True)
class ReplicateLayers:
    worker_id: str  # the hot worker
    target_id: str  # the spare worker that loads layers [start, end) from the checkpoint
    start: int
    end: int
    share: float  # of the hot worker's batch that runs the range on the target
    reason: str


@dataclass(frozen=True)
class UnreplicateLayers:
    worker_id: str
    target_id: str
    start: int
    end: int
    reason: str


@dataclass(frozen=True)
class DropLayers:
    worker_ids: tuple[str, str]  # the first keeps layers [0, split), the second [split, L)
    split: int
    reason: str


@dataclass(frozen=True)
class RestoreLayers:
    worker_ids: tuple[str, str]  # both load back the layers they dropped
    reason: str


ModuleAction = ReplicateLayers | UnreplicateLayers | DropLayers | RestoreLayers


@dataclass(frozen=True)
class ModulesOptions:
    """Defaults describe the embedded default model (SmolLM2-135M, bf16) on one host."""

    num_layers: int = 30
    hidden_size: int = 576
    dtype_bytes: int = 2
    weight_bytes_per_layer: int = 7_080_000  # ~3.54M parameters x 2 bytes
    layer_cost: tuple[float, ...] = ()  # relative per-layer step cost (empty: all equal)
    link_bandwidth_bytes_per_s: float = 2e9  # shm on one host
    link_latency_s: float = 2e-4
    load_bandwidth_bytes_per_s: float = 5e8
    replica_free_bytes: int = 1 << 30  # memory a spare worker gives to replicated weights
    fixed_share: float = 0.0
    shares: tuple[float, ...] = (0.25, 0.5)  # candidate shares of the batch to offload
    horizon_s: float = 60.0  # how long a hotspot is expected to last (cost model)
    min_gain: float = 0.05
    replicate: bool = True  # CoCoServe replication on/off
    drop: bool = True  # KunServe dropping on/off
    hot_busy: float = 0.9  # a worker is hot at this busy fraction with a queue or TPOT threat
    tpot_threat: float = 0.8  # ... TPOT p90 > this x the SLO
    spare_busy: float = 0.3  # a spare worker is at most this busy
    cool_busy: float = 0.5  # a replicated hot worker below this, no queue, TPOT under the
    cool_window_s: float = 60.0  # threat, for this long: unreplicate
    high_watermark: float = 0.9
    low_watermark: float = 0.6
    restore_window_s: float = 30.0
    min_dwell_s: float = 30.0

    def __post_init__(self) -> None:
        _check(self.num_layers >= 2, "num_layers must be >= 2", self.num_layers)
        for name in ("hidden_size", "dtype_bytes", "weight_bytes_per_layer"):
            _check(getattr(self, name) > 0, f"{name} must be > 0", getattr(self, name))
        if self.layer_cost:
            _check(len(self.layer_cost) == self.num_layers, "layer_cost needs num_layers", ())
            _check(min(self.layer_cost) >= 0, "layer_cost must be >= 0", self.layer_cost)
        _check(all(0 < s <= 1 for s in self.shares) and self.shares, "shares in (0, 1]", ())
        for name in ("hot_busy", "spare_busy", "cool_busy", "tpot_threat"):
            _check(0 <= getattr(self, name) <= 1, f"{name} must be in [0, 1]", getattr(self, name))
        _check(self.cool_window_s >= 0, "cool_window_s must be >= 0", self.cool_window_s)
        self.watermarks()  # validates them

    def watermarks(self) -> Watermarks:
        return Watermarks(
            self.high_watermark, self.low_watermark, self.restore_window_s, self.min_dwell_s
        )


@dataclass
class _Replica:
    target_id: str
    start: int
    end: int
    cool_since: float | None = None


@dataclass
class _Pair:
    ids: tuple[str, str]
    marks: DropWatermarks
    full_blocks: tuple[int, int] = (0, 0)  # each one's KV blocks in the full layout


class ModulesPolicy:
    """Replicates layers of a hot decode worker onto a spare one and takes them back when it
    cools (CoCoServe); drops half the layers of two memory-starved replicas and restores them
    (KunServe). One structural change per tick. Its state (replicas, pairs) is what it asked
    for, forgotten as soon as a worker involved leaves the ready set; the shell applies it."""

    name = "modules"

    def __init__(self, bounds: Bounds, slo: SLO, opts: ModulesOptions) -> None:
        self.bounds, self.slo, self.opts = bounds, slo, opts
        self.replicas: dict[str, _Replica] = {}  # hot worker id -> its replica
        self.pairs: dict[tuple[str, str], _Pair] = {}

    def decide(self, obs: Observation) -> list[ModuleAction]:
        by_id = {w.worker_id: w for w in ready(obs, "decode") + ready(obs, "colocated")}
        self._forget(by_id)
        for step in (self._unreplicate, self._restore, self._drop, self._replicate):
            action = step(obs, by_id)
            if action is not None:
                return [action]
        return []

    # -- bookkeeping ------------------------------------------------------------------------

    def _forget(self, by_id: dict[str, WorkerObs]) -> None:
        self.replicas = {
            k: r for k, r in self.replicas.items() if k in by_id and r.target_id in by_id
        }
        self.pairs = {k: p for k, p in self.pairs.items() if all(i in by_id for i in k)}

    def _busy_ids(self) -> set[str]:
        """Workers taking part in a replica or a dropped pair."""
        ids = {k for k in self.replicas} | {r.target_id for r in self.replicas.values()}
        for p in self.pairs.values():
            if p.marks.dropped:
                ids |= set(p.ids)
        return ids

    # -- replication ------------------------------------------------------------------------

    def _tpot(self, obs: Observation, w: WorkerObs) -> float | None:
        return w.tpot_p90_s if w.tpot_p90_s is not None else obs.tpot_p90_s

    def _is_hot(self, obs: Observation, w: WorkerObs) -> bool:
        o, tpot = self.opts, self._tpot(obs, w)
        threat = tpot is not None and tpot > o.tpot_threat * self.slo.tpot_s
        return busy_fraction(w) >= o.hot_busy and (w.num_waiting > 0 or threat)

    def _replicate(self, obs: Observation, by_id: dict[str, WorkerObs]) -> ModuleAction | None:
        o = self.opts
        if not o.replicate:
            return None
        taken = self._busy_ids()
        free = [w for w in by_id.values() if w.worker_id not in taken]
        hot = sorted(
            (w for w in free if self._is_hot(obs, w)), key=lambda w: (-w.num_waiting, w.worker_id)
        )
        spare = sorted(
            (w for w in free if busy_fraction(w) <= o.spare_busy and w.num_waiting == 0),
            key=lambda w: (busy_fraction(w), w.worker_id),
        )
        for h in hot:
            target = next((s for s in spare if s.worker_id != h.worker_id), None)
            tpot = self._tpot(obs, h)
            # NOTE: a served worker hands over whole stages only, never the first (its input is
            # token ids): the router refuses anything else
            ranges = None if h.layers is None else tuple(r for r in h.layers if r[0] > 0)
            if target is None or tpot is None or ranges == ():
                continue
            plan = best_replication(
                self._inputs(h, tpot), o.shares, o.horizon_s, o.min_gain, ranges
            )
            if plan is None:
                continue
            self.replicas[h.worker_id] = _Replica(target.worker_id, plan.start, plan.end)
            reason = (
                f"{h.worker_id} hot (busy {busy_fraction(h):.2f}, {h.num_waiting} waiting, "
                f"TPOT p90 {tpot * 1e3:.1f} ms): replicate layers [{plan.start}, {plan.end}) "
                f"onto {target.worker_id} for {plan.share:.0%} of its batch, step "
                f"{plan.step_s * 1e3:.1f} -> {plan.new_step_s * 1e3:.1f} ms, "
                f"load {plan.load_bytes / 1e6:.0f} MB in {plan.load_s:.2f} s"
            )
            return ReplicateLayers(
                h.worker_id, target.worker_id, plan.start, plan.end, plan.share, reason
            )
        return None

    def _inputs(self, w: WorkerObs, tpot_s: float) -> ReplicationInputs:
        """The cost model's inputs for worker w: its step time (TPOT p90) spread over the
        layers by `layer_cost` (all equal when empty)."""
        o = self.opts
        cost = o.layer_cost or (1.0,) * o.num_layers
        total = sum(cost) or 1.0
        return ReplicationInputs(
            layer_step_s=tuple(tpot_s * c / total for c in cost),
            weight_bytes_per_layer=o.weight_bytes_per_layer,
            batch_tokens=max(1, w.num_running),
            hidden_size=o.hidden_size,
            dtype_bytes=o.dtype_bytes,
            link_bandwidth_bytes_per_s=o.link_bandwidth_bytes_per_s,
            link_latency_s=o.link_latency_s,
            load_bandwidth_bytes_per_s=o.load_bandwidth_bytes_per_s,
            fixed_share=o.fixed_share,
            replica_free_bytes=o.replica_free_bytes,
        )

    def _unreplicate(self, obs: Observation, by_id: dict[str, WorkerObs]) -> ModuleAction | None:
        o = self.opts
        for hot_id in sorted(self.replicas):
            r, w = self.replicas[hot_id], by_id[hot_id]
            tpot = self._tpot(obs, w)
            calm = (
                busy_fraction(w) < o.cool_busy
                and w.num_waiting == 0
                and (tpot is None or tpot <= o.tpot_threat * self.slo.tpot_s)
            )
            if not calm:
                r.cool_since = None
                continue
            if r.cool_since is None:
                r.cool_since = obs.now
            if obs.now - r.cool_since >= o.cool_window_s:
                del self.replicas[hot_id]
                reason = (
                    f"{hot_id} cool for {o.cool_window_s:.0f} s (busy {busy_fraction(w):.2f}, "
                    f"nobody waiting): remove its replica of layers [{r.start}, {r.end}) "
                    f"on {r.target_id}"
                )
                return UnreplicateLayers(hot_id, r.target_id, r.start, r.end, reason)
        return None

    # -- dropping ---------------------------------------------------------------------------

    def _candidate_pairs(self, by_id: dict[str, WorkerObs]) -> list[tuple[str, str]]:
        """Undropped workers outside any replica, paired in id order."""
        taken = self._busy_ids()
        ids = sorted(i for i in by_id if i not in taken)
        return [(ids[k], ids[k + 1]) for k in range(0, len(ids) - 1, 2)]

    def _drop(self, obs: Observation, by_id: dict[str, WorkerObs]) -> ModuleAction | None:
        if not self.opts.drop:
            return None
        for ids in self._candidate_pairs(by_id):
            pair = self.pairs.setdefault(ids, _Pair(ids, DropWatermarks(self.opts.watermarks())))
            a, b = (by_id[i] for i in ids)
            usage = (_usage(a), _usage(b))
            queued = a.num_waiting + b.num_waiting
            if pair.marks.step(obs.now, PairUsage(usage, queued, max(usage))) == "drop":
                pair.full_blocks = (a.kv_blocks_total, b.kv_blocks_total)
                split = self.opts.num_layers // 2
                reason = (
                    f"{ids[0]} and {ids[1]} short of KV (usage {usage[0]:.2f}, {usage[1]:.2f} "
                    f">= {self.opts.high_watermark}) with {queued} queued: drop to layers "
                    f"[0, {split}) and [{split}, {self.opts.num_layers}), one pipeline"
                )
                return DropLayers(ids, split, reason)
        return None

    def _restore(self, obs: Observation, by_id: dict[str, WorkerObs]) -> ModuleAction | None:
        for ids in sorted(self.pairs):
            pair = self.pairs[ids]
            if not pair.marks.dropped:
                continue
            a, b = (by_id[i] for i in ids)
            # NOTE: both stages hold the same sequences; a stage block holds block_size tokens
            # of its layers, so the pipeline's used tokens are one stage's used blocks.
            used = max(a.kv_blocks_used, b.kv_blocks_used)
            would_be = used / max(1, sum(pair.full_blocks))
            queued = a.num_waiting + b.num_waiting
            usage = (_usage(a), _usage(b))
            if pair.marks.step(obs.now, PairUsage(usage, queued, would_be)) == "restore":
                reason = (
                    f"{ids[0]} and {ids[1]}: usage after a restore {would_be:.2f} <= "
                    f"{self.opts.low_watermark} for {self.opts.restore_window_s:.0f} s, nobody "
                    "queued: restore full replicas"
                )
                return RestoreLayers(ids, reason)
        return None


def _usage(w: WorkerObs) -> float:
    return w.kv_blocks_used / w.kv_blocks_total if w.kv_blocks_total else 0.0


def _check(ok: bool, message: str, value: object) -> None:
    if not ok:
        raise ValueError(f"{message}, got {value!r}")
