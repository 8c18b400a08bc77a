"""What the deployment tests share: the CLI as a service would run it (flags + environment +
TOML, through tideserve's own settings code), compose's `${VAR}` interpolation, and systemd
units read the way systemd starts them (drop-ins, specifiers, Environment=, EnvironmentFile=,
$VAR expansion in ExecStart=)."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose"
UNITS = COMPOSE / "systemd"
MULTI_HOST = UNITS / "multi-host"
UNIT_BINARY = "/usr/local/bin/tideserve"


@contextlib.contextmanager
def environ(env: dict[str, str]):
    """os.environ is `env` plus this process's non-TIDESERVE_* variables, for the block."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update({k: v for k, v in saved.items() if not k.startswith("TIDESERVE_")})
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def resolve_cli(argv: list[str], env: dict[str, str]):
    """`tideserve ARGV` parsed as `tideserve.cli.main` parses it with `env` as its environment
    (TIDESERVE_* and TIDESERVE_CONFIG applied by tideserve.settings.resolve); returns (the
    parsed arguments, each option's source). A bad flag or setting raises."""
    from tideserve import cli

    with environ(env):
        parser = cli.build_parser()  # NOTE: reads TIDESERVE_CURVE_KEYS/API_KEY for defaults
        args = parser.parse_args(argv)
        sources = {}
        if args.command in cli.SETTABLE:
            i = argv.index(args.command)
            sources = cli._configure(parser, args.command, argv[i + 1 :])
            args = parser.parse_args(argv)
    return args, sources


# -- compose -------------------------------------------------------------------------------------

_VAR = re.compile(r"\$\$|\$\{(\w+)(?:(:?[-?])([^}]*))?\}|\$(\w+)")


def interpolate(value, env: dict[str, str]):
    """Compose's interpolation of every string in `value`: ${V}, ${V:-default},
    ${V-default}, $V, and $$ for a literal $."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, default = m.group(2), m.group(3) or ""
        if op == ":-":
            return env.get(name) or default
        if op == "-":
            return env.get(name, default)
        if op in (":?", "?"):
            if not env.get(name):
                raise KeyError(f"{name} is required: {default}")
        return env.get(name, "")

    return _VAR.sub(one, value)


def variables(text: str) -> set[str]:
    """The names of the variables a compose file interpolates."""
    return {m.group(1) or m.group(4) for m in _VAR.finditer(text) if m.group(0) != "$$"}


def dotenv(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (compose's env files, systemd's EnvironmentFile=); # comments."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip().strip("\"'")
    return out


# -- systemd -------------------------------------------------------------------------------------


def read_unit(path: Path, dropins: tuple[Path, ...] = ()) -> list[tuple[str, str, str]]:
    """(section, key, value) in order, the drop-ins applied after the unit as systemd does: an
    empty value resets what came before (ExecStart=, Environment=)."""
    entries: list[tuple[str, str, str]] = []
    for f in (path, *dropins):
        section = ""
        for line in f.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("["):
                section = line.strip("[]")
                continue
            key, _, value = line.partition("=")
            key, value = key.strip(), value.strip()
            if value == "":  # kept too: CapabilityBoundingSet= (none) is a setting
                entries = [e for e in entries if (e[0], e[1]) != (section, key)]
            entries.append((section, key, value))
    return entries


def settings(entries, key: str) -> list[str]:
    return [v for _, k, v in entries if k == key]


def setting(entries, key: str, default: str | None = None) -> str | None:
    values = settings(entries, key)
    return values[-1] if values else default


def specifiers(text: str, instance: str, hostname: str) -> str:
    """systemd's %i/%I (the instance), %l/%H (the host name) and %%."""
    table = {"i": instance, "I": instance, "l": hostname.split(".")[0], "H": hostname, "%": "%"}
    return re.sub(r"%(.)", lambda m: table[m.group(1)], text)


def unit_command(
    entries, instance: str, hostname: str, env_file: dict[str, str]
) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) of the process systemd starts for this unit instance: Environment=
    (specifiers expanded), then the EnvironmentFile (`env_file`), which overrides it; in
    ExecStart=, a `$VAR` word becomes the variable's words, `${VAR}` its value."""
    env: dict[str, str] = {}
    for value in settings(entries, "Environment"):
        for item in shlex.split(specifiers(value, instance, hostname)):
            key, _, val = item.partition("=")
            env[key] = val
    env.update(env_file)
    exec_start = setting(entries, "ExecStart")
    argv: list[str] = []
    for word in shlex.split(specifiers(exec_start, instance, hostname)):
        whole = re.fullmatch(r"\$(\w+)", word)
        if whole:
            argv += env.get(whole.group(1), "").split()
        else:
            argv.append(re.sub(r"\$\{(\w+)\}", lambda m: env.get(m.group(1), ""), word))
    return argv, env
