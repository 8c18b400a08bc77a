"""Chat templates rendered the way HF ``transformers`` renders them, without importing it.

A request's messages are checked (a list of dicts with a str ``role`` and a str ``content``;
OpenAI-style text parts are joined with newlines), then the model's jinja template runs in an
immutable sandbox with HF's settings: ``trim_blocks``, ``lstrip_blocks``, loop controls, the
``raise_exception`` and ``strftime_now`` globals, a ``tojson`` filter that keeps non-ASCII
text, and the ``{% generation %}`` tag (rendered as its body). Compiled templates are cached.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """A template refused the conversation (``raise_exception``) or could not run."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` marks assistant text for HF's training masks."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body).set_lineno(lineno)


@lru_cache(maxsize=16)
def compile_chat_template(source: str) -> jinja2.Template:
    """The compiled template; ValueError on a syntax error."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the chat template does not compile: {e}") from e


def _message_content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(
            f"{where}.content must be a string or a list of text parts, "
            f"got {type(content).__name__}"
        )
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, Mapping) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            raise ValueError(f"{where}.content[{j}] must be a text part, got {kind!r}")
        if not isinstance(part.get("text"), str):
            raise ValueError(f"{where}.content[{j}].text must be a string")
        texts.append(part["text"])
    return "\n".join(texts)


def check_messages(messages: Any) -> list[dict[str, Any]]:
    """Plain copies of ``messages`` with text ``content``; ValueError naming the bad field.

    ``content`` may be null only beside ``tool_calls`` (an assistant message calling tools).
    """
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} objects")
    checked = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise ValueError(f"{where} must be an object, got {type(message).__name__}")
        if not isinstance(message.get("role"), str) or not message["role"]:
            raise ValueError(f"{where}.role must be a non-empty string")
        if "content" not in message:
            raise ValueError(f"{where} has no content")
        message = dict(message)
        if message["content"] is not None or not message.get("tool_calls"):
            message["content"] = _message_content(message["content"], where)
        checked.append(message)
    return checked


def _check_tools(tools: Any) -> list[dict[str, Any]] | None:
    if tools is None:
        return None
    if (
        not isinstance(tools, Sequence)
        or isinstance(tools, str)
        or not all(isinstance(tool, Mapping) for tool in tools)
    ):
        raise ValueError("tools must be a list of JSON-schema objects")
    return [dict(tool) for tool in tools]


def render_chat_template(
    source: str, messages: Any, add_generation_prompt: bool, tools: Any, context: Mapping[str, Any]
) -> str:
    """Render ``source`` over checked ``messages``; ``context`` adds variables (special tokens
    and request extras such as ``enable_thinking``)."""
    template = compile_chat_template(source)
    variables = {
        "documents": None,
        **context,
        "messages": check_messages(messages),
        "tools": _check_tools(tools),
        "add_generation_prompt": add_generation_prompt,
    }
    try:
        return template.render(**variables)
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the chat template failed on these messages: {e}") from e
