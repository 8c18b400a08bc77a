"""The autoscaler's shell against a scripted router and actuator: scale-out starts workers and
counts them as starting until they register; scale-in drains the least loaded (through
migration when enabled) and stops it only once the router says nothing needs it; an
actuator error does not end the loop."""

from __future__ import annotations

import io
import json
import urllib.error

from autoscaler.service import Autoscaler, AutoscalerConfig
from tideserve.policy.autoscale import Bounds, ScaleTo, SetMaxBatch
from tideserve.policy.modules import (
    DropLayers,
    ReplicateLayers,
    RestoreLayers,
    UnreplicateLayers,
)


class FakeRouter:
    def __init__(self) -> None:
        self.workers: list[dict] = []
        self.calls: list[tuple[str, dict | None]] = []

    def call(self, path: str, body: dict | None = None) -> dict:
        self.calls.append((path, body))
        if path == "/admin/stats":
            return {
                "window_s": 30.0, "decode_tokens_per_s": 0.0, "prefill_tokens_per_s": 0.0,
                "ttft_p90_s": None, "tpot_p90_s": None, "inflight": {"interactive": 0},
                "waiting": {"interactive": 0}, "batch_oldest_wait_s": None,
                "workers": self.workers,
            }  # fmt: skip
        return {}


def worker(wid: str, running: int = 0, requests: int = 0, state: str = "ready") -> dict:
    return {
        "id": wid, "role": "colocated", "state": state, "requests": requests,
        "load": {"running": running, "waiting": 0, "queued_prefill_tokens": 0},
        "kv_blocks_used": running, "kv_blocks_total": 100, "max_num_seqs": 8,
        "registered_at": 10.0, "first_token_at": None, "started_at": 9.0,
        "engine_loaded_at": 9.5, "engine_load_s": 0.4,
    }  # fmt: skip


class FakeActuator:
    name = "fake"

    def __init__(self) -> None:
        self.started: list[str] = []
        self.stopped: list[str] = []
        self.fail = False

    def start(self, role: str) -> str:
        if self.fail:
            raise RuntimeError("the platform said no")
        wid = f"{role}-n{len(self.started)}"
        self.started.append(wid)
        return wid

    def stop(self, worker_id: str, role: str) -> None:
        self.stopped.append(worker_id)

    def close(self) -> None:
        pass


class Scripted:
    name = "scripted"

    def __init__(self) -> None:
        self.next: list = []

    def decide(self, obs):
        self.obs = obs
        out, self.next = self.next, []
        return out


def make(migration: bool = False):
    policy, act, router = Scripted(), FakeActuator(), FakeRouter()
    cfg = AutoscalerConfig(interval_s=0.1, migration=migration)
    a = Autoscaler(cfg, policy, Bounds(0, 0, 0, 0, 1, 3), act)
    a.router = router
    return a, policy, act, router


def test_scale_out_counts_starting_until_registered_then_reports_latency():
    a, policy, act, router = make()
    router.workers = [worker("w0")]
    policy.next = [ScaleTo({"colocated": 2}, "busy")]
    a.tick(now=1.0)
    assert act.started == ["colocated-n0"]
    a.tick(now=2.0)
    assert policy.obs.starting["colocated"] == 1  # launched, not registered yet
    router.workers.append(worker("colocated-n0"))
    a.tick(now=3.0)
    assert policy.obs.starting["colocated"] == 0
    router.workers[-1]["first_token_at"] = router.workers[-1]["registered_at"] + 0.2
    a.tick(now=4.0)
    [b] = a.breakdowns
    assert b["worker"] == "colocated-n0" and b["weight_load"] == 0.4
    assert abs(b["first_step"] - 0.2) < 1e-9
    assert any("scale out colocated 1->2: busy" in line for line in a.log)


def test_scale_in_drains_the_least_loaded_and_stops_it_only_when_idle():
    for migration in (False, True):
        a, policy, act, router = make(migration)
        router.workers = [worker("busy", running=5, requests=5), worker("light", 1, 1)]
        policy.next = [ScaleTo({"colocated": 1}, "quiet")]
        a.tick(now=1.0)
        assert ("/admin/workers/light/drain", {"migrate": migration}) in router.calls
        assert act.stopped == []  # still has a request
        router.workers[1] = worker("light", 0, 0, state="draining")
        a.tick(now=2.0)
        assert act.stopped == ["light"]


def test_max_batch_and_actuator_errors():
    a, policy, act, router = make()
    router.workers = [worker("w0")]
    policy.next = [SetMaxBatch("w0", 4, "tpot over the SLO")]
    a.tick(now=1.0)
    assert ("/admin/workers/w0/limits", {"max_num_seqs": 4}) in router.calls
    act.fail = True
    policy.next = [ScaleTo({"colocated": 2}, "busy")]
    a.tick(now=2.0)  # logged, not raised
    assert act.started == [] and not a.launches


def test_module_actions_go_to_the_router_admin_endpoint():
    a, policy, _, router = make()
    router.workers = [worker("w0", running=8), worker("w1")]
    policy.next = [ReplicateLayers("w0", "w0", 2, 4, 0.5, "hot")]
    a.tick(now=1.0)
    body = {"action": "replicate", "layers": [2, 4], "target": "w0", "share": 0.5}
    assert ("/admin/workers/w0/modules", body) in router.calls
    assert a.log[-1].startswith("replicate layers [2, 4) of w0 on w0")
    policy.next = [UnreplicateLayers("w0", "w0", 2, 4, "calm")]
    a.tick(now=2.0)
    body = {"action": "unreplicate", "layers": [2, 4], "target": "w0"}
    assert ("/admin/workers/w0/modules", body) in router.calls
    policy.next = [DropLayers(("w0", "w1"), 15, "both short of KV")]
    a.tick(now=3.0)  # sent for the first of the pair, the second as the partner
    assert ("/admin/workers/w0/modules", {"action": "drop", "target": "w1"}) in router.calls
    assert a.log[-1] == "drop layers of w0 and w1: both short of KV"
    policy.next = [RestoreLayers(("w0", "w1"), "pressure gone")]
    a.tick(now=4.0)
    assert ("/admin/workers/w0/modules", {"action": "restore", "target": "w1"}) in router.calls
    assert a.log[-1] == "restore layers of w0 and w1: pressure gone"


def test_a_refused_module_action_is_logged_not_raised():
    a, policy, _, router = make()
    router.workers = [worker("w0", running=8), worker("w1")]
    msg = {"error": {"message": "target w1 already hosts a replica (for w2)"}}

    def refuse(path: str, body: dict | None = None) -> dict:
        if path.endswith("/modules"):
            raise urllib.error.HTTPError(
                path, 409, "Conflict", {}, io.BytesIO(json.dumps(msg).encode())
            )
        return FakeRouter.call(router, path, body)

    router.call = refuse
    policy.next = [ReplicateLayers("w0", "w1", 2, 4, 0.5, "hot")]
    assert a.tick(now=1.0) is not None
    assert not any(line.startswith("replicate") for line in a.log)
    policy.next = [DropLayers(("w0", "w1"), 2, "short"), RestoreLayers(("w0", "w1"), "calm")]
    assert a.tick(now=2.0) is not None  # both refused: logged, not raised
    assert not any(line.startswith(("drop", "restore")) for line in a.log)
