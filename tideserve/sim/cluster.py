"""The simulated cluster: live policies and the live scheduler on a simulated clock.

Lifecycle of a request (times are simulated seconds from the trace's first arrival):

1. arrival: the router's policy picks workers (`tideserve.policy.routing.route` for colocated
   and disaggregated, `tideserve.policy.padg.place` for partial) from `WorkerView`s of the
   workers' exact state; with no ready worker the request is parked and retried as one joins.
2. the worker's real `Scheduler` (with a real `BlockPool`) takes it; each engine step is
   `schedule()` -> a step event after the performance model's step time -> `update()` with
   token 0 for every sampled sequence (lengths come from the trace: ignore_eos, min_tokens).
3. FuDG: the prefill worker's sequence ends at its first token (TTFT); its KV goes to the
   decode worker chosen at arrival, done at max(step end, step start + bytes / link) (the
   transfer streams layer by layer beside the compute); the decode worker then reserves the
   blocks (waiting for room if it has none) and the sequence joins its running batch.
4. the last token ends the request and fills its `RequestRecord` (bench's record type).

Fast decode runs (`SimConfig.fast_decode`, on by default): when a worker's batch is decode
only (nothing waiting, no prefill chunk, no KV import expected), the scheduler's next steps
are fixed: every running sequence decodes one token, until one of them finishes. The worker
then advances those steps in one event (`_decode_run`), up to the step before the first
finish and before the next barrier event (an arrival, a tick, a worker ready: the only events
that read another worker's state), with the blocks reserved up front as `schedule()` would.
The finishing step and every step that decides anything (admission, chunking, preemption)
run through the live `schedule()`/`update()`. Records, blocks and counters come out the same
as step by step (a test runs both and compares every record).

Workers: starting -> ready -> draining -> stopped. Every `interval_s` the autoscaling policy
(`tideserve.policy.autoscale`) gets an `Observation` and its actions are carried out the way
the live autoscaler does: a scale-out starts a worker after the actuator delay plus the
worker's start-up time; a scale-in drains the least loaded ready workers, which stop once
empty. Worker-seconds are billed from process start to stop.
"""

from __future__ import annotations

import dataclasses
import random
from collections import deque
from collections.abc import Callable

from tideserve.bench.client import percentile
from tideserve.bench.metrics import RequestRecord
from tideserve.bench.traces import TraceRequest
from tideserve.engine.block_pool import BlockPool
from tideserve.engine.scheduler import Scheduler, SchedulerOutput
from tideserve.engine.sequence import SamplingParams, Sequence
from tideserve.policy import padg, routing
from tideserve.policy.autoscale import (
    ROLES,
    Observation,
    Policy,
    ScaleTo,
    SetMaxBatch,
    WorkerObs,
    count,
    make_policy,
)
from tideserve.sim.config import SimConfig, WorkerType
from tideserve.sim.events import EventLoop
from tideserve.sim.perf import kv_transfer_s


class SimWorker:
    """One simulated worker process: a real Scheduler and BlockPool, a simulated clock."""

    def __init__(
        self, worker_id: str, role: str, wtype: WorkerType, sched_cfg, now: float, seed: int = 0
    ):
        perf = wtype.perf
        self.worker_id = worker_id
        self.role = role
        self.wtype = wtype
        self.perf = perf
        self.scheduler = Scheduler(sched_cfg, BlockPool(perf.num_kv_blocks, perf.block_size))
        self.state = "starting"  # starting, ready, draining, stopped
        self.started_at = now  # billing starts: the process runs
        self.stopped_at: float | None = None
        self.is_busy = False  # a step is in flight
        self.queued_prefill_tokens = 0  # prompt tokens not yet computed
        self.pending_blocks = 0  # blocks of FuDG transfers routed here, not yet imported
        self.num_incoming = 0  # those transfers
        self.imports: deque[Sequence] = deque()  # transfers done, waiting for blocks
        self.est = padg.PhaseEstimator()  # partial: measured (simulated) speeds
        self.first_token_at: dict[str, float] = {}  # partial: for slack
        self.phase = "decode"
        # step-time jitter: a stream per worker, so the order workers step in does not matter
        self.rng = random.Random(f"{seed}/{worker_id}")
        self.next_gauss: float | None = None  # drawn by a decode run, not used yet

    def view(self) -> routing.WorkerView:
        pool = self.scheduler.pool
        return routing.WorkerView(
            self.worker_id,
            self.role,
            self.state,
            self.queued_prefill_tokens,
            pool.num_free - self.pending_blocks,
            pool.num_blocks,
            pool.block_size,
            self.scheduler.config.max_model_len,
        )

    def obs(self) -> WorkerObs:
        s = self.scheduler
        return WorkerObs(
            self.worker_id,
            self.role,
            self.state,
            len(s.running),
            len(s.waiting),
            self.queued_prefill_tokens,
            s.pool.num_used,
            s.pool.num_blocks,
            s.config.max_num_seqs,
        )

    def decoding(self) -> list[padg.Decoding]:
        out = []
        for seq in self.scheduler.running:
            t = self.first_token_at.get(seq.request_id)
            if t is not None and not seq.is_prefill:
                out.append(padg.Decoding(t, seq.num_output_tokens))
        return out

    def instance(self, now: float, tpot_slo_s: float) -> padg.Instance:
        pool = self.scheduler.pool
        return padg.Instance(
            self.worker_id,
            self.state == "ready",
            pool.num_free,
            pool.block_size,
            self.queued_prefill_tokens,
            padg.min_slack(self.decoding(), now, tpot_slo_s),
            self.est.prefill_s_per_token,
            self.est.decode_step_s,
        )

    @property
    def is_empty(self) -> bool:
        return not (self.scheduler.has_work or self.num_incoming or self.imports or self.is_busy)

    def peek_gauss(self, sigma: float) -> float:
        if self.next_gauss is None:
            self.next_gauss = self.rng.gauss(1.0, sigma)
        return self.next_gauss

    def jitter(self, sigma: float) -> float:
        """The next step's time factor (the same stream whether steps run one by one or not)."""
        g = self.peek_gauss(sigma)
        self.next_gauss = None
        return max(0.1, g)


class Cluster:
    """Runs one trace through one simulated cluster; `records` hold the results."""

    def __init__(
        self,
        cfg: SimConfig,
        trace: list[TraceRequest],
        policy: Policy | None = None,
        route: Callable = routing.route,
        place: Callable = padg.place,
    ) -> None:
        self.cfg = cfg
        self.trace = trace
        self.route = route  # the live routing policies, passed in so a test can watch them
        self.place = place
        self.policy = policy
        if policy is None and cfg.autoscale is not None:
            a = cfg.autoscale
            self.policy = make_policy(a.policy, a.bounds, _slo_s(cfg), **a.options)
        self.loop = EventLoop()
        self.workers: dict[str, SimWorker] = {}
        self.num_launched = 0
        self.starting: dict[str, int] = {r: 0 for r in ROLES}  # launched, not yet ready
        self.records = [
            RequestRecord(i, r.arrival_s, r.input_tokens, r.output_tokens, r.input_tokens)
            for i, r in enumerate(trace)
        ]
        self.parked: deque[int] = deque()  # arrived with no worker to take them
        self.num_inflight = 0
        self.num_arrived = 0
        self.route_of: dict[str, str] = {}  # FuDG request id -> its decode worker
        self.groups: list[list[str]] = []  # partial: macro instances
        self.active: dict[int, str] = {}
        # metrics for the autoscaler's window
        self.decode_tokens = 0
        self.prefill_tokens = 0
        self.counters: deque[tuple[float, int, int]] = deque()
        self.ttfts: deque[tuple[float, float]] = deque()
        self.tpots: deque[tuple[float, float]] = deque()
        self.samples: list[tuple[float, dict[str, int]]] = []  # workers by role over time
        self.actions: list[tuple[float, str]] = []  # what the policy did, when

    # -- run -------------------------------------------------------------------------------

    def run(self) -> list[RequestRecord]:
        for role, n in self.cfg.pool.items():
            for _ in range(n):
                self._ready(self._launch(role, 0.0))
        self._sample()
        if self.trace:
            self.loop.at(self.trace[0].arrival_s, self._arrive, 0, barrier=True)
        if self.policy is not None and self.cfg.autoscale is not None:
            self.loop.at(0.0, self._tick, barrier=True)
        self.loop.run()
        end = self.end_s
        for w in self.workers.values():
            if w.stopped_at is None:
                w.stopped_at = max(end, w.started_at)
        self._sample()
        for rec in self.records:
            if rec.send_s is not None and rec.end_s is None:  # NOTE: a simulator bug if seen
                rec.error, rec.end_s = "never finished in the simulation", end
        return self.records

    @property
    def end_s(self) -> float:
        ends = [r.end_s for r in self.records if r.end_s is not None]
        return max(ends, default=0.0)

    def worker_seconds(self) -> float:
        return sum(w.stopped_at - w.started_at for w in self.workers.values())

    def gpu_seconds(self) -> float:
        return sum((w.stopped_at - w.started_at) * w.wtype.gpus for w in self.workers.values())

    def cost_usd(self) -> float:
        return sum(
            (w.stopped_at - w.started_at) * w.wtype.gpus * w.wtype.cost_per_gpu_hour / 3600
            for w in self.workers.values()
        )

    # -- arrivals and routing --------------------------------------------------------------

    def _arrive(self, i: int) -> None:
        now = self.loop.now
        rec = self.records[i]
        rec.send_s = now
        self.num_arrived += 1
        self.num_inflight += 1
        if i + 1 < len(self.trace):
            self.loop.at(self.trace[i + 1].arrival_s, self._arrive, i + 1, barrier=True)
        n = max(1, rec.input_tokens)
        if n >= self.cfg.scheduler.max_model_len:
            self._fail(rec, 400, f"prompt of {n} tokens >= max_model_len")
            return
        if not self._dispatch(i):
            self.parked.append(i)

    def _dispatch(self, i: int) -> bool:
        rec = self.records[i]
        n = max(1, rec.input_tokens)
        if self.cfg.mode == "partial":
            return self._dispatch_partial(i, n)
        r = self.route([w.view() for w in self._routable()], n)
        if r is None:
            return False
        rid = str(i)
        if r.prefill is None:
            self._admit(self.workers[r.target], rid, n, rec.output_tokens, False)
            return True
        target = self.workers[r.target]
        target.pending_blocks += routing.blocks_for(n + 1, target.perf.block_size)
        target.num_incoming += 1
        self.route_of[rid] = r.target
        self._admit(self.workers[r.prefill], rid, n, 1, True)
        return True

    def _dispatch_partial(self, i: int, n: int) -> bool:
        now, tpot = self.loop.now, self.cfg.slo.tpot_ms / 1e3
        ttft = self.cfg.slo.ttft_ms / 1e3
        inst = {w.worker_id: w.instance(now, tpot) for w in self._routable()}
        p = self.place(self.groups, self.active, inst, n, ttft)
        if p is None:
            return False
        self.active[p.group] = p.active
        rec = self.records[i]
        self._admit(self.workers[p.worker_id], str(i), n, rec.output_tokens, False)
        return True

    def _routable(self) -> list[SimWorker]:
        return [w for w in self.workers.values() if w.state in ("ready", "draining")]

    def _admit(self, w: SimWorker, rid: str, n: int, out: int, hold_kv: bool) -> None:
        out = max(1, out)
        params = SamplingParams(max_tokens=out, min_tokens=out, ignore_eos=True, temperature=0)
        # NOTE: the scheduler reads only the prompt's length: a range stands in for token ids
        seq = Sequence(rid, range(n), params, hold_kv=hold_kv, arrival_time=self.loop.now)
        w.scheduler.add(seq)
        w.queued_prefill_tokens += n
        self._kick(w)

    def _retry_parked(self) -> None:
        while self.parked and self._dispatch(self.parked[0]):
            self.parked.popleft()

    def _fail(self, rec: RequestRecord, status: int, error: str) -> None:
        rec.status, rec.error, rec.end_s = status, error, self.loop.now
        self.num_inflight -= 1

    # -- engine steps ----------------------------------------------------------------------

    def _kick(self, w: SimWorker) -> None:
        if w.is_busy or w.state in ("starting", "stopped"):
            return
        sched = w.scheduler
        if not sched.has_work:
            if w.state == "draining" and w.is_empty:
                self._stop(w)
            return
        now = self.loop.now
        if self.cfg.fast_decode and self._decode_run(w, now):
            return
        phase, budget = self._phase(w, now) if w.role == "partial" else ("", None)
        out = sched.schedule(now, phase, budget)
        if out.preempted:
            w.queued_prefill_tokens = sum(
                s.num_tokens - s.num_computed_tokens
                for s in (*sched.waiting, *sched.running)
                if s.is_prefill
            )
        if out.is_empty:
            return  # no room: a finishing import or transfer kicks it again
        p = c = a = 0
        for it in out.prefills:
            n = it.num_tokens
            p += n
            c += it.start + n
            a += n * it.start + n * (n + 1) // 2  # perf.attention_pairs, inline
        for it in out.decodes:
            c += it.start + 1
        d = len(out.decodes)
        dur = w.perf.step_s(p, d, c, a)
        if self.cfg.step_jitter:
            dur *= w.jitter(self.cfg.step_jitter)
        w.is_busy = True
        w.phase = phase
        self.loop.at(now + dur, self._step_done, (w, out, p, d, dur, now))

    def _step_done(self, arg: tuple[SimWorker, SchedulerOutput, int, int, float, float]) -> None:
        w, out, p, d, dur, started = arg
        now = self.loop.now
        w.is_busy = False
        w.queued_prefill_tokens -= p
        self.prefill_tokens += p
        self.decode_tokens += d
        if w.role == "partial":
            if p and not d:
                w.est.observe_prefill(p, dur)
            elif d and not p:
                w.est.observe_decode(dur)
        sampled = {}
        records, itl = self.records, self.cfg.record_itl
        for group in (out.decodes, out.prefills):
            for it in group:
                if not it.sample:
                    continue
                rid = it.seq.request_id
                sampled[rid] = 0
                rec = records[int(rid)]
                if rec.first_token_s is None:
                    rec.first_token_s = now
                    self.ttfts.append((now, now - rec.send_s))
                    if w.role == "partial":
                        w.first_token_at[rid] = now
                elif itl:
                    rec.itl_ms.append((now - rec.last_token_s) * 1e3)
                rec.last_token_s = now
        for seq in w.scheduler.update(out, sampled):
            if w.role == "prefill":
                self._hand_off(w, seq, started, now)
            else:
                self._finish(seq, now)
                w.first_token_at.pop(seq.request_id, None)
        self._import(w)
        self._kick(w)

    # -- fast decode runs ------------------------------------------------------------------

    def _decode_run(self, w: SimWorker, now: float) -> bool:
        """Starts a run of decode-only steps in one event, if the batch allows one (see the
        module docstring); False leaves the step to the live scheduler."""
        sched = w.scheduler
        running = sched.running
        if (
            w.role == "prefill"
            or w.num_incoming
            or w.imports
            or sched.waiting
            or len(running) > sched.config.max_num_batched_tokens
        ):
            return False
        max_len = sched.config.max_model_len
        k = max_len
        ctx = 0
        for seq in running:
            n = len(seq.prompt_token_ids) + len(seq.output_token_ids)
            p = seq.params
            if n - seq.num_computed_tokens != 1 or p.stop_token_ids or not p.ignore_eos:
                return False
            k = min(k, p.max_tokens - len(seq.output_token_ids), max_len - n)
            ctx += n
        k = self._blocks_for_run(w, k - 1)  # NOTE: the step that finishes a sequence runs live
        if k < 2:
            return False
        # the steps that end before the next barrier; step j reads ctx + (j - 1) * d tokens
        barrier, d, sigma = self.loop.next_barrier_s, len(running), self.cfg.step_jitter
        ends: list[float] = []
        durs: list[float] = []
        t = now
        if sigma:
            for j in range(k):
                dur = w.perf.step_s(0, d, ctx + j * d, 0) * max(0.1, w.peek_gauss(sigma))
                if t + dur >= barrier:
                    break  # NOTE: the draw stays with the worker for its next step
                w.jitter(sigma)
                t += dur
                ends.append(t)
                durs.append(dur)
        else:
            # NOTE: step_s(0, d, c, 0) term by term, so the sums are bit for bit the live path's
            fit = w.perf.step
            fixed = fit.base_s + fit.prefill_token_s * 0 + fit.decode_seq_s * d
            per_ctx, no_pairs, c = fit.context_token_s, fit.prefill_pair_s * 0, ctx
            for _ in range(k):
                dur = fixed + per_ctx * c + no_pairs
                if t + dur >= barrier:
                    break
                t += dur
                ends.append(t)
                durs.append(dur)
                c += d
        if not ends:
            return False
        pool, k = sched.pool, len(ends)
        for seq in running:  # as schedule() reserves them, step by step
            if not pool.grow_table(seq.block_table, seq.num_computed_tokens + k):
                raise RuntimeError("a decode run found fewer free blocks than it counted")
        w.is_busy = True
        w.phase = "decode" if w.role == "partial" else ""
        self.loop.at(ends[-1], self._decode_run_done, (w, tuple(running), ends, durs))
        return True

    @staticmethod
    def _blocks_for_run(w: SimWorker, k: int) -> int:
        """The most decode steps, up to `k`, whose new blocks the pool has free now."""
        pool = w.scheduler.pool
        bs, free, running = pool.block_size, pool.num_free, w.scheduler.running

        def missing(j: int) -> int:
            return sum(-(-(s.num_computed_tokens + j) // bs) - len(s.block_table) for s in running)

        if missing(k) <= free:
            return k
        lo, hi = 0, k  # missing(lo) fits, missing(hi) does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if missing(mid) <= free else (lo, mid)
        return lo

    def _decode_run_done(self, arg: tuple[SimWorker, tuple[Sequence, ...], list, list]) -> None:
        """Applies a decode run's steps: one token per sequence per step, at each step's end."""
        w, seqs, ends, durs = arg
        k, d = len(ends), len(seqs)
        w.is_busy = False
        self.decode_tokens += k * d
        if w.role == "partial":
            for dur in durs:
                w.est.observe_decode(dur)
        records, itl = self.records, self.cfg.record_itl
        tokens = [0] * k
        for seq in seqs:
            seq.num_computed_tokens += k
            seq.output_token_ids += tokens
            rec = records[int(seq.request_id)]
            if itl:
                last = rec.last_token_s
                for t in ends:
                    rec.itl_ms.append((t - last) * 1e3)
                    last = t
            rec.last_token_s = ends[-1]
        self._kick(w)

    def _finish(self, seq: Sequence, now: float) -> None:
        rec = self.records[int(seq.request_id)]
        rec.end_s = now
        rec.num_output_tokens = seq.num_output_tokens
        rec.finish_reason = seq.status.value
        rec.status = 200
        self.num_inflight -= 1
        if rec.tpot_ms is not None:
            self.tpots.append((now, rec.tpot_ms / 1e3))

    # -- FuDG hand-off -----------------------------------------------------------------------

    def _hand_off(self, w: SimWorker, seq: Sequence, started: float, now: float) -> None:
        """The prefill is done and its first token out: free the prefill worker's blocks and
        send the KV to the decode worker chosen at arrival (or end a one-token request)."""
        w.scheduler.release(seq)
        rid = seq.request_id
        target = self.workers[self.route_of.pop(rid)]
        rec = self.records[int(rid)]
        if rec.output_tokens <= 1 or seq.num_tokens >= self.cfg.scheduler.max_model_len:
            target.pending_blocks -= routing.blocks_for(
                seq.num_prompt_tokens + 1, target.perf.block_size
            )
            target.num_incoming -= 1
            self._finish(seq, now)
            self._kick(target)
            return
        nbytes = seq.num_prompt_tokens * w.perf.kv_bytes_per_token
        xfer = kv_transfer_s(nbytes, self.cfg.kv_link_gbps, self.cfg.kv_link_latency_s)
        done = max(now, started + xfer) + self.cfg.kv_link_latency_s
        out = rec.output_tokens
        params = SamplingParams(max_tokens=out, min_tokens=out, ignore_eos=True, temperature=0)
        moved = Sequence(rid, seq.prompt_token_ids, params, arrival_time=seq.arrival_time)
        moved.output_token_ids = [0]
        self.loop.at(done, self._kv_arrived, (target, moved))

    def _kv_arrived(self, arg: tuple[SimWorker, Sequence]) -> None:
        w, seq = arg
        w.pending_blocks -= routing.blocks_for(seq.num_prompt_tokens + 1, w.perf.block_size)
        w.num_incoming -= 1
        w.imports.append(seq)
        self._import(w)
        self._kick(w)

    def _import(self, w: SimWorker) -> None:
        """Transfers done join the running batch, in order, while the pool has room."""
        pool = w.scheduler.pool
        while w.imports:
            seq = w.imports[0]
            if not pool.grow_table(seq.block_table, seq.num_prompt_tokens):
                return
            w.imports.popleft()
            seq.num_computed_tokens = seq.num_prompt_tokens
            w.scheduler.add_running(seq)

    # -- partial: the phase rule of tideserve/roles/phases.py ------------------------------

    def _phase(self, w: SimWorker, now: float) -> tuple[str, int | None]:
        sched = w.scheduler
        pending = sum(s.num_tokens - s.num_computed_tokens for s in sched.waiting)
        pending += sum(s.num_tokens - s.num_computed_tokens for s in sched.running if s.is_prefill)
        if pending == 0:
            return "decode", None
        decoding = w.decoding()
        if not decoding:
            return "prefill", None
        budget = padg.prefill_token_budget(
            now, decoding, self.cfg.slo.tpot_ms / 1e3, w.est.prefill_s_per_token,
            w.est.decode_step_s, sched.config.max_num_batched_tokens,
        )  # fmt: skip
        if budget >= min(padg.MIN_CHUNK, pending):
            return "prefill", budget
        return "decode", None

    # -- workers: launch, ready, drain, stop -----------------------------------------------

    def _launch(self, role: str, now: float) -> SimWorker:
        self.num_launched += 1
        wid = f"{role}-{self.num_launched}"
        w = SimWorker(wid, role, self.cfg.workers[role], self.cfg.scheduler, now, self.cfg.seed)
        self.workers[wid] = w
        self.starting[role] += 1
        return w

    def _ready(self, w: SimWorker) -> None:
        self.starting[w.role] -= 1
        w.state = "ready"
        if w.role == "partial":
            self.groups = padg.join(self.groups, w.worker_id, self.cfg.macro_n_max)
        self._sample()
        self._retry_parked()

    def _drain(self, w: SimWorker) -> None:
        w.state = "draining"
        if w.role == "partial":
            self.groups = padg.leave(
                self.groups, w.worker_id, self.cfg.macro_n_min, self.cfg.macro_n_max
            )
            self.active = {g: a for g, a in self.active.items() if a != w.worker_id}
        self._sample()
        if w.is_empty:
            self._stop(w)

    def _stop(self, w: SimWorker) -> None:
        w.state = "stopped"
        w.stopped_at = self.loop.now
        self._sample()

    def _sample(self) -> None:
        by_role = {r: 0 for r in ROLES}
        for w in self.workers.values():
            if w.state != "stopped":
                by_role[w.role] += 1
        self.samples.append((self.loop.now, by_role))

    # -- autoscaling -----------------------------------------------------------------------

    def _tick(self, _=None) -> None:
        a = self.cfg.autoscale
        now = self.loop.now
        obs = self.observe(now, a.window_s)
        for action in self.policy.decide(obs):
            if isinstance(action, ScaleTo):
                self._scale(obs, action)
            elif isinstance(action, SetMaxBatch):
                w = self.workers.get(action.worker_id)
                if w is not None and action.max_num_seqs >= 1:
                    cfg = dataclasses.replace(w.scheduler.config, max_num_seqs=action.max_num_seqs)
                    w.scheduler.config = cfg
            self.actions.append((now, getattr(action, "reason", "")))
        if self.num_arrived < len(self.trace) or self.num_inflight > 0:
            self.loop.at(now + a.interval_s, self._tick, barrier=True)

    def observe(self, now: float, window_s: float) -> Observation:
        self.counters.append((now, self.decode_tokens, self.prefill_tokens))
        while len(self.counters) > 1 and self.counters[1][0] <= now - window_s:
            self.counters.popleft()
        for q in (self.ttfts, self.tpots):
            while q and q[0][0] < now - window_s:
                q.popleft()
        t0, dec0, pre0 = self.counters[0]
        span = max(now - t0, 1e-9)
        live = [w for w in self.workers.values() if w.state in ("ready", "draining")]
        waiting = len(self.parked) + sum(len(w.scheduler.waiting) for w in live)
        return Observation(
            now=now,
            workers=tuple(w.obs() for w in live),
            starting=dict(self.starting),
            window_s=window_s,
            decode_tokens_per_s=(self.decode_tokens - dec0) / span if now > t0 else 0.0,
            prefill_tokens_per_s=(self.prefill_tokens - pre0) / span if now > t0 else 0.0,
            ttft_p90_s=percentile([v for _, v in self.ttfts], 90) if self.ttfts else None,
            tpot_p90_s=percentile([v for _, v in self.tpots], 90) if self.tpots else None,
            queue_wait_p90_s=None,
            inflight={"interactive": self.num_inflight, "batch": 0},
            waiting={"interactive": waiting, "batch": 0},
        )

    def _scale(self, obs: Observation, action: ScaleTo) -> None:
        """As autoscaler/service.py: start the missing workers, drain the least loaded."""
        now = self.loop.now
        for role, target in action.targets.items():
            if role not in self.cfg.workers:
                continue
            cur = count(obs, role)
            for _ in range(target - cur):
                w = self._launch(role, now + self.cfg.autoscale.actuator_delay_s)
                self.loop.at(w.started_at + w.perf.startup_s, self._ready, w, barrier=True)
            if target < cur:
                victims = sorted(
                    (w for w in obs.workers if w.role == role and w.state == "ready"),
                    key=lambda w: (w.num_running + w.num_waiting, w.kv_blocks_used, w.worker_id),
                )[: cur - target]
                for v in victims:
                    self._drain(self.workers[v.worker_id])


def _slo_s(cfg: SimConfig):
    from tideserve.policy.autoscale import SLO

    return SLO(ttft_s=cfg.slo.ttft_ms / 1e3, tpot_s=cfg.slo.tpot_ms / 1e3)
