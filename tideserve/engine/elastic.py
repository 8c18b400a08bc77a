"""Module-level elasticity in one process: a pipeline whose layer ranges change while requests
run. Three mechanisms, each between two scheduler steps:

- **Replication** (CoCoServe). A replica of stage i (same layer range, its own weights read from
  the checkpoint, its own KV cache for those layers) computes the range for a share of the
  batch; the primary computes the rest. Rule for turning it on mid-stream: the KV of the
  range's layers for the sequences handed to the replica is copied to the replica first
  (`export_layer`/`import_layer`, what a transport would carry). Sequences that start (or
  restart after preemption) while it is on are dealt out by `share` and need no copy. Off:
  the replica's KV of its sequences is copied back, then the replica is dropped.
- **Migration.** A layer range at the boundary of two neighbouring stages moves: its weights
  load on the destination, the KV of those layers for every live sequence is copied, then
  ownership switches (the source drops the layers and their KV).
- **Parameter dropping** (KunServe). Two full engines become one two-stage pipeline: the first
  keeps layers [0, h), the second [h, L); the dropped weights' bytes go to the KV pool. Rule
  for running requests: nothing is recomputed. The KV of kept layers stays with its worker; the
  KV of dropped layers is moved to the layer's owner. (In one process every block is re-laid
  into the merged pool, so block ids change; `DropRecord.moved_bytes` counts only what would
  cross workers.) Restore reloads the dropped layers, shrinks the pools back, and returns each
  sequence to the engine it came from (new ones alternate); a sequence that no longer fits is
  preempted (recomputed later), as the scheduler would.

Every replica and stage shares the pipeline's one scheduler and block pool, so a replica's KV
cache is indexed by the same block ids (in one process it is sized like the primary's).
"""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from tideserve.config import EngineConfig
from tideserve.engine.block_pool import BlockPool
from tideserve.engine.kv_cache import KVCache, num_blocks_for_budget
from tideserve.engine.linear import PackedLinear
from tideserve.engine.loader import resolve_dtype
from tideserve.engine.model_config import ModelConfig
from tideserve.engine.sampler import SampleResult
from tideserve.engine.scheduler import ScheduledSeq, Scheduler, SchedulerConfig, SchedulerOutput
from tideserve.engine.sequence import Sequence
from tideserve.engine.stages import (
    LayerRange,
    PipelineRunner,
    Stage,
    StageModel,
    load_stage,
    stage_config,
)


@dataclass
class StageFactory:
    """Everything needed to load a layer range from the checkpoint and size its KV cache."""

    path: object
    cfg: ModelConfig
    dtype: torch.dtype
    device: torch.device
    max_positions: int
    block_size: int
    load_format: str = "safetensors"

    @classmethod
    def from_config(cls, config: EngineConfig) -> StageFactory:
        from tideserve.engine.engine import resolve_device, resolve_model_path

        path = resolve_model_path(config.model)
        cfg = ModelConfig.from_dir(path)
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, cfg, device)
        max_len = config.max_model_len or cfg.max_context
        return cls(path, cfg, dtype, device, max_len, config.block_size, config.load_format)

    def range(self, start: int, end: int) -> LayerRange:
        return LayerRange(start, end, self.cfg.num_layers)

    def model(self, r: LayerRange) -> StageModel:
        args = (self.path, self.cfg, self.dtype, self.device, self.max_positions, r)
        return load_stage(*args, self.load_format)

    def kv(self, r: LayerRange, num_blocks: int) -> KVCache:
        cfg = stage_config(self.cfg, r)
        return KVCache(cfg, num_blocks, self.block_size, self.dtype, self.device)

    def stage(self, r: LayerRange, num_blocks: int) -> Stage:
        return Stage(self.model(r), self.kv(r, num_blocks), self.device)

    def num_blocks(self, r: LayerRange, budget_bytes: int) -> int:
        return num_blocks_for_budget(stage_config(self.cfg, r), self.block_size, self.dtype,
                                     budget_bytes)  # fmt: skip


def assemble(factory: StageFactory, r: LayerRange, parts: list[StageModel]) -> StageModel:
    """A `StageModel` for `r` built from modules the `parts` already hold (no copy, no load):
    how a stage grows (migration in, restore) or shrinks (migration out, dropping)."""
    with torch.device("meta"):
        model = StageModel(factory.cfg, 1, r)
    layers = {k: m for p in parts for k, m in p.model.layers.items()}
    for i in range(r.start, r.end):
        model.model.layers[str(i)] = layers[str(i)]
    if r.is_first:
        model.model.embed_tokens = next(
            p for p in parts if p.layer_range.is_first
        ).model.embed_tokens
    if r.is_last:
        last = next(p for p in parts if p.layer_range.is_last)
        model.model.norm, model.lm_head = last.model.norm, last.lm_head
    model.rotary = parts[0].rotary
    return model.eval()


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's weights, packed linears (not in the state dict) included."""
    n = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    for m in model.modules():
        if isinstance(m, PackedLinear):
            elem = torch.empty((), dtype=m.packed.dtype).element_size()
            n += m.in_features * m.out_features * elem
    return n


def kv_bytes(kv: KVCache) -> int:
    return kv.tensor.numel() * kv.tensor.element_size()


def copy_kv(
    src: KVCache, src_layer0: int, dst: KVCache, dst_layer0: int, num_layers: int,
    seqs: list[Sequence], dst_tables: list[list[int]] | None = None,
) -> int:  # fmt: skip
    """Copies `num_layers` layers of each sequence's computed KV (src layers src_layer0.., dst
    layers dst_layer0..), through the per-layer export/import a transport uses. `dst_tables`:
    the sequences' block tables on the destination (default: the same blocks). Bytes moved."""
    moved = 0
    for n, seq in enumerate(seqs):
        if not seq.num_computed_tokens:
            continue
        src_slots = src.slots(seq.block_table, seq.num_computed_tokens)
        table = seq.block_table if dst_tables is None else dst_tables[n]
        dst_slots = dst.slots(table, seq.num_computed_tokens)
        for j in range(num_layers):
            kv = src.export_layer(src_layer0 + j, src_slots)  # [2, kvh, T, hd]
            dst.import_layer(dst_layer0 + j, dst_slots, kv)
            moved += kv.numel() * kv.element_size()
    return moved


@dataclass
class Replica:
    """A copy of one stage's layer range serving the sequences in `offloaded`."""

    stage: Stage
    share: float  # fraction of new sequences dealt to the replica
    offloaded: dict[str, Sequence] = field(default_factory=dict)
    num_rows: int = 0  # batch rows the replica computed (for tests and benchmarks)
    _credit: float = 0.0

    def deal(self, plan: SchedulerOutput) -> None:
        """Sequences starting from position 0 (new, or recomputing after preemption) are dealt
        to the replica in proportion `share`; finished ones are forgotten."""
        for it in plan.decodes + plan.prefills:
            if it.start:
                continue
            self.offloaded.pop(it.seq.request_id, None)
            self._credit += self.share
            if self._credit >= 1.0:
                self._credit -= 1.0
                self.offloaded[it.seq.request_id] = it.seq
        for rid in [r for r, s in self.offloaded.items() if s.is_finished]:
            del self.offloaded[rid]


class ElasticRunner(PipelineRunner):
    """A `PipelineRunner` whose stages can be replicated and re-split between steps."""

    def __init__(self, stages: list[Stage], factory: StageFactory, parallel: bool = False) -> None:
        super().__init__(stages)
        self.factory = factory
        self.replicas: dict[int, Replica] = {}
        # parallel: a replica's share runs on its own thread (a second worker, 1 thread each)
        self._pool = ThreadPoolExecutor(1) if parallel else None

    @property
    def device(self) -> torch.device:
        return self.factory.device

    def run(
        self, step: SchedulerOutput, layer_hook=None
    ) -> tuple[list[ScheduledSeq], SampleResult]:
        if not self.replicas:
            return super().run(step, layer_hook)
        step.decodes.sort(key=lambda d: d.start)  # the batch order `prepare` uses
        h = None
        for i, stage in enumerate(self.stages):
            rep = self.replicas.get(i)
            if rep is None:
                h = stage.forward(step, h, layer_hook)
            else:
                rep.deal(step)
                h = self._split_forward(stage, rep, step, h, layer_hook)
        return self.stages[-1].sample(step, h)

    def _split_forward(self, stage: Stage, rep: Replica, plan, hidden, layer_hook):
        """The stage's output with the replica's sequences computed by the replica."""
        mine, theirs = [], []
        t = n = 0
        for it in plan.decodes + plan.prefills:
            side = theirs if it.seq.request_id in rep.offloaded else mine
            side.append((it, range(t, t + it.num_tokens), n if it.sample else None))
            t += it.num_tokens
            n += it.sample
        if not theirs:
            return stage.forward(plan, hidden, layer_hook)
        is_last = stage.layers.is_last
        decodes = {id(d) for d in plan.decodes}
        out = None
        jobs = []
        for side, runner in ((theirs, rep.stage), (mine, stage)):
            if not side:
                continue
            items = [it for it, _, _ in side]
            sub = SchedulerOutput([i for i in items if id(i) in decodes],
                                  [i for i in items if id(i) not in decodes], [])  # fmt: skip
            rows = [r for _, rs, _ in side for r in rs]
            sample_rows = [s for _, _, s in side if s is not None]
            x = None if hidden is None else hidden[torch.tensor(rows)]
            if x is None and runner is rep.stage and hasattr(runner, "submit"):
                x = _token_ids(items)  # a first stage in another process: its ids go over
            hook = layer_hook if runner is stage else None
            if self._pool is not None and runner is rep.stage:
                fut = self._pool.submit(runner.forward, sub, x, hook)
            elif runner is rep.stage and hasattr(runner, "submit"):  # in another process
                fut = runner.submit(sub, x)  # computes while the primary does its rows
            else:
                fut = _Done(runner.forward(sub, x, hook))
            jobs.append((fut, rows, sample_rows))
        rep.num_rows += sum(len(rs) for _, rs, _ in theirs)
        for fut, rows, sample_rows in jobs:
            y = fut.result()  # [rows, hidden] or, last stage, [sampling rows, vocab]
            if out is None:
                size = n if is_last else t
                out = y.new_empty((size, y.shape[1]))
            out[torch.tensor(sample_rows if is_last else rows, dtype=torch.long)] = y
        return out

    # -- replication -------------------------------------------------------------------------

    def replicate(self, i: int, seqs: list[Sequence], share: float = 0.5, remote=None) -> Replica:
        """Loads a replica of stage i and hands it `share` of the live sequences (their KV of
        the stage's layers copied first) and of the sequences that start from now on.
        `remote`: a replica already loaded in another process (tideserve/roles/replica.py's
        `RemoteReplica`, same layer range, a cache of at least the pool's blocks); the KV
        goes to it over kv_transfer."""
        if i in self.replicas:
            raise ValueError(f"stage {i} already has a replica")
        stage = self.stages[i]
        if remote is not None and (
            remote.layers != stage.layers or remote.num_kv_blocks < stage.kv.num_blocks
        ):
            raise ValueError(f"remote replica {remote.layers} does not fit stage {stage.layers}")
        rep_stage = remote or self.factory.stage(stage.layers, stage.kv.num_blocks)
        rep = Replica(rep_stage, share)
        live = [s for s in seqs if s.block_table and not s.is_finished]
        for s in live:
            rep._credit += share
            if rep._credit >= 1.0:
                rep._credit -= 1.0
                rep.offloaded[s.request_id] = s
        handed = list(rep.offloaded.values())
        if remote is not None:
            remote.copy_in(stage.kv, 0, handed)
        else:
            copy_kv(stage.kv, 0, rep.stage.kv, 0, stage.layers.size, handed)
        self.replicas[i] = rep
        return rep

    def unreplicate(self, i: int) -> int:
        """Hands the replica's sequences back to the primary (their KV copied back) and drops
        the replica; returns the KV bytes copied."""
        rep = self.replicas.pop(i)
        live = [s for s in rep.offloaded.values() if s.block_table and not s.is_finished]
        if not isinstance(rep.stage, Stage):  # a remote replica: its KV comes back over the wire
            return rep.stage.copy_out(self.stages[i].kv, 0, live)
        return copy_kv(rep.stage.kv, 0, self.stages[i].kv, 0, rep.stage.layers.size, live)

    # -- migration ---------------------------------------------------------------------------

    def migrate(self, src: int, dst: int, start: int, end: int, seqs: list[Sequence]) -> int:
        """Moves layers [start, end) from stage `src` to its neighbour `dst`: loads their weights
        on the destination, copies their KV for the live sequences, then switches ownership.
        Returns the KV bytes moved."""
        if abs(src - dst) != 1 or src in self.replicas or dst in self.replicas:
            raise ValueError("migration moves layers between neighbouring unreplicated stages")
        s, d = self.stages[src], self.stages[dst]
        lo, hi = s.layers.start, s.layers.end
        at_edge = (dst > src and end == hi and start > lo) or (
            dst < src and start == lo and end < hi
        )
        if not at_edge:
            raise ValueError(
                f"layers [{start}, {end}) are not at the edge of {s.layers} toward {d.layers}"
            )
        f = self.factory
        moving = f.model(f.range(start, end))  # the destination loads only these weights
        d_range = f.range(min(start, d.layers.start), max(end, d.layers.end))
        s_range = f.range(lo, start) if dst > src else f.range(end, hi)
        nb = s.kv.num_blocks
        d_kv = f.kv(d_range, nb)
        live = [q for q in seqs if q.block_table and not q.is_finished]
        # the destination's own layers stay (a local copy into its grown cache)
        d_off = d.layers.start - d_range.start
        d_kv.tensor[d_off : d_off + d.layers.size].copy_(d.kv.tensor)
        moved = copy_kv(s.kv, start - lo, d_kv, start - d_range.start, end - start, live)
        s_kv = f.kv(s_range, nb)
        s_kv.tensor.copy_(s.kv.tensor[s_range.start - lo : s_range.end - lo])
        # ownership switches: both stages are replaced at once, between steps
        new_d = Stage(assemble(f, d_range, [moving, d.model]), d_kv, f.device)
        new_s = Stage(assemble(f, s_range, [s.model]), s_kv, f.device)
        self.stages[src], self.stages[dst] = new_s, new_d
        self.kv, self.sampler = self.stages[0].kv, self.stages[-1].sampler
        return moved


def _token_ids(items) -> torch.Tensor:
    """The token ids [T] of scheduled items, in their order (a remote first stage's input)."""
    ids = [t for it in items for t in it.seq.token_slice(it.start, it.start + it.num_tokens)]
    return torch.tensor(ids, dtype=torch.long)


class _Done:
    def __init__(self, value) -> None:
        self.value = value

    def result(self):
        return self.value


def build_elastic_engine(config: EngineConfig, ranges: list[tuple[int, int]] | None = None,
                         parallel: bool = False):  # fmt: skip
    """An `LLMEngine` over an `ElasticRunner`; `ranges` default to the whole model as one stage.
    The pool holds what the config's KV budget buys for the largest stage."""
    f = StageFactory.from_config(config)
    rs = [f.range(a, b) for a, b in (ranges or [(0, f.cfg.num_layers)])]
    budget = config.kv_cache_bytes or (1 << 30)
    num_blocks = min(f.num_blocks(r, budget) for r in rs)
    stages = [f.stage(r, num_blocks) for r in rs]
    return _engine(config, f, ElasticRunner(stages, f, parallel), num_blocks)


def _engine(config: EngineConfig, f: StageFactory, runner: ElasticRunner, num_blocks: int):
    from tideserve.engine.engine import LLMEngine, _extra_eos

    sched_cfg = SchedulerConfig(
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
        max_model_len=min(f.max_positions, num_blocks * config.block_size),
        enable_chunked_prefill=config.enable_chunked_prefill,
    )
    scheduler = Scheduler(sched_cfg, BlockPool(num_blocks, config.block_size))
    eos = frozenset(f.cfg.eos_token_ids) | _extra_eos(f.path)
    return LLMEngine(config, f.cfg, f.path, scheduler, runner, eos)


# -- parameter dropping ------------------------------------------------------------------------


@dataclass
class DropRecord:
    """What a drop did: where each sequence came from (0: first engine, 1: second)."""

    origin: dict[str, int]
    split: int  # h: the first engine kept [0, h), the second [h, L)
    kv_budget_bytes: int  # each engine's KV budget before the drop
    freed_weight_bytes: int  # per engine, added to its KV pool
    moved_bytes: int  # KV of dropped layers moved to their owner


def drop_layers(a, b, kv_budget_bytes: int) -> tuple[object, DropRecord]:
    """Two full elastic engines (one stage each, same model) -> one two-stage pipeline engine.
    `a` keeps layers [0, h), `b` [h, L); each turns its freed weight bytes into KV blocks.
    Running sequences move over with their KV (kept layers local, dropped layers moved to
    the owner); waiting ones join the pipeline's queue. `a` and `b` end empty."""
    ra, rb = a.runner, b.runner
    f: StageFactory = ra.factory
    L = f.cfg.num_layers
    h = L // 2
    front, back = f.range(0, h), f.range(h, L)
    sa, sb = ra.stages[0], rb.stages[0]
    full_bytes = weight_bytes(sa.model)
    head = assemble(f, front, [sa.model])  # a drops [h, L)
    tail = assemble(f, back, [sb.model])  # b drops [0, h)
    freed = min(full_bytes - weight_bytes(head), full_bytes - weight_bytes(tail))
    nb = min(f.num_blocks(r, kv_budget_bytes + freed) for r in (front, back))
    kv0, kv1 = f.kv(front, nb), f.kv(back, nb)
    runner = ElasticRunner([Stage(head, kv0, f.device), Stage(tail, kv1, f.device)], f)
    merged = _engine(a.config, f, runner, nb)
    pool = merged.scheduler.pool
    origin, moved = {}, 0
    for k, eng in enumerate((a, b)):
        old = eng.runner.stages[0].kv
        for seq in list(eng.scheduler.running):
            table = pool.allocate(len(seq.block_table))
            # kept layers: local; dropped layers: moved to the layer's owner
            m0 = copy_kv(old, 0, kv0, 0, h, [seq], [table])
            m1 = copy_kv(old, h, kv1, 0, L - h, [seq], [table])
            moved += m1 if k == 0 else m0
            eng.scheduler.running.remove(seq)
            eng.scheduler.release(seq)
            seq.block_table = table
            merged.scheduler.add_running(seq)
        for seq in list(eng.scheduler.waiting):
            eng.scheduler.waiting.remove(seq)
            merged.scheduler.add(seq)
        for rid, seq in eng.seqs.items():
            origin[rid] = k
            merged.seqs[rid] = seq
        eng.seqs.clear()
    return merged, DropRecord(origin, h, kv_budget_bytes, freed, moved)


def restore_layers(merged, record: DropRecord) -> tuple[object, object, int]:
    """Reverses `drop_layers`: each stage reloads the layers it dropped and shrinks its pool
    back; sequences return to their origin (new ones alternate) with their KV (the layers the
    engine kept stay, the others move back). Returns (a, b, KV bytes moved)."""
    r: ElasticRunner = merged.runner
    f = r.factory
    L, h = f.cfg.num_layers, record.split
    s0, s1 = r.stages
    full = f.range(0, L)
    model_a = assemble(f, full, [s0.model, f.model(f.range(h, L))])
    model_b = assemble(f, full, [f.model(f.range(0, h)), s1.model])
    nb = f.num_blocks(full, record.kv_budget_bytes)
    engines = []
    for model in (model_a, model_b):
        runner = ElasticRunner([Stage(model, f.kv(full, nb), f.device)], f)
        engines.append(_engine(merged.config, f, runner, nb))
    turn = itertools.cycle((0, 1))
    moved = 0
    for seq in list(merged.scheduler.running):
        k = record.origin.get(seq.request_id)
        k = next(turn) if k is None else k
        eng = engines[k]
        kv = eng.runner.stages[0].kv
        merged.scheduler.running.remove(seq)
        pool = eng.scheduler.pool
        if not pool.can_allocate(len(seq.block_table)):  # no room on the way back: recompute
            merged.scheduler.release(seq)
            seq.num_computed_tokens = 0
            seq.num_preemptions += 1
            eng.scheduler.add(seq)
        else:
            table = pool.allocate(len(seq.block_table))
            m0 = copy_kv(s0.kv, 0, kv, 0, h, [seq], [table])
            m1 = copy_kv(s1.kv, 0, kv, h, L - h, [seq], [table])
            moved += m1 if k == 0 else m0
            merged.scheduler.release(seq)
            seq.block_table = table
            eng.scheduler.add_running(seq)
        eng.seqs[seq.request_id] = seq
    for seq in list(merged.scheduler.waiting):
        k = record.origin.get(seq.request_id)
        k = next(turn) if k is None else k
        merged.scheduler.waiting.remove(seq)
        engines[k].scheduler.add(seq)
        engines[k].seqs[seq.request_id] = seq
    merged.seqs.clear()
    return engines[0], engines[1], moved
