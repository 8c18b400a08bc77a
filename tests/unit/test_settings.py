"""The configuration surface: CLI flags beat TIDESERVE_* env, which beats the TOML file
(a command's table beats top-level keys), which beats the defaults; bad files and values are
clear errors; `tideserve config show` tells where each value came from."""

from __future__ import annotations

import pytest

from tideserve import cli, settings


def _resolve(command: str, argv: list[str], toml: dict, env: dict):
    parser = cli.build_parser()
    known = {d for c in cli.SETTABLE for d in settings.options(cli._subparser(parser, c))}
    sub = cli._subparser(parser, command)
    sources = settings.resolve(sub, command, argv, toml, env, known, "t.toml")
    return sub.parse_args(argv), sources


def test_precedence_cli_env_toml_default():
    toml = {"port": 9100, "heartbeat_timeout": 4.0, "router": {"port": 9200, "max_inflight": 7}}
    env = {"TIDESERVE_HEARTBEAT_TIMEOUT": "3", "TIDESERVE_MAX_INFLIGHT": "9"}
    args, src = _resolve("router", ["--max-inflight", "11"], toml, env)
    assert (args.max_inflight, src["max_inflight"]) == (11, "cli")
    assert (args.heartbeat_timeout, src["heartbeat_timeout"]) == (3.0, "env")
    assert (args.port, src["port"]) == (9200, "toml")  # the [router] table beats top level
    assert (args.host, src["host"]) == ("127.0.0.1", "default")
    args, _ = _resolve("serve", [], toml, {})
    assert args.port == 9100  # top-level keys apply to every command with that option


def test_switches_lists_and_choices():
    toml = {"serve": {"autoscale": True, "policy_option": ["target_busy=0.5"], "policy": "slo"}}
    args, _ = _resolve("serve", [], toml, {"TIDESERVE_PROTECT_METRICS": "yes"})
    assert args.autoscale and args.protect_metrics and args.policy == "slo"
    assert args.policy_option == ["target_busy=0.5"]
    args, _ = _resolve("serve", [], {}, {"TIDESERVE_POLICY_OPTION": "a=1,b=2"})
    assert args.policy_option == ["a=1", "b=2"]


@pytest.mark.parametrize(
    "toml, env, message",
    [
        ({"prot": 1}, {}, "unknown setting(s) prot"),
        ({"routr": {"port": 1}}, {}, "unknown table [routr]"),
        ({"router": {"bogus": 1}}, {}, "unknown setting(s) bogus"),
        ({"port": "many"}, {}, "'many' is not a valid int"),
        ({}, {"TIDESERVE_HEARTBEAT_TIMEOUT": "soon"}, "TIDESERVE_HEARTBEAT_TIMEOUT"),
        ({}, {"TIDESERVE_PROTECT_METRICS": "maybe"}, "expected true or false"),
        ({"serve": {"policy": "psychic"}}, {}, "'psychic' is not one of"),
        ({"port": [1, 2]}, {}, "expected a single value"),
    ],
)
def test_bad_settings_are_clear_errors(toml, env, message):
    with pytest.raises(settings.ConfigError, match=None) as e:
        _resolve("router" if "router" in str(toml) else "serve", [], toml, env)
    assert message in str(e.value)


def test_config_show_and_bad_files_through_main(tmp_path, capsys, monkeypatch):
    cfg = tmp_path / "t.toml"
    cfg.write_text('api_key = "sekrit"\n[router]\nport = 9300\n')
    monkeypatch.setenv("TIDESERVE_MAX_INFLIGHT", "5")
    assert cli.main(["config", "show", "router", "--config", str(cfg), "--host", "0.0.0.0"]) == 0
    out = capsys.readouterr().out
    lines = {ln.split()[0]: ln.split()[1:] for ln in out.splitlines() if not ln.startswith("#")}
    assert lines["port"][:2] == ["9300", "toml"]
    assert lines["max_inflight"][:2] == ["5", "env"]
    assert lines["host"][:2] == ["0.0.0.0", "cli"]
    assert lines["api_key"][0] == "***" and "sekrit" not in out
    (tmp_path / "bad.toml").write_text("port = \n")
    assert cli.main(["router", "--config", str(tmp_path / "bad.toml")]) == 2
    assert "bad.toml" in capsys.readouterr().err
    assert cli.main(["router", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_kv_transports_reach_the_router_and_every_worker(capsys):
    args, src = _resolve("serve", ["--kv-transports", "gloo, tcp,gloo"], {}, {})
    assert (args.kv_transports, src["kv_transports"]) == (("gloo", "tcp"), "cli")
    args, _ = _resolve("decode", [], {"kv_transports": ["gloo", "shm"]}, {})
    assert args.kv_transports == ("gloo", "shm")  # a TOML array works as well as "gloo,shm"
    args, _ = _resolve("router", [], {}, {"TIDESERVE_KV_TRANSPORTS": "gloo"})
    assert args.kv_transports == ("gloo",)
    assert _resolve("prefill", [], {}, {})[0].kv_transports == ("nccl", "shm", "tcp")
    with pytest.raises(settings.ConfigError, match="unknown KV transport 'rdma'.*nccl, gloo"):
        _resolve("serve", [], {}, {"TIDESERVE_KV_TRANSPORTS": "gloo,rdma"})
    with pytest.raises(SystemExit):  # argparse's usage error: exit 2, no traceback
        cli.main(["serve", "--kv-transports", "carrier-pigeon"])
    assert "unknown KV transport 'carrier-pigeon'" in capsys.readouterr().err

    from tideserve.launcher import ServeConfig, worker_commands

    cfg = ServeConfig(model="m", kv_transports=("gloo", "tcp"))
    for cmd in worker_commands(cfg, "tcp://127.0.0.1:1"):
        assert cmd[cmd.index("--kv-transports") + 1] == "gloo,tcp"
    with pytest.raises(ValueError, match="unknown KV transport"):
        ServeConfig(model="m", kv_transports=("udp",))
