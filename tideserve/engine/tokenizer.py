"""Tokenizer of an HF model folder: encode, decode, chat templates, incremental detokenizing.

Lifecycle of text through this module (``transformers`` is never imported at run time):

1. ``Tokenizer.from_dir(folder)`` loads ``tokenizer.json`` with the ``tokenizers`` library and
   reads ``tokenizer_config.json``, ``special_tokens_map.json``, ``generation_config.json`` and
   ``config.json`` when present: the special tokens, the chat template(s) and the eos ids. Named
   special tokens missing from the backend's added tokens are added as special, as HF does.
2. The router renders a request's messages with ``apply_chat_template`` (jinja2, set up as HF
   sets it up) and encodes the prompt with ``encode``. A template is encoded with
   ``add_special_tokens=False``: the template writes its own BOS.
3. Generated ids come back a few at a time; one ``IncrementalDetokenizer`` per request turns
   them into text deltas that never end inside a UTF-8 character, in O(window) per step.

NOTE: ``encode`` equals HF's ``tokenizer(text)["input_ids"]`` for a folder loaded as a generic
fast tokenizer: the post-processor in ``tokenizer.json`` adds BOS/EOS. Only where that file has
no post-processor are ``add_bos_token``/``add_eos_token`` from ``tokenizer_config.json`` applied
(the legacy Llama/Mistral layout). HF's ``clean_up_tokenization_spaces`` is not applied.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, processors
from tokenizers import Tokenizer as Backend

from tideserve.engine.chat_template import render_chat_template

_SPECIAL_NAMES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")
_REPLACEMENT_CHAR = "\ufffd"
_MAX_ID = 2**32  # the Rust library's ids are u32


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _token_content(value: Any) -> str | None:
    """A special token as written in HF configs: a string or an ``{"content": ...}`` dict."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _as_ids(value: Any) -> list[int]:
    """An ``eos_token_id`` field: an int, a list of ints, or absent."""
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]


def _extra_special_tokens(*configs: Mapping[str, Any]) -> list[str]:
    tokens: list[str] = []
    for cfg in configs:
        for key in ("additional_special_tokens", "extra_special_tokens"):
            value = cfg.get(key) or []
            items = value.values() if isinstance(value, Mapping) else value
            tokens += [t for t in map(_token_content, items) if t is not None]
    return tokens


def _load_chat_templates(folder: Path, tokenizer_config: Mapping[str, Any]) -> dict[str, str]:
    """Named templates; ``chat_template.jinja`` files win over the config's ``chat_template``."""
    templates: dict[str, str] = {}
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        templates["default"] = jinja_file.read_text(encoding="utf-8")
    extra_dir = folder / "additional_chat_templates"
    if extra_dir.is_dir():
        for path in sorted(extra_dir.glob("*.jinja")):
            templates[path.stem] = path.read_text(encoding="utf-8")
    if templates:
        return templates
    value = tokenizer_config.get("chat_template")
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list):
        for item in value:
            if not (
                isinstance(item, Mapping)
                and isinstance(item.get("name"), str)
                and isinstance(item.get("template"), str)
            ):
                raise ValueError(
                    f"chat_template in {folder / 'tokenizer_config.json'} must be a string or a "
                    'list of {"name": ..., "template": ...} objects'
                )
            templates[item["name"]] = item["template"]
    return templates


def _add_missing_special_tokens(
    backend: Backend, tokenizer_config: Mapping[str, Any], specials: Iterable[str]
) -> None:
    """Add, as HF does at load, tokens the configs name but ``tokenizer.json`` does not list."""
    present = {t.content for t in backend.get_added_tokens_decoder().values()}
    decoder = tokenizer_config.get("added_tokens_decoder") or {}
    to_add = []
    for _, spec in sorted(decoder.items(), key=lambda kv: int(kv[0])):
        if isinstance(spec, Mapping) and spec.get("content") and spec["content"] not in present:
            to_add.append(
                AddedToken(
                    spec["content"],
                    single_word=bool(spec.get("single_word", False)),
                    lstrip=bool(spec.get("lstrip", False)),
                    rstrip=bool(spec.get("rstrip", False)),
                    normalized=bool(spec.get("normalized", False)),
                    special=bool(spec.get("special", True)),
                )
            )
            present.add(spec["content"])
    for token in specials:
        if token not in present:
            to_add.append(AddedToken(token, special=True, normalized=False))
            present.add(token)
    if to_add:
        backend.add_tokens(to_add)


def _legacy_post_processor(
    backend: Backend, tokenizer_config: Mapping[str, Any], bos: str | None, eos: str | None
) -> processors.PostProcessor | None:
    """BOS/EOS from ``add_bos_token``/``add_eos_token``, for files without a post-processor."""
    pieces, specials = ["$A:0"], []
    if tokenizer_config.get("add_bos_token") and bos and backend.token_to_id(bos) is not None:
        pieces.insert(0, f"{bos}:0")
        specials.append((bos, backend.token_to_id(bos)))
    if tokenizer_config.get("add_eos_token") and eos and backend.token_to_id(eos) is not None:
        pieces.append(f"{eos}:0")
        specials.append((eos, backend.token_to_id(eos)))
    if not specials:
        return None
    single = " ".join(pieces)
    pair = f"{single} " + single.replace("$A:0", "$B:1").replace(":0", ":1")
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


class Tokenizer:
    """Encode/decode and chat templates for one model; immutable once loaded."""

    def __init__(
        self,
        backend: Backend,
        special_tokens: Mapping[str, str],
        chat_templates: Mapping[str, str],
        eos_token_ids: frozenset[int],
        all_special_ids: frozenset[int],
        vocab_size: int,
        name: str = "",
    ) -> None:
        self._backend = backend
        self.special_tokens = dict(special_tokens)  # "bos_token" -> "<s>", only those present
        self.chat_templates = dict(chat_templates)  # template name -> jinja source
        self.eos_token_ids = eos_token_ids  # every id that ends generation
        self.all_special_ids = all_special_ids  # named specials and added tokens marked special
        self.vocab_size = vocab_size  # 1 + the largest id, added tokens included
        self.name = name  # the folder it came from, for error messages

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load the tokenizer of an HF model folder (``tokenizer.json`` is required)."""
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"model folder {folder} does not exist")
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(
                f"no tokenizer.json in model folder {folder}: tideserve needs a fast-tokenizer "
                "file (save the tokenizer with transformers' save_pretrained to create one)"
            )
        try:
            backend = Backend.from_file(str(tokenizer_file))
        except Exception as e:  # the Rust library raises a bare Exception
            raise ValueError(f"cannot load {tokenizer_file}: {e}") from e
        tokenizer_config = _read_json(folder / "tokenizer_config.json")
        special_map = _read_json(folder / "special_tokens_map.json")
        special_tokens = {}
        for name in _SPECIAL_NAMES:
            key = f"{name}_token"
            token = _token_content(tokenizer_config.get(key) or special_map.get(key))
            if token is not None:
                special_tokens[key] = token
        extras = _extra_special_tokens(tokenizer_config, special_map)
        _add_missing_special_tokens(backend, tokenizer_config, [*special_tokens.values(), *extras])
        if backend.post_processor is None:
            processor = _legacy_post_processor(
                backend,
                tokenizer_config,
                special_tokens.get("bos_token"),
                special_tokens.get("eos_token"),
            )
            if processor is not None:
                backend.post_processor = processor

        eos_ids = _as_ids(backend.token_to_id(special_tokens.get("eos_token", "")))
        for config_name in ("generation_config.json", "config.json"):
            eos_ids += _as_ids(_read_json(folder / config_name).get("eos_token_id"))
        special_ids = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        special_ids |= {backend.token_to_id(t) for t in [*special_tokens.values(), *extras]}
        special_ids.discard(None)
        vocab_size = max(backend.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        return cls(
            backend,
            special_tokens,
            _load_chat_templates(folder, tokenizer_config),
            frozenset(i for i in eos_ids if 0 <= i < vocab_size),
            frozenset(special_ids),
            vocab_size,
            name=str(folder),
        )

    def _token_id(self, key: str) -> int | None:
        token = self.special_tokens.get(key)
        return None if token is None else self._backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._token_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        """The tokenizer's own eos token; ``eos_token_ids`` holds every id that stops."""
        return self._token_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._token_id("pad_token")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``, as HF's ``tokenizer(text)["input_ids"]``."""
        if not isinstance(text, str):
            raise ValueError(f"text to encode must be a str, got {type(text).__name__}")
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; an id past the vocabulary (a padded embedding row) adds nothing."""
        self.check_ids(ids, _MAX_ID)
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def check_ids(self, ids: Iterable[int], limit: int | None = None) -> None:
        """Raise ValueError unless every id is an int in ``[0, limit)`` (default: vocab_size)."""
        limit = self.vocab_size if limit is None else limit
        for i in ids:
            if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < limit:
                raise ValueError(
                    f"token id {i!r} is not in the vocabulary of {self.name or 'this tokenizer'} "
                    f"(ids run from 0 to {limit - 1})"
                )

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        tools: Sequence[Mapping[str, Any]] | None = None,
        chat_template: str | None = None,
        **extra: Any,
    ) -> str | list[int]:
        """Render ``messages`` as HF does; ``tokenize=True`` returns the prompt's token ids.

        ``chat_template`` names one of ``chat_templates`` (default: "tool_use" when tools are
        given and that template exists, else "default"); ``extra`` reaches the template as
        variables and overrides the special tokens.
        """
        source = self._pick_chat_template(chat_template, tools)
        context = {**self.special_tokens, **extra}
        text = render_chat_template(source, messages, add_generation_prompt, tools, context)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def _pick_chat_template(self, name: str | None, tools: Any) -> str:
        where = self.name or "this tokenizer"
        if not self.chat_templates:
            raise ValueError(
                f"the model at {where} has no chat template (no chat_template in "
                "tokenizer_config.json and no chat_template.jinja): use the completions API"
            )
        if name is None:
            name = "tool_use" if tools and "tool_use" in self.chat_templates else "default"
        if name not in self.chat_templates:
            raise ValueError(
                f"the model at {where} has no chat template named {name!r}; "
                f"it has {sorted(self.chat_templates)}"
            )
        return self.chat_templates[name]


class IncrementalDetokenizer:
    """Turns generated ids into text deltas, one request at a time.

    vLLM's prefix/read-offset scheme: the text of ``ids[prefix:read]`` was emitted already; on
    new ids the window ``ids[prefix:]`` is decoded and the part past that old text is emitted,
    unless it ends in U+FFFD (a UTF-8 character split across tokens), which waits for more ids.
    Decoding from a token already emitted keeps the leading space that SentencePiece-style
    decoders strip from a first token. For output that is valid UTF-8 the deltas, joined with
    ``flush()``, equal ``tokenizer.decode(all_ids)``.
    """

    # NOTE: past this many ids without emitting, text is emitted even if it ends in U+FFFD, so a
    # model stuck on invalid UTF-8 or on skipped special tokens costs O(window), not O(length).
    max_pending_ids = 16

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._decode = partial(tokenizer._backend.decode, skip_special_tokens=skip_special_tokens)
        self._ids: list[int] = []
        self._prefix_offset = 0  # window start: an id whose text was already emitted
        self._read_offset = 0  # ids before this one have all their text emitted
        self._prefix_text = ""  # decode(ids[prefix_offset:read_offset])
        self._parts: list[str] = []

    @property
    def ids(self) -> list[int]:
        return list(self._ids)

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    def add(self, ids: int | Sequence[int]) -> str:
        """Append generated ids; return the newly completed text (maybe "")."""
        new_ids = [ids] if isinstance(ids, int) else list(ids)
        self._tokenizer.check_ids(new_ids, _MAX_ID)
        deltas = []
        for i in new_ids:  # NOTE: one at a time, so a char boundary inside a chunk is seen
            self._ids.append(i)
            pending = len(self._ids) - self._read_offset
            deltas.append(self._advance(force=pending > self.max_pending_ids))
        return "".join(deltas)

    def flush(self) -> str:
        """Emit whatever is held back; call once generation is finished."""
        return self._advance(force=True)

    def _advance(self, force: bool) -> str:
        new_text = self._decode(self._ids[self._prefix_offset :])
        grew = len(new_text) > len(self._prefix_text)
        if not force and (not grew or new_text.endswith(_REPLACEMENT_CHAR)):
            return ""
        delta = new_text[len(self._prefix_text) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix_offset :])
        if delta:
            self._parts.append(delta)
        return delta
