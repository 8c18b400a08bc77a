"""Migration of a whole stage onto another worker, in one process (the wire is real: a tcp link,
the destination's `ReplicaHost` thread): worker A's last stage [2, 4) moves to B (B loads only
those layers, every live sequence's KV of them crosses over, A frees its copy: meta device),
then moves back (A reloads the layers, the KV comes back). Greedy tokens equal the unsplit
engine's, with no leaked block."""

from __future__ import annotations

import time

from tests.unit.test_module_elasticity import (  # noqa: F401
    NUM_REQUESTS,
    add,
    config,
    drain,
    expected,
    model_dir,
    steps,
)
from tideserve.protocol import HostReplica, ModuleCommand
from tideserve.roles.modules import ModuleController, ReplicaHost, build_engine


def test_migrate_a_stage_to_another_worker_and_back_mid_stream(model_dir, expected):  # noqa: F811
    cfg = config(model_dir, layer_stages=2)
    ea = build_engine(cfg)
    host = ReplicaHost(cfg, "b")  # B needs no engine: it loads the range itself

    def send(msg):  # what the router does with a HostReplica
        assert isinstance(msg, HostReplica) and not msg.reuse and msg.share == 1.0
        host.handle_host_replica(msg)

    ctl = ModuleController(ea, "a", send)
    add(ea, range(NUM_REQUESTS))
    done = steps([ea], {}, 4)
    ctl.handle_module_command(ModuleCommand("migrate", 0, 2, 1.0, "b"))  # not the first stage
    assert not ctl.pending and not ctl.moved
    ctl.handle_module_command(ModuleCommand("migrate", 2, 4, 0.5, "b"))
    deadline = time.monotonic() + 60
    while not ctl.moved.get(1):
        assert time.monotonic() < deadline, "B never said hello"
        ctl.poll()
        time.sleep(0.01)
    gone = ea.runner.stages[1]
    assert all(p.device.type == "meta" for p in gone.model.parameters())  # A's copy is freed
    rep = ea.runner.replicas[1]
    started = {s.request_id for s in ea.seqs.values() if s.num_computed_tokens}
    assert rep.share == 1.0 and started and started <= set(rep.offloaded)  # all their KV moved
    report = ctl.report()
    assert report["layers"] == [(0, 2)]
    (r,) = report["replicas"]
    assert (r.start, r.end, r.host_id, r.share) == (2, 4, "b", 1.0)
    (hosted,) = host.report()
    assert hosted.head_id == "a" and hosted.kv_bytes > 0
    done = steps([ea], done, 8)
    assert ea.has_unfinished()

    ctl.handle_module_command(ModuleCommand("unreplicate", 2, 4, 1.0, "b"))  # moves it back
    assert not ea.runner.replicas and not ctl.moved
    assert all(p.device.type != "meta" for p in ea.runner.stages[1].model.parameters())
    assert ctl.report() == {"layers": [(0, 2), (2, 4)], "replicas": []}
    done = drain([ea], done)
    assert done == expected
    assert ea.scheduler.pool.num_used == 0
