"""Parameter dropping across two workers' controllers, in one process (the wire is real: tcp
links, the partner's `ReplicaHost` thread): each worker keeps one of its two stages and runs
the other as a share-1.0 replica on the partner's own weights. The KV pool grows by the blocks
(of every layer) that the freed weight bytes buy, the dropped weights are gone (meta device),
and greedy tokens survive a drop and a restore mid-stream with no leaked block."""

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
from tideserve.engine.elastic import kv_bytes, weight_bytes
from tideserve.protocol import HostReplica, ModuleCommand
from tideserve.roles.modules import ModuleController, ReplicaHost, build_engine


def _pair(path):
    cfg = config(path, layer_stages=2)
    engines = [build_engine(cfg), build_engine(cfg)]
    hosts = [ReplicaHost(cfg, w, e) for w, e in zip(("a", "b"), engines)]
    by_id = {"a": hosts[0], "b": hosts[1]}

    def send(msg):  # what the router does with a HostReplica
        assert isinstance(msg, HostReplica) and msg.reuse
        by_id[msg.host_id].handle_host_replica(msg)

    ctls = [ModuleController(e, w, send) for w, e in zip(("a", "b"), engines)]
    return engines, ctls


def _until(ctls, check, timeout_s=60.0):
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "the partner never said hello"
        for c in ctls:
            c.poll()
        time.sleep(0.01)


def test_drop_grows_the_pool_by_the_freed_weights_and_restore_keeps_tokens(model_dir, expected):  # noqa: F811
    engines, ctls = _pair(model_dir)
    ea, eb = engines
    add(ea, range(0, NUM_REQUESTS, 2))
    add(eb, range(1, NUM_REQUESTS, 2))
    done = steps(engines, {}, 4)
    f = ea.runner.factory
    nb0 = ea.scheduler.pool.num_blocks
    freed = [weight_bytes(ea.runner.stages[1].model), weight_bytes(eb.runner.stages[0].model)]
    block = kv_bytes(f.kv(f.range(0, f.cfg.num_layers), 1))  # one block of every layer

    ctls[0].handle_module_command(ModuleCommand("drop", 0, 2, 1.0, "b"))
    ctls[1].handle_module_command(ModuleCommand("drop", 2, 4, 1.0, "a"))
    _until(ctls, lambda: all(c.dropped.attached for c in ctls))
    assert ctls[0].report()["layers"] == [(0, 2)] and ctls[1].report()["layers"] == [(2, 4)]
    for eng, c, fr in zip(engines, ctls, freed):
        extra = eng.scheduler.pool.num_blocks - nb0
        assert extra == fr // block > 0  # the freed weight bytes, as whole blocks of the pool
        assert extra * block <= fr < (extra + 1) * block
        gone = eng.runner.stages[c.dropped.stage].model
        assert all(p.device.type == "meta" for p in gone.parameters())  # weights freed
        kept = eng.runner.stages[1 - c.dropped.stage]
        assert kept.kv.num_blocks == nb0 + extra
    done = steps(engines, done, 6)
    assert any(e.has_unfinished() for e in engines)

    for c in ctls:
        c.handle_module_command(ModuleCommand("restore", 0, 0, 1.0, ""))
    for eng in engines:
        assert eng.scheduler.pool.num_blocks == nb0
        assert all(s.kv.num_blocks == nb0 for s in eng.runner.stages)
        assert not eng.runner.replicas
        assert all(p.device.type != "meta" for s in eng.runner.stages for p in s.model.parameters())
    assert [c.report()["layers"] for c in ctls] == [[(0, 2), (2, 4)]] * 2
    done = drain(engines, done)
    assert done == expected
    assert [e.scheduler.pool.num_used for e in engines] == [0, 0]
