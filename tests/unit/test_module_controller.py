"""The worker side of module elasticity without processes: `--layer-stages` splits the layers
evenly, and `ModuleController` carries out `ModuleCommand`s between steps (what the worker loop
does), reports the result as heartbeat fields, refuses what does not fit without touching a
request, and keeps the unsplit engine's greedy tokens with no leaked block."""

from __future__ import annotations

import pytest

from tests.unit.test_module_elasticity import (  # noqa: F401
    NUM_REQUESTS,
    add,
    config,
    drain,
    expected,
    model_dir,
    steps,
)
from tideserve.config import EngineConfig
from tideserve.protocol import LayerReplica, ModuleCommand
from tideserve.roles.modules import ModuleController, build_engine, stage_ranges


def test_stage_ranges_split_evenly_and_refuse_impossible_counts():
    assert stage_ranges(30, 2) == [(0, 15), (15, 30)]
    assert stage_ranges(5, 3) == [(0, 2), (2, 4), (4, 5)]
    assert stage_ranges(4, 1) == [(0, 4)]
    for bad in (0, 5):
        with pytest.raises(ValueError, match="layer_stages"):
            stage_ranges(4, bad)
    with pytest.raises(ValueError, match="layer_stages"):
        EngineConfig(layer_stages=-1)


def test_commands_mid_stream_keep_greedy_tokens(model_dir, expected):  # noqa: F811
    engine = build_engine(config(model_dir, layer_stages=2))
    ctl = ModuleController(engine, "w0")
    assert ctl.report() == {"layers": [(0, 2), (2, 4)], "replicas": []}
    add(engine, range(NUM_REQUESTS))
    done = steps([engine], {}, 3)

    ctl.handle_module_command(ModuleCommand("replicate", 2, 4, 0.5))
    (rep,) = ctl.report()["replicas"]
    assert rep.start == 2 and rep.end == 4 and rep.host_id == "w0" and rep.num_seqs > 0
    ctl.handle_module_command(ModuleCommand("replicate", 2, 4))  # refused: already on
    ctl.handle_module_command(ModuleCommand("migrate", 1, 2))  # refused: stage 1 has a replica
    assert ctl.report()["layers"] == [(0, 2), (2, 4)]
    steps([engine], done, 4)

    ctl.handle_module_command(ModuleCommand("unreplicate", 2, 4))
    assert ctl.report()["replicas"] == []
    steps([engine], done, 2)
    ctl.handle_module_command(ModuleCommand("migrate", 1, 2))
    assert ctl.report()["layers"] == [(0, 1), (1, 4)]
    ctl.handle_module_command(ModuleCommand("unreplicate", 0, 1))  # refused: no replica
    ctl.handle_module_command(ModuleCommand("migrate", 2, 3))  # refused: not at an edge
    assert ctl.report() == {"layers": [(0, 1), (1, 4)], "replicas": []}

    assert drain([engine], done) == expected
    assert engine.num_free_blocks == engine.num_total_blocks


def test_a_plain_engine_has_no_layer_stages(model_dir):  # noqa: F811
    engine = build_engine(config(model_dir))
    assert not hasattr(engine.runner, "replicas")
    assert LayerReplica(0, 1, "w", 0.5) == LayerReplica(0, 1, "w", 0.5, 0)
