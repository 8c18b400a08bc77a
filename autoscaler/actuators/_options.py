"""Actuator options that may come from the command line as one string
(`--actuator-option KEY=VALUE`) or from Python as a sequence or a mapping."""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Mapping


def as_args(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """Shell words (`--model /m --dtype bfloat16`) or a sequence -> argv words."""
    if value is None:
        return ()
    return tuple(shlex.split(value)) if isinstance(value, str) else tuple(value)


def as_list(value: str | Iterable[str] | None) -> list[str]:
    """Comma-separated items (`a,b`) or a sequence -> a list; empty items dropped."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else value
    return [s.strip() for s in items if s.strip()]


def as_mapping(value: str | Mapping[str, str] | None, what: str) -> dict[str, str]:
    """`k=v,k2=v2` or a mapping -> a dict; a malformed item is a ValueError naming `what`."""
    if value is None:
        return {}
    if not isinstance(value, str):
        return {str(k): str(v) for k, v in value.items()}
    out = {}
    for item in as_list(value):
        key, sep, val = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{what} must be KEY=VALUE[,KEY=VALUE...], got {item!r}")
        out[key.strip()] = val.strip()
    return out
