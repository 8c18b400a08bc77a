"""One configuration surface for every command: CLI flags, `TIDESERVE_*` env, a TOML file.

Every option of a `tideserve` command can be set three ways, strongest first:

    the command line        --heartbeat-timeout 3
    the environment         TIDESERVE_HEARTBEAT_TIMEOUT=3
    a TOML file             heartbeat_timeout = 3        (--config FILE or TIDESERVE_CONFIG)

then the built-in default. The name is the flag's, with dashes as underscores (env: upper
case, `TIDESERVE_` prefix). In the TOML file, top-level keys apply to every command that has
that option, and a table per command (`[serve]`, `[router]`, `[prefill]`, `[decode]`,
`[autoscaler]`) overrides them for that command. Lists (`policy_option`, `kv_transports`) are
TOML arrays, or comma-separated in the environment; switches take true/false (env: 1/0,
true/false, yes/no). A key no command knows is an error that names it, so a typo does not pass
silently.
`tideserve config show [COMMAND]` prints every option's effective value and where it came from.
"""

from __future__ import annotations

import argparse
import os
import tomllib

ENV_PREFIX = "TIDESERVE_"
SECTIONS = ("serve", "router", "prefill", "decode", "autoscaler")
SECRET = {"api_key"}  # shown as *** by `config show`
_NOT_SETTINGS = {"help", "func", "command", "config"}


class ConfigError(ValueError):
    """A bad TOML file, an unknown key, or a value of the wrong type."""


def load_toml(path: str | os.PathLike) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: {e}") from None


def options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The settable options of one (sub)command, by dest."""
    return {
        a.dest: a
        for a in parser._actions  # NOTE: argparse has no public accessor for its actions
        if a.option_strings and a.dest not in _NOT_SETTINGS and a.dest != argparse.SUPPRESS
    }


def _given_on_cli(action: argparse.Action, argv: list[str]) -> bool:
    return any(
        arg == opt or arg.startswith(opt + "=") for arg in argv for opt in action.option_strings
    )


def _convert(action: argparse.Action, value, where: str):
    """A TOML or env value as the option's type (env values are strings)."""
    name = f"{where} ({action.dest})"
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if isinstance(value, bool):
            return value
        v = str(value).strip().lower()
        if v in ("1", "true", "yes", "on"):
            return True
        if v in ("0", "false", "no", "off", ""):
            return False
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if isinstance(value, list) and getattr(action.type, "comma_list", False):
        value = ",".join(map(str, value))  # a TOML array for a comma-separated option
    if isinstance(action, argparse._AppendAction):
        items = value if isinstance(value, list) else [x for x in str(value).split(",") if x]
        return [_scalar(action, x, name) for x in items]
    return _scalar(action, value, name)


def _scalar(action: argparse.Action, value, name: str):
    if isinstance(value, (dict, list)):
        raise ConfigError(f"{name}: expected a single value, got {value!r}")
    try:
        v = (
            action.type(str(value) if action.type in (int, float) else value)
            if action.type
            else value
        )
    except argparse.ArgumentTypeError as e:
        raise ConfigError(f"{name}: {e}") from None
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: {value!r} is not a valid {action.type.__name__}") from None
    if action.type is None and not isinstance(value, str):
        v = str(value)
    if action.choices is not None and v not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise ConfigError(f"{name}: {v!r} is not one of {choices}")
    return v


def resolve(
    sub: argparse.ArgumentParser,
    command: str,
    argv: list[str],
    toml: dict,
    env: dict[str, str],
    known_keys: set[str],
    config_path: str = "",
) -> dict[str, str]:
    """Sets `sub`'s defaults from the TOML file and the environment; returns each option's
    source: "cli", "env", "toml" or "default"."""
    _check_keys(toml, known_keys, config_path)
    opts = options(sub)
    merged = {k: v for k, v in toml.items() if not isinstance(v, dict)}
    if isinstance(toml.get(command), dict):
        merged.update(toml[command])
    defaults, sources = {}, {}
    for dest, action in opts.items():
        if _given_on_cli(action, argv):
            sources[dest] = "cli"
            continue
        env_name = ENV_PREFIX + dest.upper()
        if env_name in env:
            defaults[dest] = _convert(action, env[env_name], env_name)
            sources[dest] = "env"
        elif dest in merged:
            defaults[dest] = _convert(action, merged[dest], f"{config_path or 'config'}: {dest}")
            sources[dest] = "toml"
        else:
            sources[dest] = "default"
    sub.set_defaults(**defaults)
    return sources


def _check_keys(toml: dict, known_keys: set[str], path: str) -> None:
    for key, value in toml.items():
        if isinstance(value, dict):
            if key not in SECTIONS:
                raise ConfigError(
                    f"{path}: unknown table [{key}]; tables are {', '.join(SECTIONS)}"
                )
            bad = sorted(set(value) - known_keys)
        else:
            bad = [key] if key not in known_keys else []
        if bad:
            raise ConfigError(f"{path}: unknown setting(s) {', '.join(bad)}")


def config_path(argv: list[str], env: dict[str, str]) -> str:
    """--config FILE (anywhere on the command line), else TIDESERVE_CONFIG, else ""."""
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return env.get(ENV_PREFIX + "CONFIG", "")


def show(sub: argparse.ArgumentParser, args: argparse.Namespace, sources: dict[str, str]) -> str:
    """One line per option: name, effective value, source."""
    lines = []
    for dest in sorted(options(sub)):
        value = getattr(args, dest, None)
        if dest in SECRET and value:
            value = "***"
        env = ENV_PREFIX + dest.upper()
        lines.append(f"{dest:<28} {value!s:<32} {sources.get(dest, 'default'):<8} ({env})")
    return "\n".join(lines)
