"""`tideserve serve`: the router and its workers as child processes of one command.

Start-up: prepare the model (progress on stderr) -> start the router, then the workers, each
with its share of the CPU threads -> wait until /health says ready -> print the URL and a curl
example -> wait. A worker that dies once the service is up is restarted (the router moves its
requests to the others meanwhile; more than `MAX_RESTARTS_PER_MINUTE` stops the service); the
router dying, a child dying during start-up, Ctrl-C or SIGTERM stops every child (SIGTERM, then
SIGKILL after a grace period); children also get SIGTERM if this process dies
(PR_SET_PDEATHSIG), so no orphan outlives it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field

from tideserve.policy.routing import DEFAULT_KV_TRANSPORTS, parse_kv_transports

GRACE_S = 10.0
MAX_RESTARTS_PER_MINUTE = 5  # a worker that dies more often than this stops the service


@dataclass(frozen=True)
class ServeConfig:
    model: str  # HF model folder (already prepared)
    mode: str = "disaggregated"  # or colocated
    num_prefill: int = 1
    num_decode: int = 1
    host: str = "127.0.0.1"
    port: int = 8000
    dtype: str = "auto"
    device: str = "auto"
    kv_cache_bytes: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    served_model_name: str = ""
    num_threads: int | None = None  # torch threads per worker; None = the cores split evenly
    layer_stages: int = 0  # colocated workers: elastic layer stages (0: the plain engine)
    log_level: str = "INFO"
    ready_timeout_s: float = 300.0
    heartbeat_timeout_s: float = 5.0  # the router drops a worker silent this long
    max_inflight_requests: int = 512  # the router's admission limit
    max_inflight_batch: int = 0  # of those, batch-class at most; 0 = half
    migration: bool = False  # the router balances decode load by live migration
    slo_ttft_s: float = 2.0  # partial mode: rolling activation's TTFT target
    slo_tpot_s: float = 0.2  # partial mode: the TPOT target of the workers' prefill phases
    macro_n_max: int = 4
    macro_n_min: int = 2
    api_key: str = field(default="", repr=False)  # reaches the router in its env, never argv
    protect_metrics: bool = False  # /metrics needs the API key too
    curve_keys: str = ""  # CURVE key directory for every internal socket; "" = plaintext
    kv_transports: tuple[str, ...] = DEFAULT_KV_TRANSPORTS  # router and workers, best first
    autoscale: bool = False  # an autoscaler process starts and stops the workers
    autoscaler_args: tuple[str, ...] = ()  # its policy, bounds and SLO flags

    def __post_init__(self) -> None:
        if self.mode not in ("disaggregated", "colocated", "partial"):
            raise ValueError(f"mode must be disaggregated, colocated or partial, got {self.mode!r}")
        if self.num_decode < 1 or (self.mode == "disaggregated" and self.num_prefill < 1):
            raise ValueError(
                "need at least one decode worker (and one prefill worker when disaggregated)"
            )
        parse_kv_transports(self.kv_transports)  # an unknown name is a ValueError
        if self.layer_stages and self.mode != "colocated":
            raise ValueError("--layer-stages needs --mode colocated (its KV never leaves a worker)")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    os.setpgid(0, 0)  # Ctrl-C in the terminal reaches only us; we stop the children in order


def autoscaler_command(cfg: ServeConfig, worker_address: str) -> list[str]:
    base = [sys.executable, "-m", "tideserve.cli", "--log-level", cfg.log_level]
    engine = worker_commands(cfg, worker_address, engine_only=True)[0]
    return base + [
        "autoscaler", "--router-url", f"http://{cfg.host}:{cfg.port}",
        "--worker-router-address", worker_address, "--mode", cfg.mode,
        "--threads", str(cfg.num_threads or 1), *engine, *cfg.autoscaler_args,
    ]  # fmt: skip


def worker_commands(
    cfg: ServeConfig, worker_address: str, engine_only: bool = False
) -> list[list[str]]:
    base = [sys.executable, "-m", "tideserve.cli", "--log-level", cfg.log_level]
    engine = [
        "--model",
        cfg.model,
        "--dtype",
        cfg.dtype,
        "--device",
        cfg.device,
        "--max-num-seqs",
        str(cfg.max_num_seqs),
        "--max-num-batched-tokens",
        str(cfg.max_num_batched_tokens),
    ]
    if cfg.kv_cache_bytes:
        engine += ["--kv-cache-bytes", str(cfg.kv_cache_bytes)]
    if cfg.layer_stages and not engine_only:
        engine += ["--layer-stages", str(cfg.layer_stages)]
    if cfg.served_model_name:
        engine += ["--served-model-name", cfg.served_model_name]
    engine += ["--kv-transports", ",".join(cfg.kv_transports)]
    if engine_only:
        return [
            engine + (["--curve-keys", os.path.abspath(cfg.curve_keys)] if cfg.curve_keys else [])
        ]
    roles = (
        ["prefill"] * cfg.num_prefill + ["decode"] * cfg.num_decode
        if cfg.mode == "disaggregated"
        else [cfg.mode if cfg.mode == "partial" else "colocated"] * cfg.num_decode
    )
    if cfg.curve_keys:
        engine += ["--curve-keys", os.path.abspath(cfg.curve_keys)]
    threads = cfg.num_threads or max(1, (os.cpu_count() or 1) // len(roles))
    cmds = []
    for i, role in enumerate(roles):
        cmd = "prefill" if role == "prefill" else "decode"
        extra = [] if role == "prefill" else ["--role", role]
        if role == "partial":
            extra += ["--tpot-slo", str(cfg.slo_tpot_s)]
        cmds.append(
            base
            + [
                cmd,
                *extra,
                "--router-address",
                worker_address,
                "--worker-id",
                f"{role}-{i}",
                "--num-threads",
                str(threads),
                *engine,
            ]
        )
    return cmds


def check_port_free(host: str, port: int) -> None:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise OSError(
                f"cannot listen on {host}:{port} ({e.strerror}); pass another --port"
            ) from None


def serve(cfg: ServeConfig) -> int:
    from tideserve.security import load_curve_keys

    check_port_free(cfg.host, cfg.port)
    load_curve_keys(cfg.curve_keys)  # a bad key directory fails here, not in every child
    worker_address = f"tcp://127.0.0.1:{free_port()}"
    router_cmd = [
        sys.executable,
        "-m",
        "tideserve.cli",
        "--log-level",
        cfg.log_level,
        "router",
        "--model",
        cfg.model,
        "--host",
        cfg.host,
        "--port",
        str(cfg.port),
        "--worker-address",
        worker_address,
        "--heartbeat-timeout",
        str(cfg.heartbeat_timeout_s),
        "--max-inflight",
        str(cfg.max_inflight_requests),
        "--max-inflight-batch",
        str(cfg.max_inflight_batch),
        "--migration",
        "on" if cfg.migration else "off",
        "--slo-ttft",
        str(cfg.slo_ttft_s),
        "--macro-max",
        str(cfg.macro_n_max),
        "--macro-min",
        str(cfg.macro_n_min),
    ]
    if cfg.served_model_name:
        router_cmd += ["--served-model-name", cfg.served_model_name]
    if cfg.curve_keys:
        router_cmd += ["--curve-keys", os.path.abspath(cfg.curve_keys)]
    if cfg.protect_metrics:
        router_cmd += ["--protect-metrics"]
    router_cmd += ["--kv-transports", ",".join(cfg.kv_transports)]
    # NOTE: the API key travels in the router's environment (argv is world-readable in ps);
    # the workers do not need it and do not get it
    worker_env = {k: v for k, v in os.environ.items() if k != "TIDESERVE_API_KEY"}
    router_env = {**worker_env, "TIDESERVE_API_KEY": cfg.api_key}
    children: list[subprocess.Popen] = []
    stopping = False

    def stop(signum=None, frame=None):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        children.append(subprocess.Popen(router_cmd, env=router_env, preexec_fn=_die_with_parent))
        if cfg.autoscale:  # the autoscaler starts the workers: it is the second child
            cmds = []
            children.append(
                subprocess.Popen(
                    autoscaler_command(cfg, worker_address),
                    env=router_env,  # it calls the router's /admin/*: it needs the API key
                    preexec_fn=_die_with_parent,
                )
            )
        else:
            cmds = worker_commands(cfg, worker_address)
        for cmd in cmds:
            children.append(subprocess.Popen(cmd, env=worker_env, preexec_fn=_die_with_parent))
        restarts: list[list[float]] = [[] for _ in cmds]  # when each worker was restarted
        url = f"http://{cfg.host}:{cfg.port}"
        announced = False
        deadline = time.monotonic() + cfg.ready_timeout_s
        while not stopping:
            for i, c in enumerate(children):
                if c.poll() is None:
                    continue
                if i == 0:
                    what = "the router"
                elif cfg.autoscale:
                    what = "the autoscaler"
                else:
                    what = f"worker {_worker_id(cmds[i - 1])}"
                if i == 0 or cfg.autoscale or not announced:  # not worth retrying
                    print(
                        f"tideserve: {what} exited (code {c.returncode}): stopping", file=sys.stderr
                    )
                    return 1
                now = time.monotonic()
                recent = restarts[i - 1] = [t for t in restarts[i - 1] if now - t < 60] + [now]
                if len(recent) > MAX_RESTARTS_PER_MINUTE:
                    print(
                        f"tideserve: {what} keeps exiting ({len(recent)} times in a minute): "
                        "stopping",
                        file=sys.stderr,
                    )
                    return 1
                print(
                    f"tideserve: {what} exited (code {c.returncode}); restarting it "
                    "(its requests go on elsewhere)",
                    file=sys.stderr,
                    flush=True,
                )
                children[i] = subprocess.Popen(
                    cmds[i - 1], env=worker_env, preexec_fn=_die_with_parent
                )
            if not announced:
                if _healthy(url):
                    announced = True
                    _announce(url, cfg)
                elif time.monotonic() > deadline:
                    print(
                        f"tideserve: not ready after {cfg.ready_timeout_s:.0f} s: stopping",
                        file=sys.stderr,
                    )
                    return 1
            time.sleep(0.2)
        return 0
    finally:
        _stop_all(children)


def _worker_id(cmd: list[str]) -> str:
    return cmd[cmd.index("--worker-id") + 1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def _announce(url: str, cfg: ServeConfig) -> None:
    name = cfg.served_model_name or os.path.basename(cfg.model.rstrip("/"))
    auth = ' -H "Authorization: Bearer $TIDESERVE_API_KEY"' if cfg.api_key else ""
    print(
        f"""
tideserve is ready at {url}  ({cfg.mode}; model {name})

  curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} \\
    -d '{{"model": "{name}", "messages": [{{"role": "user", "content": "Hello!"}}]}}'

Ctrl-C stops it.""",
        flush=True,
    )


def _stop_all(children: list[subprocess.Popen]) -> None:
    for i, c in reversed(list(enumerate(children))):  # workers first (they say goodbye),
        if c.poll() is None:  # the router last; SIGINT: a worker stops without draining
            c.send_signal(signal.SIGTERM if i == 0 else signal.SIGINT)
    deadline = time.monotonic() + GRACE_S
    for c in children:
        try:
            c.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            c.kill()
            c.wait()


class ServeProcess:
    """`tideserve serve ARGS` as a child process, for tests and benchmarks.

    `start()` launches it on a free port and waits until /health answers 200 (raising with the
    tail of its output if it exits first); `stop()` sends SIGINT, as Ctrl-C would. `children`
    holds the router's and workers' processes (as psutil objects) once it is ready. `env`
    adds variables (TIDESERVE_API_KEY, say) to the ones it inherits.
    """

    def __init__(
        self, *args: str, capture: bool = True, env: dict | None = None, log_level: str = "WARNING"
    ) -> None:
        self.port = free_port()
        self.env = None if env is None else {**os.environ, **env}
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "tideserve.cli", "--log-level", log_level, "serve"]
        self.cmd += ["--port", str(self.port), *args]
        self.capture = capture
        self.proc: subprocess.Popen | None = None
        self.children: list = []

    def start(self, timeout_s: float = 300.0) -> ServeProcess:
        # NOTE: a file, not a pipe: a chatty server must never block on a full pipe buffer
        self._log = tempfile.TemporaryFile("w+") if self.capture else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            self.cmd, stdout=self._log, stderr=subprocess.STDOUT, text=True, env=self.env
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"tideserve serve exited early (code {self.proc.returncode}):\n{self.output()}"
                )
            if _healthy(self.url):
                import psutil

                self.children = psutil.Process(self.proc.pid).children(recursive=True)
                return self
            time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"tideserve serve not ready in {timeout_s:.0f} s")

    def output(self, max_chars: int = 4000) -> str:
        """The tail of what the server printed (empty when not captured)."""
        if not self.capture or self.proc is None:
            return ""
        self._log.seek(0)
        return self._log.read()[-max_chars:]

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        import psutil

        try:  # the workers it restarted since start() count too
            self.children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def leftover_children(self) -> list:
        import psutil

        return [c for c in self.children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]

    def __enter__(self) -> ServeProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
