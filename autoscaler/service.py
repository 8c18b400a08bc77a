"""The autoscaler: the I/O shell around a pure policy (tideserve/policy/autoscale.py).

Each tick (`interval_s`): GET the router's /admin/stats -> an `Observation` -> `policy.decide`
-> carry out the actions:
    ScaleTo      more workers: the actuator starts them (a new worker gets traffic only after
                 its Hello); fewer: the least-loaded ones are drained through the router
                 (POST /admin/workers/ID/drain), and each is stopped once the router says no
                 request needs it any more (or after `drain_timeout_s`; SIGTERM drains too).
    SetMaxBatch  POST /admin/workers/ID/limits (Chiron's local backpressure).
Every action is logged on one line with the policy's reason and counted in /metrics
(`metrics_port`), with the scale-out latency: decision -> Hello, decision -> first token the
new worker served. At start it brings each pool up to `initial` (at least its minimum); at
stop (SIGINT/SIGTERM) the local actuator stops the workers it started.
"""

from __future__ import annotations

import json
import logging
import signal
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from autoscaler.actuators import Actuator
from tideserve.policy.autoscale import (
    ROLES,
    Bounds,
    Observation,
    Policy,
    ScaleTo,
    SetMaxBatch,
    WorkerObs,
    count,
)
from tideserve.policy.modules import DropLayers, ReplicateLayers, RestoreLayers, UnreplicateLayers

log = logging.getLogger(__name__)
MODULE_ACTIONS = (ReplicateLayers, UnreplicateLayers, DropLayers, RestoreLayers)


@dataclass(frozen=True)
class AutoscalerConfig:
    router_url: str = "http://127.0.0.1:8000"
    api_key: str = field(default="", repr=False)
    interval_s: float = 2.0
    drain_timeout_s: float = 120.0  # a drained worker still busy after this is stopped anyway
    metrics_port: int = 0  # 0: no /metrics server
    initial: dict[str, int] = field(default_factory=dict)  # role -> workers to start with
    migration: bool = False  # scale in by migrating requests away (the router moves them)

    def __post_init__(self) -> None:
        if self.interval_s <= 0 or self.drain_timeout_s <= 0:
            raise ValueError("interval_s and drain_timeout_s must be > 0")


@dataclass
class _Launch:
    role: str
    worker_id: str  # "" when the platform names it
    decided_at: float  # wall clock
    registered_at: float | None = None


def scale_out_breakdown(w: dict, decided_at: float) -> dict[str, float]:
    """Decision -> first served token, by phase, from a worker's /cluster entry (wall clocks):
    process start (spawn, interpreter, imports), weight load, registration (Hello, Welcome),
    first step (until it served a token: waiting for work, then the step)."""
    loaded, load_s = w.get("engine_loaded_at") or 0.0, w.get("engine_load_s") or 0.0
    parts = {"total": w["first_token_at"] - decided_at}
    if loaded:
        parts |= {
            "process_start": loaded - load_s - decided_at,
            "weight_load": load_s,
            "registration": w["registered_at"] - loaded,
            "first_step": w["first_token_at"] - w["registered_at"],
        }
    return parts


class RouterClient:
    def __init__(self, url: str, api_key: str = "", timeout_s: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.timeout_s = timeout_s

    def call(self, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data, self.headers)
        with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
            return json.loads(r.read())


class Metrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.actions = Counter(
            "tideserve_autoscaler_actions", "actions carried out", ["kind", "role"], registry=r
        )
        self.workers = Gauge(
            "tideserve_autoscaler_workers", "workers by role and state", ["role", "state"],
            registry=r,
        )  # fmt: skip
        self.scale_out = Histogram(
            "tideserve_autoscaler_scale_out_seconds",
            "from the decision to the new worker's Hello (registered) or first served token",
            ["role", "phase"],
            buckets=(0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 60, 120),
            registry=r,
        )

    def serve(self, port: int) -> None:
        from prometheus_client import start_http_server

        start_http_server(port, addr="127.0.0.1", registry=self.registry)


class Autoscaler:
    def __init__(
        self, cfg: AutoscalerConfig, policy: Policy, bounds: Bounds, actuator: Actuator
    ) -> None:
        self.cfg = cfg
        self.policy = policy
        self.bounds = bounds
        self.actuator = actuator
        self.router = RouterClient(cfg.router_url, cfg.api_key)
        self.metrics = Metrics()
        self.launches: list[_Launch] = []  # started, no first token served yet
        self.draining: dict[str, tuple[str, float]] = {}  # worker id -> (role, since)
        self.known: set[str] = set()  # worker ids seen registered
        self.stopping = False
        self.log: list[str] = []  # every action's line, for tests and the benchmark
        self.breakdowns: list[dict] = []  # scale-out latency of each new worker, by phase

    # -- one tick ----------------------------------------------------------------------------

    def observe(self, stats: dict, now: float) -> Observation:
        workers = tuple(
            WorkerObs(
                worker_id=w["id"],
                role=w["role"],
                state=w["state"],
                num_running=w["load"]["running"],
                num_waiting=w["load"]["waiting"],
                queued_prefill_tokens=w["load"]["queued_prefill_tokens"],
                kv_blocks_used=w["kv_blocks_used"],
                kv_blocks_total=w["kv_blocks_total"],
                max_num_seqs=w.get("max_num_seqs", 0),
                gpu_util_pct=(w.get("gpu") or {}).get("utilization_pct"),
                layers=tuple((r[0], r[1]) for r in w.get("layers") or ()),
            )
            for w in stats["workers"]
        )
        starting = {r: 0 for r in ROLES}
        for launch in self.launches:
            if launch.registered_at is None:
                starting[launch.role] += 1
        return Observation(
            now=now,
            workers=workers,
            starting=starting,
            window_s=stats["window_s"],
            decode_tokens_per_s=stats["decode_tokens_per_s"],
            prefill_tokens_per_s=stats["prefill_tokens_per_s"],
            ttft_p90_s=stats["ttft_p90_s"],
            tpot_p90_s=stats["tpot_p90_s"],
            queue_wait_p90_s=None,
            inflight=stats["inflight"],
            waiting=stats["waiting"],
            batch_oldest_wait_s=stats.get("batch_oldest_wait_s"),
        )

    def tick(self, now: float | None = None) -> Observation | None:
        now = time.monotonic() if now is None else now
        try:
            stats = self.router.call("/admin/stats")
        except (OSError, urllib.error.URLError, ValueError) as e:
            log.warning("cannot read the router's stats (%s); trying again next tick", e)
            return None
        self._track(stats)
        obs = self.observe(stats, now)
        for role in ROLES:
            self.metrics.workers.labels(role, "starting").set(obs.starting[role])
            for state in ("ready", "draining"):
                n = sum(1 for w in obs.workers if w.role == role and w.state == state)
                self.metrics.workers.labels(role, state).set(n)
        for action in self.policy.decide(obs):
            if isinstance(action, ScaleTo):
                self._scale(obs, action)
            elif isinstance(action, SetMaxBatch):
                self._set_max_batch(action)
            elif isinstance(action, MODULE_ACTIONS):
                self._change_modules(action)
        return obs

    def _track(self, stats: dict) -> None:
        """Registrations and first tokens of launched workers; drained workers to stop."""
        by_id = {w["id"]: w for w in stats["workers"]}
        for launch in list(self.launches):
            w = by_id.get(launch.worker_id)
            if w is None and not launch.worker_id:  # the platform named it: the next new one
                new = [x for x in stats["workers"] if x["id"] not in self.known]
                w = next((x for x in new if x["role"] == launch.role), None)
                if w is not None:
                    launch.worker_id = w["id"]
            if w is None:
                continue
            if launch.registered_at is None:
                launch.registered_at = w["registered_at"]
                dt = w["registered_at"] - launch.decided_at
                self.metrics.scale_out.labels(launch.role, "registered").observe(dt)
                self._say(f"{w['id']} registered {dt:.2f} s after the decision")
            if w.get("first_token_at"):
                parts = scale_out_breakdown(w, launch.decided_at)
                for phase, dt in parts.items():
                    self.metrics.scale_out.labels(launch.role, phase).observe(dt)
                self.breakdowns.append({"worker": w["id"], **parts})
                shown = ", ".join(f"{k} {v:.2f} s" for k, v in parts.items())
                self._say(f"{w['id']} served its first token: {shown}")
                self.launches.remove(launch)
        self.known |= set(by_id)
        now = time.monotonic()
        for wid, (role, since) in list(self.draining.items()):
            w = by_id.get(wid)
            idle = w is None or (w["requests"] == 0 and w["load"]["running"] == 0)
            if idle or now - since > self.cfg.drain_timeout_s:
                try:
                    self.actuator.stop(wid, role)
                except (OSError, RuntimeError, ValueError) as e:  # tried again next tick
                    log.error("could not stop %s: %s", wid, e)
                    continue
                del self.draining[wid]
                self.metrics.actions.labels("stop", role).inc()
                how = "drained" if idle else f"still busy after {self.cfg.drain_timeout_s:.0f} s"
                self._say(f"stopped {wid} ({how})")
        exited = getattr(self.actuator, "exited", lambda: [])()
        for wid in exited:  # crashed on its own: the policy sees the pool shrink and refills it
            self.launches = [x for x in self.launches if x.worker_id != wid]
            self.draining.pop(wid, None)

    def _scale(self, obs: Observation, action: ScaleTo) -> None:
        for role, target in action.targets.items():
            cur = count(obs, role)
            if target > cur:
                for _ in range(target - cur):
                    self._start(role)
                self.metrics.actions.labels("scale_out", role).inc()
                self._say(f"scale out {role} {cur}->{target}: {action.reason}")
            elif target < cur:
                victims = sorted(
                    (w for w in obs.workers if w.role == role and w.state == "ready"),
                    key=lambda w: (w.num_running + w.num_waiting, w.kv_blocks_used, w.worker_id),
                )[: cur - target]
                for w in victims:
                    self._drain(w.worker_id, role)
                self.metrics.actions.labels("scale_in", role).inc()
                self._say(f"scale in {role} {cur}->{target}: {action.reason}")

    def _start(self, role: str) -> None:
        decided = time.time()
        try:
            wid = self.actuator.start(role)
        except (OSError, RuntimeError, ValueError) as e:  # the platform said no: next tick
            log.error("could not start a %s worker: %s", role, e)
            return
        self.launches.append(_Launch(role, wid, decided))

    def _drain(self, wid: str, role: str) -> None:
        try:
            self.router.call(f"/admin/workers/{wid}/drain", {"migrate": self.cfg.migration})
        except (OSError, urllib.error.URLError) as e:
            log.warning("could not drain %s: %s", wid, e)
            return
        self.draining[wid] = (role, time.monotonic())

    def _set_max_batch(self, a: SetMaxBatch) -> None:
        try:
            self.router.call(
                f"/admin/workers/{a.worker_id}/limits", {"max_num_seqs": a.max_num_seqs}
            )
        except (OSError, urllib.error.URLError) as e:
            log.warning("could not cap %s: %s", a.worker_id, e)
            return
        self.metrics.actions.labels("max_batch", "").inc()
        self._say(f"max_num_seqs of {a.worker_id} -> {a.max_num_seqs}: {a.reason}")

    def _change_modules(self, a) -> None:
        """The `modules` policy's actions, through the router's /admin/workers/{id}/modules:
        replicate/unreplicate for the hot worker with the spare one as `target`; drop/restore
        for the pair's first worker with the second as `target` (the router sends both their
        commands: the first keeps the first stage). A refusal is logged, not retried."""
        if isinstance(a, (DropLayers, RestoreLayers)):
            kind = "drop" if isinstance(a, DropLayers) else "restore"
            wid, target = a.worker_ids
            body = {"action": kind, "target": target}
            where = f"layers of {wid} and {target}"
        else:
            kind = "replicate" if isinstance(a, ReplicateLayers) else "unreplicate"
            wid, target = a.worker_id, a.target_id
            body = {"action": kind, "layers": [a.start, a.end], "target": target}
            if isinstance(a, ReplicateLayers):
                body["share"] = a.share
            where = f"layers [{a.start}, {a.end}) of {wid} on {target}"
        try:
            self.router.call(f"/admin/workers/{wid}/modules", body)
        except urllib.error.HTTPError as e:
            log.warning("the router refused %s on %s: %s", kind, wid, _error_text(e))
            return
        except (OSError, urllib.error.URLError) as e:
            log.warning("could not %s layers of %s: %s", kind, wid, e)
            return
        self.metrics.actions.labels(kind, "").inc()
        self._say(f"{kind} {where}: {a.reason}")

    def _say(self, line: str) -> None:
        log.info("%s", line)
        self.log.append(line)

    # -- the loop -----------------------------------------------------------------------------

    def bootstrap(self) -> None:
        """Starts each pool's initial workers (at least its minimum)."""
        for role in ROLES:
            lo, _ = self.bounds.of(role)
            n = max(lo, self.cfg.initial.get(role, 0))
            for _ in range(n):
                self._start(role)
            if n:
                self.metrics.actions.labels("scale_out", role).inc()
                self._say(f"start {n} {role} worker(s): the initial pool")

    def run(self) -> None:
        def stop(signum, frame):
            self.stopping = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        if self.cfg.metrics_port:
            self.metrics.serve(self.cfg.metrics_port)
        self.bootstrap()
        try:
            while not self.stopping:
                t0 = time.monotonic()
                self.tick()
                while not self.stopping and time.monotonic() - t0 < self.cfg.interval_s:
                    time.sleep(0.05)
        finally:
            self.actuator.close()


def _error_text(e: urllib.error.HTTPError) -> str:
    """The router's OpenAI-shaped error message, or the status line."""
    try:
        return json.loads(e.read())["error"]["message"]
    except (ValueError, KeyError, TypeError, OSError):
        return f"HTTP {e.code}"
