"""One `tideserve bench` run, from its options to the files it leaves.

Lifecycle (``run_benchmark``):

1. ``build_trace``: load the trace (or make a synthetic one) and apply the ``TraceShape``.
2. ``connect``: ask ``GET /v1/models`` which model the endpoint serves (``--model`` wins), so
   an unreachable endpoint fails before anything is sent.
3. ``prompt_maker``: the served model's tokenizer (``--tokenizer DIR``; by default the default
   model's when the endpoint serves it), else token-id prompts.
4. One open-loop replay, or with ``--goodput`` a search of bounded probes (``goodput.py``); the
   summary is then that of the best passing probe, with every probe listed.
5. ``summary.json`` and ``requests.jsonl`` go to ``out_dir``; the summary dict comes back for
   the terminal, and the CLI draws the plots from the files.
"""

from __future__ import annotations

import datetime
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import aiohttp

from tideserve.bench.goodput import TARGET_ATTAINMENT, search_goodput
from tideserve.bench.metrics import Slo, offered_rps, slo_attainment, summarize_run
from tideserve.bench.prompts import PromptMaker
from tideserve.bench.report import write_run
from tideserve.bench.runner import RunConfig, RunResult, replay
from tideserve.bench.traces import TraceRequest, load_trace, resolve_trace
from tideserve.bench.transforms import TraceShape, scale_time, synthetic

GOODPUT_DEFAULT_REQUESTS = 200  # requests per goodput probe unless --max-requests says


class BenchError(RuntimeError):
    """A run that cannot start: unreachable endpoint, unknown model, bad options."""


@dataclass(frozen=True)
class BenchOptions:
    endpoint: str  # base URL of the OpenAI-compatible server
    out_dir: Path  # where summary.json, requests.jsonl and the plots go
    trace: str | None = None  # trace file or short name; None: synthetic
    synthetic: str | None = None  # "poisson" or "gamma"
    rate: float | None = None  # synthetic arrivals per second
    duration_s: float | None = None  # synthetic span
    gamma_shape: float = 0.5  # synthetic gamma arrivals: CV of the gaps is 1/sqrt(shape)
    input_tokens: int = 256  # synthetic prompt length
    output_tokens: int = 64  # synthetic output length
    shape: TraceShape = field(default_factory=TraceShape)  # time/rate/length transforms
    slo: Slo = field(default_factory=Slo)  # targets for attainment and goodput
    goodput: bool = False  # search the highest rate with attainment >= 90%
    goodput_probes: int = 8  # bounded runs the search may spend
    seed: int = 0  # trace sampling and prompts
    model: str | None = None  # the request's "model"; None: ask /v1/models
    tokenizer: str = "auto"  # "auto", "none" or a model folder with tokenizer.json
    timeout_s: float = 600.0  # per request
    show_progress: bool = True  # progress bar on stderr
    plots: bool = True  # draw PNG plots (needs matplotlib)

    def __post_init__(self) -> None:
        if (self.trace is None) == (self.synthetic is None):
            raise ValueError("give exactly one of --trace NAME|FILE and --synthetic poisson|gamma")
        if self.synthetic is not None and (self.rate is None or self.duration_s is None):
            raise ValueError("--synthetic needs --rate R and --duration S")
        if self.goodput and not self.slo.is_set:
            raise ValueError("--goodput needs an SLO: --slo-ttft-ms and/or --slo-tpot-ms")
        if not self.endpoint.startswith(("http://", "https://")):
            raise ValueError(f"--endpoint must be an http(s) URL, got {self.endpoint!r}")


def build_trace(opts: BenchOptions) -> tuple[list[TraceRequest], str]:
    """The requests to replay, and where they came from (for the summary)."""
    if opts.trace is not None:
        path = resolve_trace(opts.trace)
        reqs, source = load_trace(path), str(path)
    else:
        reqs = synthetic(
            opts.synthetic,
            opts.rate,
            opts.duration_s,
            opts.input_tokens,
            opts.output_tokens,
            opts.seed,
            opts.gamma_shape,
        )
        source = f"synthetic {opts.synthetic} {opts.rate:g} req/s for {opts.duration_s:g} s"
    shape = opts.shape
    if opts.goodput and shape.max_requests is None:
        shape = replace(shape, max_requests=GOODPUT_DEFAULT_REQUESTS)
    reqs = shape.apply(reqs, opts.seed)
    if not reqs:
        raise ValueError(f"no requests left to send from {source} after the transforms")
    return reqs, source


async def connect(endpoint: str, model: str | None) -> str:
    """The model name to send; raises BenchError when the endpoint cannot be reached."""
    url = endpoint.rstrip("/") + "/v1/models"
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=10)) as resp:
                status = resp.status
                body = await resp.json(content_type=None) if status == 200 else None
    except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as e:
        raise BenchError(f"cannot reach {endpoint}: {type(e).__name__}: {e}") from None
    if model is not None:
        return model
    try:
        return body["data"][0]["id"]
    except (TypeError, KeyError, IndexError):
        raise BenchError(
            f"{url} answered HTTP {status} without a model name; pass --model NAME"
        ) from None


def prompt_maker(tokenizer: str, model: str) -> tuple[PromptMaker, str]:
    """Text prompts for the served model's tokenizer, or token ids; and a note saying which."""
    from tideserve.engine.tokenizer import Tokenizer

    if tokenizer == "none":
        return PromptMaker.token_ids(), "token ids (--tokenizer none)"
    if tokenizer != "auto":
        return PromptMaker.for_tokenizer(Tokenizer.from_dir(tokenizer)), f"text ({tokenizer})"
    folder = _auto_tokenizer_dir(model)
    if folder is None:
        return PromptMaker.token_ids(), f"token ids (no tokenizer known for {model!r})"
    return PromptMaker.for_tokenizer(Tokenizer.from_dir(folder)), f"text ({folder})"


def _auto_tokenizer_dir(model: str) -> Path | None:
    from tideserve.engine.default_model import DEFAULT_MODEL_NAME, prepare_default_model

    if (Path(model) / "tokenizer.json").is_file():
        return Path(model)
    if model.rstrip("/").split("/")[-1] != DEFAULT_MODEL_NAME:
        return None
    try:
        return prepare_default_model(progress=False)
    except Exception:  # any failure to prepare it means: fall back to token ids
        return None


async def run_benchmark(opts: BenchOptions) -> dict:
    """See the module docstring; returns the summary written to ``summary.json``."""
    trace, source = build_trace(opts)
    model = await connect(opts.endpoint, opts.model)
    prompts, prompt_note = prompt_maker(opts.tokenizer, model)
    cfg = RunConfig(opts.endpoint, model, opts.timeout_s, opts.seed, opts.show_progress)
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    if opts.goodput:
        result, goodput = await _goodput(trace, prompts, cfg, opts)
    else:
        result, goodput = await replay(trace, prompts, cfg), None
    summary = summarize_run(result.records, opts.slo, result.worker_seconds)
    summary["worker_samples"] = [[round(t, 3), n] for t, n in result.worker_samples]
    summary["goodput"] = goodput
    summary["config"] = {
        "endpoint": opts.endpoint,
        "model": model,
        "trace": source,
        "shape": asdict(opts.shape),
        "seed": opts.seed,
        "prompts": prompt_note,
        "started_at": started,
    }
    write_run(opts.out_dir, summary, result.records)
    return summary


async def _goodput(
    trace: list[TraceRequest], prompts: PromptMaker, cfg: RunConfig, opts: BenchOptions
) -> tuple[RunResult, dict]:
    base_rps = offered_rps_of(trace)
    budget = int((1 - TARGET_ATTAINMENT) * len(trace) + 1e-9)
    runs: dict[float, RunResult] = {}

    async def probe(m: float) -> float:
        label = f"probe {len(runs) + 1} x{m:.3g}"
        res = await replay(
            scale_time(trace, 1 / m), prompts, replace(cfg, label=label), opts.slo, budget
        )
        runs[m] = res
        return slo_attainment(res.records, opts.slo)

    found = await search_goodput(probe, opts.goodput_probes)
    best = (
        runs[found.multiplier]
        if found.multiplier is not None
        else runs[found.probes[-1].multiplier]
    )
    return best, {
        "goodput_rps": found.goodput_rps(base_rps),
        "missed_rps": None if found.upper is None else found.upper * base_rps,
        "target_attainment": TARGET_ATTAINMENT,
        "base_rps": base_rps,
        "best_multiplier": found.multiplier,
        "probes": [
            _probe_row(p.multiplier, p.attainment, runs[p.multiplier]) for p in found.probes
        ],
    }


def offered_rps_of(trace: list[TraceRequest]) -> float:
    span = trace[-1].arrival_s - trace[0].arrival_s if trace else 0.0
    if span <= 0:
        raise ValueError("--goodput needs a trace whose arrivals span some time (> 0 s)")
    return len(trace) / span


def _probe_row(m: float, attainment: float, res: RunResult) -> dict:
    s = summarize_run(res.records, Slo())
    return {
        "multiplier": m,
        "offered_rps": offered_rps(res.records),
        "slo_attainment": attainment,
        "num_requests": s["num_requests"],
        "num_failed": s["num_failed"],
        "num_cancelled": s["num_cancelled"],
        "num_unsent": s["num_unsent"],
        "stopped_early": res.stopped_early,
        "ttft_ms_p90": s["ttft_ms"]["p90"],
        "tpot_ms_p90": s["tpot_ms"]["p90"],
        "worker_seconds": res.worker_seconds,
    }
