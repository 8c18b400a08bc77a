"""Module elasticity inside one worker (`--layer-stages N`): its engine runs the model as N
layer stages over an `ElasticRunner`, and the router's `ModuleCommand` changes them.

A command's life: the router checks it against the worker's last heartbeat and sends it ->
the worker loop hands it to `handle_module_command` between two engine steps -> the runner
replicates a stage (the KV of the sequences handed over is copied first), hands a replica's
sequences back, or moves a layer range to the neighbouring stage -> the next heartbeat's
`layers` and `replicas` show the result. A command the runner refuses is logged and changes
nothing; no request is touched either way. Replicas live in this process (its own weights
and KV cache for the range), so `LayerReplica.host_id` is this worker.
"""

from __future__ import annotations

import logging

from tideserve.protocol import LayerReplica, ModuleCommand

log = logging.getLogger(__name__)


def build_engine(config):
    """The worker's engine: the plain one, or with `layer_stages` an elastic pipeline of that
    many stages of (nearly) equal layer counts."""
    from tideserve.engine.engine import LLMEngine

    if not config.layer_stages:
        return LLMEngine.from_config(config)
    import torch

    from tideserve.engine.elastic import build_elastic_engine
    from tideserve.engine.engine import resolve_model_path
    from tideserve.engine.model_config import ModelConfig

    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    num_layers = ModelConfig.from_dir(resolve_model_path(config.model)).num_layers
    return build_elastic_engine(config, stage_ranges(num_layers, config.layer_stages))


def stage_ranges(num_layers: int, num_stages: int) -> list[tuple[int, int]]:
    """[start, end) of each of `num_stages` contiguous stages; earlier ones take the remainder."""
    if not 1 <= num_stages <= num_layers:
        raise ValueError(f"layer_stages must be in 1..{num_layers} (the model's layers)")
    q, r = divmod(num_layers, num_stages)
    bounds = [0]
    for i in range(num_stages):
        bounds.append(bounds[-1] + q + (i < r))
    return list(zip(bounds, bounds[1:]))


class ModuleController:
    """Carries out `ModuleCommand`s on an elastic engine and reports its layers."""

    def __init__(self, engine, worker_id: str) -> None:
        self.engine = engine
        self.runner = engine.runner
        self.wid = worker_id

    def handle_module_command(self, msg: ModuleCommand) -> None:
        try:
            self._apply(msg)
        except (ValueError, KeyError) as e:
            log.warning("refusing %s on %s: %s", msg, self.wid, e)
            return
        log.info("layers now %s, replicas %s", self.report()["layers"], self._replicas())

    def _apply(self, msg: ModuleCommand) -> None:
        ranges = self._layers()
        seqs = list(self.engine.seqs.values())
        if msg.action == "replicate":
            self.runner.replicate(ranges.index((msg.start, msg.end)), seqs, msg.share)
        elif msg.action == "unreplicate":
            self.runner.unreplicate(ranges.index((msg.start, msg.end)))
        else:
            src = next((i for i, (a, b) in enumerate(ranges) if a <= msg.start < b), None)
            if src is None:
                raise ValueError(f"layer {msg.start} is in no stage of {ranges}")
            dst = src + 1 if msg.end == ranges[src][1] else src - 1
            if not 0 <= dst < len(ranges):
                raise ValueError(f"layers [{msg.start}, {msg.end}) have no neighbouring stage")
            self.runner.migrate(src, dst, msg.start, msg.end, seqs)

    def _layers(self) -> list[tuple[int, int]]:
        return [(s.layers.start, s.layers.end) for s in self.runner.stages]

    def _replicas(self) -> list[LayerReplica]:
        out = []
        for i in sorted(self.runner.replicas):
            rep = self.runner.replicas[i]
            r = rep.stage.layers
            live = sum(not s.is_finished for s in rep.offloaded.values())
            hello = getattr(rep.stage, "hello", None)  # a replica in another process
            host = hello.worker_id if hello is not None else self.wid
            out.append(LayerReplica(r.start, r.end, host, rep.share, live))
        return out

    def report(self) -> dict:
        """The heartbeat's `layers` and `replicas` fields."""
        return {"layers": self._layers(), "replicas": self._replicas()}
