"""compose/systemd/: the units pass `systemd-analyze verify` (where it is installed), are
hardened and restart with a backoff, and an instance starts the worker the autoscaler's systemd
actuator and docs/deploy.md say: on GPU N, worker id <role>-N (or <host>-<role>-N with the
multi-host drop-ins), KV port 760N, settings from the example TOML and environment files.
The ExecStart binary, /usr/local/bin/tideserve, is replaced by a real one in a temporary copy
for `verify`, which otherwise rejects a command that does not exist."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.support import (
    MULTI_HOST,
    UNIT_BINARY,
    UNITS,
    dotenv,
    read_unit,
    resolve_cli,
    setting,
    settings,
    unit_command,
)

WORKER_UNITS = ("prefill", "decode", "colocated")
ALL_UNITS = ("tideserve-router.service", "tideserve-autoscaler.service") + tuple(
    f"tideserve-{r}@.service" for r in WORKER_UNITS
)
NEW_RESTART_KEYS = ("RestartSteps", "RestartMaxDelaySec")  # systemd >= 254


def dropins(unit: str) -> tuple[Path, ...]:
    return tuple(sorted((MULTI_HOST / f"{unit}.d").glob("*.conf")))


def _systemd_version() -> int:
    out = subprocess.run(
        ["systemd-analyze", "--version"], capture_output=True, text=True, timeout=30
    ).stdout
    return int(re.search(r"systemd (\d+)", out).group(1))


@pytest.mark.parametrize("multi_host", [False, True], ids=["one-host", "multi-host"])
def test_the_units_pass_systemd_analyze_verify(tmp_path, multi_host):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    binary = shutil.which("tideserve") or str(Path(sys.executable).with_name("tideserve"))
    if not Path(binary).is_file():
        binary = "/bin/true"
    for unit in ALL_UNITS:  # the units, their ExecStart made runnable here
        text = (UNITS / unit).read_text().replace(UNIT_BINARY, binary)
        (tmp_path / unit).write_text(text)
        for conf in dropins(unit) if multi_host else ():
            (tmp_path / f"{unit}.d").mkdir(exist_ok=True)
            (tmp_path / f"{unit}.d" / conf.name).write_text(
                conf.read_text().replace(UNIT_BINARY, binary)
            )
    accepted = NEW_RESTART_KEYS if _systemd_version() < 254 else ()
    for unit in ALL_UNITS:
        instance = unit.replace("@.", "@3.")  # a template is verified as an instance of it
        proc = subprocess.run(
            ["systemd-analyze", "verify", "--man=no", str(tmp_path / instance)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        complaints = [
            line
            for line in (proc.stdout + proc.stderr).splitlines()
            if not any(f"Unknown key '{k}'" in line for k in accepted)
        ]
        assert proc.returncode == 0 and not complaints, f"{instance}:\n" + "\n".join(complaints)


@pytest.mark.parametrize("unit", ALL_UNITS)
def test_the_units_are_hardened_and_restart_with_a_backoff(unit):
    u = read_unit(UNITS / unit)
    is_worker = "@" in unit
    assert setting(u, "EnvironmentFile") == "/etc/tideserve/tideserve.env"
    assert setting(u, "User") == (None if "autoscaler" in unit else "tideserve")
    for key, value in {
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
        "PrivateTmp": "yes", "Restart": "on-failure", "KillSignal": "SIGTERM",
    }.items():  # fmt: skip
        assert setting(u, key) == value, key
    assert re.fullmatch(r"\d+s?", setting(u, "RestartSec"))
    assert int(setting(u, "RestartSteps")) > 1 and setting(u, "RestartMaxDelaySec")
    assert int(setting(u, "StartLimitBurst")) > 1 and setting(u, "StartLimitIntervalSec")
    assert int(setting(u, "TimeoutStopSec")) > 60  # above a worker's --drain-timeout
    if is_worker:  # the GPU device nodes stay reachable, and so does the shared memory
        for key in ("PrivateDevices", "ProtectClock", "DevicePolicy", "DeviceAllow", "RemoveIPC"):
            assert setting(u, key) is None, f"{key} hides the GPU or the KV shared memory"
        assert "CUDA_VISIBLE_DEVICES=%i" in settings(u, "Environment")
    assert setting(u, "MemoryDenyWriteExecute") is None  # torch's JIT kernels need it off


def _instance(unit: str, instance: str, hostname: str = "gpu1", multi_host: bool = False):
    """The unit instance's process, parsed by the CLI with the example settings files."""
    entries = read_unit(UNITS / unit, dropins(unit) if multi_host else ())
    env_file = dotenv(UNITS / "tideserve.env")
    env_file["TIDESERVE_CONFIG"] = str(UNITS / "tideserve.toml")  # /etc/tideserve/...
    argv, env = unit_command(entries, instance, hostname, env_file)
    assert argv[0] == UNIT_BINARY
    args, sources = resolve_cli(argv[1:], env)
    return args, sources, env


@pytest.mark.parametrize("role", WORKER_UNITS)
@pytest.mark.parametrize("multi_host", [False, True], ids=["one-host", "multi-host"])
def test_an_instance_runs_on_its_gpu_with_its_id_and_port(role, multi_host):
    args, sources, env = _instance(f"tideserve-{role}@.service", "3", "gpu1", multi_host)
    assert args.command == ("prefill" if role == "prefill" else "decode")
    assert getattr(args, "role", "prefill") == role
    assert env["CUDA_VISIBLE_DEVICES"] == "3"
    assert args.worker_id == (f"gpu1-{role}-3" if multi_host else f"{role}-3")
    if role != "prefill":
        assert (args.kv_port, sources["kv_port"]) == (
            {"decode": 7603, "colocated": 7703}[role],
            "env",
        )
    assert sources["router_address"] == "toml" and args.router_address == "tcp://127.0.0.1:7100"
    state = setting(read_unit(UNITS / f"tideserve-{role}@.service"), "StateDirectory")
    assert env["TIDESERVE_HOME"] == f"/var/lib/{state}"  # the one place it may write


def test_the_router_and_autoscaler_units_read_the_example_settings():
    router, sources, env = _instance("tideserve-router.service", "")
    assert (router.command, sources["worker_address"]) == ("router", "toml")
    asc, sources, _ = _instance("tideserve-autoscaler.service", "")
    assert (asc.command, asc.actuator, sources["router_url"]) == ("autoscaler", "systemd", "toml")
    assert asc.router_url == f"http://{router.host}:{router.port}"
    worker, _, _ = _instance("tideserve-decode@.service", "0")
    assert worker.router_address == router.worker_address
