"""`tideserve` command line: the one composition root that may start any service.

tideserve model prepare      convert the embedded default model into the cache (once)
tideserve model path         print the default model's folder, preparing it if needed
tideserve generate PROMPT    run the offline engine on one prompt and print the text
tideserve keys generate DIR  make CURVE keys for the internal ZMQ sockets (--curve-keys DIR)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import fields

from tideserve.bench import cli as bench_cli
from tideserve.config import EngineConfig
from tideserve.policy.routing import DEFAULT_KV_TRANSPORTS, KV_TRANSPORTS, parse_kv_transports
from tideserve.sim import cli as sim_cli


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF model folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--load-format", default="safetensors", choices=["safetensors", "dummy"])
    p.add_argument("--kv-cache-bytes", type=int, default=None, help="KV-cache budget in bytes")
    p.add_argument(
        "--gpu-memory-fraction",
        "--gpu-memory-utilization",
        dest="gpu_memory_utilization",
        type=float,
        default=0.9,
        help="CUDA: share of the GPU's memory for weights + KV cache (the KV pool gets the rest)",
    )
    p.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="CUDA: capture decode steps as CUDA graphs (--no-cuda-graphs: run eagerly)",
    )
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=1024)
    p.add_argument(
        "--num-threads",
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads of this worker (several workers on one CPU: give each a share)",
    )
    p.add_argument(
        "--layer-stages",
        type=int,
        default=0,
        help="colocated workers: run the model as N layer stages whose replicas and split the "
        "router's /admin/workers/{id}/modules changes while requests run (0: the plain engine)",
    )


def add_security_args(p: argparse.ArgumentParser, http: bool) -> None:
    p.add_argument(
        "--curve-keys",
        default=os.environ.get("TIDESERVE_CURVE_KEYS", ""),
        metavar="DIR",
        help="encrypt and authenticate the internal ZMQ sockets with the CURVE keys in DIR "
        "(tideserve keys generate; env TIDESERVE_CURVE_KEYS)",
    )
    if not http:
        return
    p.add_argument(
        "--api-key",
        default=os.environ.get("TIDESERVE_API_KEY", ""),
        help="require 'Authorization: Bearer KEY' on /v1/* and /admin/*; prefer the env "
        "TIDESERVE_API_KEY, which ps does not show",
    )
    p.add_argument("--protect-metrics", action="store_true", help="/metrics needs the API key too")


def kv_transport_list(text: str) -> tuple[str, ...]:
    """The type of --kv-transports: "gloo,tcp" -> ("gloo", "tcp"); an unknown name is an
    error that lists the known ones."""
    try:
        return parse_kv_transports(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


kv_transport_list.comma_list = True  # settings: a TOML array of names is one value


def add_kv_transports_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--kv-transports",
        type=kv_transport_list,
        default=DEFAULT_KV_TRANSPORTS,
        metavar="LIST",
        help=f"{what}, best first, comma-separated, of {', '.join(KV_TRANSPORTS)} "
        f"(default {','.join(DEFAULT_KV_TRANSPORTS)}; gloo is used only where listed)",
    )


def add_router_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=5.0,
        metavar="S",
        help="a worker silent this long is dropped and its requests move to others",
    )
    p.add_argument(
        "--max-inflight",
        type=int,
        default=512,
        metavar="N",
        help="requests admitted at once; more get 429 with Retry-After",
    )
    p.add_argument(
        "--migration",
        default="off",
        choices=["on", "off"],
        help="balance decode workers by live-migrating running requests (Llumnix)",
    )
    p.add_argument("--macro-max", type=int, default=4, help="partial: split macro instances above")
    p.add_argument("--macro-min", type=int, default=2, help="partial: merge macro instances below")
    p.add_argument(
        "--max-inflight-batch",
        type=int,
        default=0,
        metavar="N",
        help="of those, batch-class requests admitted at once (default: half)",
    )


def engine_config(args: argparse.Namespace) -> EngineConfig:
    names = {f.name for f in fields(EngineConfig)}
    return EngineConfig(**{k: v for k, v in vars(args).items() if k in names})


def model_path(model: str | None) -> str:
    if model is None:
        from tideserve.engine.default_model import prepare_default_model

        return str(prepare_default_model(progress=True))
    return model


def worker_config(args: argparse.Namespace, role: str):
    from tideserve.worker import WorkerConfig

    engine = engine_config(args)
    return WorkerConfig(
        role=role,
        router_address=args.router_address,
        worker_id=args.worker_id,
        host=args.host,
        kv_port=args.kv_port,
        served_model_name=args.served_model_name,
        curve_keys=args.curve_keys,
        kv_timeout_s=args.kv_timeout,
        kv_transports=args.kv_transports,
        drain_timeout_s=args.drain_timeout,
        tpot_slo_s=getattr(args, "tpot_slo", 0.2),
        engine=EngineConfig(**{**engine.__dict__, "model": model_path(engine.model)}),
    )


def cmd_prefill(args: argparse.Namespace) -> int:
    from prefill_worker.worker import run

    run(worker_config(args, "prefill"))
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    from decode_worker.worker import run

    run(worker_config(args, args.role))
    return 0


def cmd_router(args: argparse.Namespace) -> int:
    from router.app import run
    from router.config import RouterConfig

    run(
        RouterConfig(
            model_path=model_path(args.model),
            served_model_name=args.served_model_name,
            host=args.host,
            port=args.port,
            worker_address=args.worker_address,
            heartbeat_timeout_s=args.heartbeat_timeout,
            max_inflight_requests=args.max_inflight,
            max_inflight_batch=args.max_inflight_batch,
            migration=args.migration == "on",
            ttft_slo_s=args.slo_ttft,
            macro_n_max=args.macro_max,
            macro_n_min=args.macro_min,
            api_key=args.api_key,
            protect_metrics=args.protect_metrics,
            curve_keys=args.curve_keys,
            kv_transports=args.kv_transports,
        )
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from tideserve.launcher import ServeConfig, serve

    if args.autoscale:  # bad autoscaling flags fail here, before anything starts
        from tideserve.policy.autoscale import SLO, make_policy

        try:
            make_policy(
                args.policy,
                autoscale_bounds(args, args.mode),
                SLO(args.slo_ttft, args.slo_tpot, args.slo_batch_deadline),
                **_key_values(args.policy_option, "--policy-option"),
            )
        except ValueError as e:
            print(f"tideserve serve: {e}", file=sys.stderr)
            return 2

    cfg = ServeConfig(
        model=model_path(args.model),
        mode=args.mode,
        num_prefill=args.prefill,
        num_decode=args.decode,
        host=args.host,
        port=args.port,
        dtype=args.dtype,
        device=args.device,
        kv_cache_bytes=args.kv_cache_bytes,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        served_model_name=args.served_model_name,
        num_threads=args.num_threads,
        layer_stages=args.layer_stages,
        log_level=args.log_level,
        heartbeat_timeout_s=args.heartbeat_timeout,
        max_inflight_requests=args.max_inflight,
        max_inflight_batch=args.max_inflight_batch,
        migration=args.migration == "on",
        slo_ttft_s=args.slo_ttft,
        slo_tpot_s=args.slo_tpot,
        macro_n_max=args.macro_max,
        macro_n_min=args.macro_min,
        api_key=args.api_key,
        protect_metrics=args.protect_metrics,
        curve_keys=args.curve_keys,
        kv_transports=args.kv_transports,
        autoscale=args.autoscale,
        autoscaler_args=tuple(_autoscaler_flags(args)) if args.autoscale else (),
    )
    return serve(cfg)


def _autoscaler_flags(args: argparse.Namespace) -> list[str]:
    """`serve --autoscale`'s autoscaling flags, for the autoscaler process."""
    out = ["--policy", args.policy, "--actuator", "local", "--interval", str(args.interval)]
    out += ["--migration", args.migration]
    out += ["--drain-timeout", str(args.drain_timeout), "--slo-ttft", str(args.slo_ttft)]
    out += ["--slo-tpot", str(args.slo_tpot), "--slo-batch-deadline", str(args.slo_batch_deadline)]
    if args.metrics_port:
        out += ["--metrics-port", str(args.metrics_port)]
    for opt in args.policy_option:
        out += ["--policy-option", opt]
    for role in ("prefill", "decode", "colocated", "partial"):
        for end in ("min", "max"):
            v = getattr(args, f"{end}_{role}")
            if v is not None:
                out += [f"--{end}-{role}", str(v)]
    return out


def _key_values(items: list[str], what: str) -> dict:
    """KEY=VALUE strings -> a dict with numbers and booleans parsed."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"tideserve: {what} must be KEY=VALUE, got {item!r}")
        if value.lower() in ("true", "false"):
            out[key] = value.lower() == "true"
            continue
        for cast in (int, float):
            try:
                out[key] = cast(value)
                break
            except ValueError:
                pass
        else:
            out[key] = value
    return out


def worker_engine_args(args: argparse.Namespace) -> list[str]:
    """The engine flags a launched worker needs, from this command's own."""
    out = ["--model", model_path(args.model), "--dtype", args.dtype, "--device", args.device]
    out += ["--max-num-seqs", str(args.max_num_seqs)]
    out += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    if args.kv_cache_bytes:
        out += ["--kv-cache-bytes", str(args.kv_cache_bytes)]
    if getattr(args, "layer_stages", 0):
        out += ["--layer-stages", str(args.layer_stages)]
    if args.served_model_name:
        out += ["--served-model-name", args.served_model_name]
    if args.curve_keys:
        out += ["--curve-keys", os.path.abspath(args.curve_keys)]
    if getattr(args, "kv_transports", None):
        out += ["--kv-transports", ",".join(args.kv_transports)]
    return out


def add_autoscale_args(p: argparse.ArgumentParser) -> None:
    from autoscaler.actuators import ACTUATORS
    from tideserve.policy.autoscale import POLICIES

    p.add_argument("--policy", default="coordinated", choices=POLICIES)
    p.add_argument(
        "--policy-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a policy option (docs/autoscaling.md), e.g. decode_tps_per_worker=40",
    )
    for role, lo, hi in (
        ("prefill", 0, 4),
        ("decode", 1, 4),
        ("colocated", 0, 4),
        ("partial", 0, 4),
    ):
        p.add_argument(f"--min-{role}", type=int, default=None, help=f"default {lo}")
        p.add_argument(f"--max-{role}", type=int, default=None, help=f"default {hi}")
    p.add_argument("--slo-ttft", type=float, default=2.0, help="interactive TTFT p90 target, s")
    p.add_argument("--slo-tpot", type=float, default=0.2, help="interactive TPOT p90 target, s")
    p.add_argument("--slo-batch-deadline", type=float, default=600.0)
    p.add_argument("--actuator", default="local", choices=ACTUATORS)
    p.add_argument("--actuator-option", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between decisions")
    p.add_argument("--drain-timeout", type=float, default=120.0)
    p.add_argument("--metrics-port", type=int, default=0, help="its own /metrics; 0 = none")


def autoscale_bounds(args: argparse.Namespace, mode: str):
    from tideserve.policy.autoscale import Bounds

    d = Bounds()
    if mode in ("colocated", "partial"):  # one pool: --min/max-decode bound it too
        own_lo, own_hi = getattr(args, f"min_{mode}"), getattr(args, f"max_{mode}")
        lo = own_lo if own_lo is not None else args.min_decode
        hi = own_hi if own_hi is not None else args.max_decode
        lo, hi = 1 if lo is None else lo, 4 if hi is None else hi
        if mode == "partial":
            return Bounds(0, 0, 0, 0, 0, 0, min_partial=lo, max_partial=hi)
        return Bounds(0, 0, 0, 0, lo, hi)
    pick = lambda v, default: default if v is None else v
    return Bounds(
        pick(args.min_prefill, max(1, d.min_prefill)),
        pick(args.max_prefill, d.max_prefill),
        pick(args.min_decode, d.min_decode),
        pick(args.max_decode, d.max_decode),
        0,
        0,
    )


def cmd_autoscaler(args: argparse.Namespace) -> int:
    from autoscaler.actuators import make_actuator
    from autoscaler.service import Autoscaler, AutoscalerConfig
    from tideserve.policy.autoscale import SLO, make_policy

    try:
        bounds = autoscale_bounds(args, args.mode)
        slo = SLO(args.slo_ttft, args.slo_tpot, args.slo_batch_deadline)
        policy = make_policy(
            args.policy, bounds, slo, **_key_values(args.policy_option, "--policy-option")
        )
        options = _key_values(args.actuator_option, "--actuator-option")
        if args.actuator == "local":
            wargs = worker_engine_args(args)
            if args.mode == "partial":
                wargs += ["--tpot-slo", str(args.slo_tpot)]
            options = {
                "router_address": args.worker_router_address,
                "worker_args": tuple(wargs),
                "threads": args.num_threads or 1,
                "log_level": args.log_level,
                **options,
            }
        actuator = make_actuator(args.actuator, **options)
        cfg = AutoscalerConfig(
            router_url=args.router_url,
            api_key=args.api_key,
            interval_s=args.interval,
            drain_timeout_s=args.drain_timeout,
            metrics_port=args.metrics_port,
            migration=args.migration == "on",
        )
    except (ValueError, TypeError, ImportError, RuntimeError) as e:
        print(f"tideserve autoscaler: {e}", file=sys.stderr)
        return 2
    Autoscaler(cfg, policy, bounds, actuator).run()
    return 0


def cmd_keys_generate(args: argparse.Namespace) -> int:
    from tideserve.security import generate_keys

    for path in generate_keys(args.dir, tuple(args.name), args.force):
        print(path)
    print(f"start every service with --curve-keys {args.dir} (or TIDESERVE_CURVE_KEYS)")
    return 0


def cmd_model(args: argparse.Namespace) -> int:
    from tideserve.engine.default_model import prepare_default_model

    path = prepare_default_model(progress=True)
    print(path)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from tideserve.engine.llm import LLM
    from tideserve.engine.sequence import SamplingParams

    cfg = engine_config(args)
    llm = LLM(**{f.name: getattr(cfg, f.name) for f in fields(cfg)})
    prompt = args.prompt
    if args.chat:
        prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed
    )
    print(llm.generate(prompt, params)[0].text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tideserve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--log-level", default="WARNING")
    sub = parser.add_subparsers(dest="command", required=True)
    model = sub.add_parser("model", help="manage the embedded default model")
    model.add_argument("action", choices=["prepare", "path"])
    model.set_defaults(func=cmd_model)
    srv = sub.add_parser("serve", help="start the router and workers on this machine")
    srv.add_argument(
        "--mode", default="disaggregated", choices=["disaggregated", "colocated", "partial"]
    )
    srv.add_argument("--prefill", type=int, default=1, help="prefill workers (disaggregated)")
    srv.add_argument("--decode", type=int, default=1, help="decode (or colocated) workers")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--served-model-name", default="")
    add_security_args(srv, http=True)
    add_router_args(srv)
    add_kv_transports_arg(srv, "the KV transports between prefill and decode workers")
    add_engine_args(srv)
    srv.add_argument(
        "--autoscale",
        action="store_true",
        help="an autoscaler grows and shrinks the pools (--prefill/--decode are ignored)",
    )
    add_autoscale_args(srv)
    srv.set_defaults(func=cmd_serve)

    asc = sub.add_parser("autoscaler", help="grow and shrink the worker pools with the load")
    asc.add_argument("--router-url", default="http://127.0.0.1:8000")
    asc.add_argument(
        "--worker-router-address",
        default="tcp://127.0.0.1:7100",
        help="the router's worker socket, for the workers the local actuator starts",
    )
    asc.add_argument(
        "--mode", default="disaggregated", choices=["disaggregated", "colocated", "partial"]
    )
    asc.add_argument("--served-model-name", default="")
    asc.add_argument(
        "--api-key",
        default=os.environ.get("TIDESERVE_API_KEY", ""),
        help="the router's API key (its /admin/* needs it); prefer the env TIDESERVE_API_KEY",
    )
    asc.add_argument("--curve-keys", default=os.environ.get("TIDESERVE_CURVE_KEYS", ""))
    asc.add_argument(
        "--migration",
        default="off",
        choices=["on", "off"],
        help="scale in by migrating a worker's running requests away instead of waiting",
    )
    add_autoscale_args(asc)
    add_kv_transports_arg(asc, "the KV transports the workers it starts offer")
    add_engine_args(asc)
    asc.set_defaults(func=cmd_autoscaler)

    rt = sub.add_parser("router", help="the HTTP API alone (workers connect to it)")
    rt.add_argument("--model", default=None, help="HF model folder (tokenizer, chat template)")
    rt.add_argument("--served-model-name", default="")
    rt.add_argument("--host", default="127.0.0.1")
    rt.add_argument("--port", type=int, default=8000)
    rt.add_argument("--worker-address", default="tcp://127.0.0.1:7100")
    add_security_args(rt, http=True)
    add_router_args(rt)
    add_kv_transports_arg(rt, "the KV transports it may pick for a pair of workers")
    rt.add_argument(
        "--slo-ttft",
        type=float,
        default=2.0,
        help="partial mode: the TTFT (s) rolling activation places requests to meet",
    )
    rt.set_defaults(func=cmd_router)

    for name, helptext in (("prefill", "one prefill worker"), ("decode", "one decode worker")):
        w = sub.add_parser(name, help=helptext)
        if name == "decode":
            w.add_argument(
                "--role",
                default="decode",
                choices=["decode", "colocated", "partial"],
                help="partial: colocated with prefill and decode phases in time (EcoServe PaDG)",
            )
            w.add_argument(
                "--tpot-slo",
                type=float,
                default=0.2,
                help="partial: the TPOT target (s) its prefill phases must respect",
            )
        w.add_argument("--router-address", default="tcp://127.0.0.1:7100")
        w.add_argument("--worker-id", default="")
        w.add_argument(
            "--host", default="127.0.0.1", help="address other workers reach this one at"
        )
        w.add_argument("--kv-port", type=int, default=0)
        w.add_argument("--served-model-name", default="")
        w.add_argument(
            "--kv-timeout", type=float, default=30.0, help="a KV transfer stalled this long fails"
        )
        w.add_argument(
            "--drain-timeout",
            type=float,
            default=60.0,
            help="on SIGTERM, how long running requests may take to finish (SIGINT: stop now)",
        )
        add_kv_transports_arg(
            w, "the KV transports it offers (on CUDA it adds nccl where NCCL is available)"
        )
        add_security_args(w, http=False)
        add_engine_args(w)
        w.set_defaults(func=cmd_prefill if name == "prefill" else cmd_decode)

    gen = sub.add_parser("generate", help="offline generation for one prompt")
    gen.add_argument("prompt")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    add_engine_args(gen)
    gen.set_defaults(func=cmd_generate)

    for name in SETTABLE:
        _subparser(parser, name).add_argument(
            "--config",
            metavar="FILE",
            help="a TOML file of settings (env TIDESERVE_CONFIG); flags and TIDESERVE_* env win",
        )
    show = sub.add_parser(
        "config",
        help="show the effective configuration: config show [COMMAND] [FLAGS]",
        description="Every option's value and its source: cli > env (TIDESERVE_*) > toml > "
        "default.",
    )
    show.add_argument("action", choices=["show"])
    show.add_argument("rest", nargs=argparse.REMAINDER, help="COMMAND (default serve) and flags")

    keys = sub.add_parser("keys", help="CURVE keys for the internal ZMQ sockets")
    keys_sub = keys.add_subparsers(dest="action", required=True)
    keygen = keys_sub.add_parser(
        "generate", help="write DIR/server.key*, DIR/client.key* and DIR/authorized/"
    )
    keygen.add_argument("dir")
    keygen.add_argument(
        "--name",
        action="append",
        default=[],
        help="also write DIR/clients/NAME.key_secret and authorize it (repeatable)",
    )
    keygen.add_argument(
        "--force", action="store_true", help="replace existing keys; unauthorize all old ones"
    )
    keygen.set_defaults(func=cmd_keys_generate)
    bench_cli.add_parser(sub)
    sim_cli.add_parser(sub)
    return parser


SETTABLE = ("serve", "router", "prefill", "decode", "autoscaler")  # take --config, TIDESERVE_*


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    return parser._subparsers._group_actions[0].choices[name]  # NOTE: argparse has no API


def _configure(parser, command: str, argv: list[str]) -> dict[str, str]:
    """Applies TIDESERVE_* env and the TOML file to `command`'s defaults; returns sources."""
    from tideserve import settings

    path = settings.config_path(argv, os.environ)
    toml = settings.load_toml(path) if path else {}
    known = {d for c in SETTABLE for d in settings.options(_subparser(parser, c))}
    return settings.resolve(
        _subparser(parser, command), command, argv, toml, dict(os.environ), known, path
    )


def cmd_config_show(parser, argv: list[str]) -> int:
    """`tideserve config show [COMMAND] [FLAGS]`: the effective settings and their sources."""
    from tideserve import settings

    rest = argv[2:]
    command = rest.pop(0) if rest and not rest[0].startswith("-") else "serve"
    if command not in SETTABLE:
        print(f"tideserve config show: COMMAND is one of {', '.join(SETTABLE)}", file=sys.stderr)
        return 2
    sources = _configure(parser, command, rest)
    sub = _subparser(parser, command)
    args = sub.parse_args(rest)
    print(f"# tideserve {command}: value, source (cli > env > toml > default), env name")
    print(settings.show(sub, args, sources))
    return 0


def main(argv: list[str] | None = None) -> int:
    from tideserve.settings import ConfigError

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        if argv[:2] == ["config", "show"]:
            return cmd_config_show(parser, argv)
        args = parser.parse_args(argv)
        if args.command in SETTABLE:
            i = argv.index(args.command)
            _configure(parser, args.command, argv[i + 1 :])
            args = parser.parse_args(argv)
    except ConfigError as e:
        print(f"tideserve: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except (ValueError, OSError, RuntimeError, TypeError) as e:
        print(f"tideserve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
