"""The simulated cluster, read from a TOML file (examples: tideserve/sim/examples/*.toml).

mode = "disaggregated"          # colocated | disaggregated | partial
seed = 0                        # step-time jitter and trace sampling
step_jitter = 0.0               # relative std-dev of a step's time (0: exact model)
fast_decode = true              # decode-only runs of steps in one event (same results, faster)

[slo]                           # ttft_ms, tpot_ms: attainment, goodput, PaDG, scaling
[scheduler]                     # the engine's SchedulerConfig (max_num_seqs, ...)
[workers.default]               # a worker type: hardware + model (+ tp) or profile,
[workers.decode]                #   cost_per_gpu_hour; a role's own table overrides it
[pool]                          # prefill / decode / colocated / partial: counts at start
[network]                       # kv_link_gbps, kv_link_latency_ms (FuDG transfers)
[partial]                       # macro_n_max, macro_n_min (rolling activation groups)
[autoscale]                     # policy, interval_s, window_s, actuator_delay_s,
[autoscale.bounds]              #   Bounds of tideserve.policy.autoscale
[autoscale.options]             #   the policy's options (docs/autoscaling.md)
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from tideserve.bench.metrics import Slo
from tideserve.engine.scheduler import SchedulerConfig
from tideserve.policy.autoscale import Bounds
from tideserve.sim.perf import PerfModel, load_profile, roofline

MODES = ("colocated", "disaggregated", "partial")
ROLES_OF_MODE = {
    "colocated": ("colocated",),
    "disaggregated": ("prefill", "decode"),
    "partial": ("partial",),
}


@dataclass(frozen=True)
class WorkerType:
    perf: PerfModel  # step, transfer and start-up times; KV capacity
    gpus: int = 1  # GPUs one worker holds (tensor parallel degree)
    cost_per_gpu_hour: float = 0.0  # USD


@dataclass(frozen=True)
class AutoscaleConfig:
    policy: str = "static"  # a name of tideserve.policy.autoscale.POLICIES
    interval_s: float = 5.0  # between two decisions
    window_s: float = 30.0  # the span of the observation's rates and percentiles
    actuator_delay_s: float = 5.0  # decision -> the worker's process starts
    bounds: Bounds = field(default_factory=Bounds)
    options: dict = field(default_factory=dict)  # the policy's options


@dataclass(frozen=True)
class SimConfig:
    mode: str  # colocated | disaggregated | partial
    workers: dict[str, WorkerType]  # role -> its worker type
    pool: dict[str, int]  # role -> workers at start (ready at time 0)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    slo: Slo = field(default_factory=lambda: Slo(2000.0, 200.0))
    autoscale: AutoscaleConfig | None = None  # None: the pool stays as it is
    kv_link_gbps: float = 100.0  # prefill -> decode link (FuDG)
    kv_link_latency_s: float = 0.0002  # per transfer
    macro_n_max: int = 4  # partial: a macro instance larger than this splits
    macro_n_min: int = 2  # partial: two smaller than this merge
    seed: int = 0
    step_jitter: float = 0.0  # relative std-dev of step times (seeded)
    record_itl: bool = True  # keep every inter-token gap (memory: one float per token)
    fast_decode: bool = True  # advance runs of decode-only steps in one event (same results)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        for role in ROLES_OF_MODE[self.mode]:
            if role not in self.workers:
                raise ValueError(f"mode {self.mode} needs a worker type for {role}")
        if self.kv_link_gbps <= 0:
            raise ValueError(f"kv_link_gbps must be > 0, got {self.kv_link_gbps}")
        if self.step_jitter < 0:
            raise ValueError(f"step_jitter must be >= 0, got {self.step_jitter}")
        if self.autoscale is None and sum(self.pool.values()) == 0:
            raise ValueError("[pool] starts no worker and there is no [autoscale] to add one")
        if self.mode == "disaggregated" and self.autoscale is None:
            if min(self.pool.get("prefill", 0), self.pool.get("decode", 0)) < 1:
                raise ValueError("disaggregated needs [pool] prefill >= 1 and decode >= 1")

    @property
    def roles(self) -> tuple[str, ...]:
        return ROLES_OF_MODE[self.mode]


def worker_type(table: dict, scheduler: SchedulerConfig, base: Path) -> WorkerType:
    """A worker type from its TOML table: `profile` (a file) or `hardware` + `model` (+ `tp`)."""
    unknown = set(table) - {"profile", "hardware", "model", "tp", "cost_per_gpu_hour", "block_size"}
    if unknown:
        raise ValueError(f"unknown worker option(s) {', '.join(sorted(unknown))}")
    tp = int(table.get("tp", 1))
    if "profile" in table:
        path = Path(table["profile"])
        perf = load_profile(path if path.is_absolute() else base / path)
    elif "hardware" in table and "model" in table:
        model = table["model"]
        if (base / model).is_dir():
            model = str(base / model)
        perf = roofline(
            table["hardware"], model, tp, int(table.get("block_size", 16)), scheduler.max_model_len
        )
    else:
        raise ValueError("a worker type needs profile = FILE, or hardware = ... and model = ...")
    return WorkerType(perf, tp, float(table.get("cost_per_gpu_hour", 0.0)))


def load_config(path: str | Path, overrides: dict | None = None) -> SimConfig:
    """The cluster of a TOML file; `overrides` (top-level tables) replace the file's."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"{path}: cannot read the cluster config: {e}") from None
    raw.update(overrides or {})
    try:
        return parse_config(raw, path.parent)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: {e}") from None


def parse_config(raw: dict, base: Path = Path(".")) -> SimConfig:
    known = {f.name for f in fields(SimConfig)} | {"network", "partial"}
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(sorted(unknown))}")
    mode = raw.get("mode", "colocated")
    sched = raw.get("scheduler", {})
    if "max_model_len" not in sched:
        sched = {**sched, "max_model_len": 8192}
    scheduler = SchedulerConfig(**sched)
    tables = raw.get("workers", {})
    default = tables.get("default", {})
    workers = {
        role: worker_type({**default, **tables.get(role, {})}, scheduler, base)
        for role in ROLES_OF_MODE.get(mode, ())
    }
    for wt in workers.values():
        if wt.perf.max_model_len < scheduler.max_model_len:
            scheduler = SchedulerConfig(
                **{**sched, "max_model_len": wt.perf.max_model_len}  # what the KV pool holds
            )
    slo = raw.get("slo", {})
    net = raw.get("network", {})
    partial = raw.get("partial", {})
    scale = raw.get("autoscale")
    autoscale = None
    if scale is not None:
        scale = dict(scale)
        bounds = Bounds(**scale.pop("bounds", {}))
        autoscale = AutoscaleConfig(bounds=bounds, options=scale.pop("options", {}), **scale)
    return SimConfig(
        mode=mode,
        workers=workers,
        pool={r: int(n) for r, n in raw.get("pool", {}).items()},
        scheduler=scheduler,
        slo=Slo(slo.get("ttft_ms", 2000.0), slo.get("tpot_ms", 200.0)),
        autoscale=autoscale,
        kv_link_gbps=float(net.get("kv_link_gbps", 100.0)),
        kv_link_latency_s=float(net.get("kv_link_latency_ms", 0.2)) / 1e3,
        macro_n_max=int(partial.get("macro_n_max", 4)),
        macro_n_min=int(partial.get("macro_n_min", 2)),
        seed=int(raw.get("seed", 0)),
        step_jitter=float(raw.get("step_jitter", 0.0)),
        record_itl=bool(raw.get("record_itl", True)),
        fast_decode=bool(raw.get("fast_decode", True)),
    )
