"""Tokenizer, chat template and incremental detokenizer against HF on a tiny trained BPE."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from tideserve.engine.tokenizer import IncrementalDetokenizer, Tokenizer

CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "Serving large language models needs paged attention and continuous batching.",
    "Café, naïve, résumé — déjà vu. Ünïcödé text is fine.",
    "日本語のテキストと中文文本。 한국어 텍스트도 있습니다.",
    "Emoji: 🎉🚀👍🏽 and 🤖 robots; math: ∑ x² ≤ π.",
    "Numbers 12345 and 3.14159, code: def f(x): return x * 2",
]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% if tools %}{{ '<|im_start|>system\\nTools: ' + tools | tojson + '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% for message in messages %}\n"
    "{% if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}\n"
    "{{ raise_exception('Unknown role: ' + message['role']) }}\n"
    "{% endif %}\n"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}\n"
    "{{ '<|im_start|>assistant\\n' }}\n"
    "{% endif %}"
)
TEXTS = [
    "Hello world!",
    "",
    "  leading and trailing spaces  ",
    "Café naïve résumé — déjà vu",
    "日本語のテキストと中文文本。한국어",
    "Emoji 🎉🚀👍🏽🤖 mixed with text ∑ x² ≤ π",
    "Numbers 12345 and 3.14159",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "tabs\tand\nnewlines\n\n",
    "unseen chars: Ω ж ק ﷺ",
]
# characters the tiny vocabularies never saw: their bytes land in separate tokens
SPLIT_TEXT = "🦄🦄 ðŸ 𝔘𝔫𝔦 " + " 日本語" * 3 + "<|im_end|> end 🎉"
CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "日本語で答えて 🎉"},
        {"role": "assistant", "content": "はい。"},
        {"role": "user", "content": "Again?"},
    ],
    [{"role": "user", "content": "  spaces\n\nand lines  "}],
]


def _train(pre_tokenizer, decoder, byte_fallback: bool = False) -> Backend:
    backend = Backend(models.BPE(byte_fallback=byte_fallback, unk_token=None))
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoder
    alphabet = pre_tokenizers.ByteLevel.alphabet() if not byte_fallback else []
    specials = SPECIALS + ([f"<0x{b:02X}>" for b in range(256)] if byte_fallback else [])
    trainer = trainers.BpeTrainer(
        vocab_size=400 + (256 if byte_fallback else 0),
        special_tokens=specials,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS * 3, trainer)
    # byte-fallback pieces belong to the vocabulary, not to the special added tokens
    spec = json.loads(backend.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] in SPECIALS]
    return Backend.from_str(json.dumps(spec))


def _byte_level() -> Backend:
    backend = _train(
        pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        ),
        decoders.ByteLevel(),
    )
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return backend


def _write(
    folder: Path, backend: Backend, tokenizer_config: dict | None = None, **files: dict
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    backend.save(str(folder / "tokenizer.json"))
    config = {
        "bos_token": "<|im_start|>",
        "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "special": True},
        "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "chat_template": CHATML,
        **(tokenizer_config or {}),
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    for name, content in files.items():
        (folder / f"{name}.json").write_text(json.dumps(content))
    return folder


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory) -> Path:
    return _write(
        tmp_path_factory.mktemp("chatml"),
        _byte_level(),
        generation_config={"eos_token_id": [0, 2]},
        config={"eos_token_id": 1},
    )


@pytest.fixture(scope="module")
def tok(chatml_dir) -> Tokenizer:
    return Tokenizer.from_dir(chatml_dir)


@pytest.fixture(scope="module")
def hf(chatml_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(chatml_dir))


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_and_decode_match_hf(tok, hf, add_special_tokens):
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=add_special_tokens)
        assert ids == hf(text, add_special_tokens=add_special_tokens)["input_ids"], text
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(
                ids, skip_special_tokens=skip
            ), text


def test_special_tokens_match_hf(tok, hf):
    assert tok.bos_token_id == hf.bos_token_id == 1
    assert tok.eos_token_id == hf.eos_token_id == 2
    assert tok.pad_token_id == hf.pad_token_id
    assert tok.vocab_size == len(hf)
    assert tok.all_special_ids == frozenset(hf.all_special_ids)
    # the tokenizer's eos, generation_config.json's list and config.json's int
    assert tok.eos_token_ids == {0, 1, 2}


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_hf(tok, hf, add_generation_prompt):
    for messages in CONVERSATIONS:
        ours = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        theirs = hf.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False
        )
        assert ours == theirs
        ids = tok.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=True
        )
        assert ids == hf(theirs, add_special_tokens=False)["input_ids"]
        assert ids == tok.encode(ours, add_special_tokens=False)


def test_chat_template_tools_use_hf_tojson(tok, hf):
    tools = [{"type": "function", "function": {"name": "météo", "parameters": {"a": "<b>"}}}]
    messages = [{"role": "user", "content": "Weather?"}]
    ours = tok.apply_chat_template(messages, tools=tools)
    assert ours == hf.apply_chat_template(
        messages, tools=tools, add_generation_prompt=True, tokenize=False
    )
    assert '"météo"' in ours and "<b>" in ours


def test_text_parts_are_joined(tok):
    parts = [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]
    assert tok.apply_chat_template([{"role": "user", "content": parts}]) == (
        tok.apply_chat_template([{"role": "user", "content": "first\nsecond"}])
    )


def test_extra_variables_reach_the_template(tmp_path):
    template = "{{ bos_token }}{% if enable_thinking %}think{% endif %}{{ messages[0]['content'] }}"
    folder = _write(tmp_path, _byte_level(), tokenizer_config={"chat_template": template})
    tok = Tokenizer.from_dir(folder)
    messages = [{"role": "user", "content": "x"}]
    assert tok.apply_chat_template(messages, enable_thinking=True) == "<|im_start|>thinkx"
    assert tok.apply_chat_template(messages, bos_token="") == "x"


def test_generation_tag_and_strftime_render_like_hf(tmp_path):
    template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}"
        "{{ m['content'] }}{% endgeneration %}{% else %}{{ m['content'] | upper }}{% endif %}"
        "{% endfor %}{{ strftime_now('%Y') | length }}"
    )
    folder = _write(tmp_path, _byte_level(), tokenizer_config={"chat_template": template})
    hf = pytest.importorskip("transformers").AutoTokenizer.from_pretrained(str(folder))
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    ours = Tokenizer.from_dir(folder).apply_chat_template(messages)
    assert ours == hf.apply_chat_template(messages, tokenize=False) == "Qa4"


@pytest.mark.parametrize(
    "messages, error",
    [
        ("hello", "non-empty list"),
        ([], "non-empty list"),
        (["hello"], r"messages\[0\] must be an object"),
        ([{"content": "hi"}], r"messages\[0\].role"),
        ([{"role": "user"}], r"messages\[0\] has no content"),
        ([{"role": "user", "content": 3}], r"messages\[0\].content must be a string"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "text part"),
        ([{"role": "wizard", "content": "hi"}], "Unknown role: wizard"),
    ],
)
def test_bad_messages_raise_value_error(tok, messages, error):
    with pytest.raises(ValueError, match=error):
        tok.apply_chat_template(messages)


def test_no_chat_template_is_a_clear_error(tmp_path):
    backend = _byte_level()
    folder = _write(tmp_path, backend)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="has no chat template"):
        Tokenizer.from_dir(folder).apply_chat_template([{"role": "user", "content": "hi"}])


def test_broken_template_is_a_value_error(tmp_path):
    folder = _write(tmp_path, _byte_level(), tokenizer_config={"chat_template": "{% for %}"})
    with pytest.raises(ValueError, match="does not compile"):
        Tokenizer.from_dir(folder).apply_chat_template([{"role": "user", "content": "hi"}])


def test_jinja_file_wins_and_named_templates(tmp_path):
    named = [
        {"name": "default", "template": "D{{ messages[0]['content'] }}"},
        {"name": "tool_use", "template": "T{{ tools | length }}"},
    ]
    folder = _write(tmp_path, _byte_level(), tokenizer_config={"chat_template": named})
    tok = Tokenizer.from_dir(folder)
    messages = [{"role": "user", "content": "x"}]
    assert tok.apply_chat_template(messages) == "Dx"
    assert tok.apply_chat_template(messages, tools=[{"name": "f"}]) == "T1"
    (folder / "chat_template.jinja").write_text("J{{ messages | length }}")
    assert Tokenizer.from_dir(folder).apply_chat_template(messages) == "J1"


def test_missing_or_broken_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_dir(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=f"no tokenizer.json in model folder {tmp_path}"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot load"):
        Tokenizer.from_dir(tmp_path)


def test_bad_ids_and_text(tok):
    with pytest.raises(ValueError, match="must be a str"):
        tok.encode(b"bytes")
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tok.decode([1, -1])
    with pytest.raises(ValueError, match="not in the vocabulary"):
        IncrementalDetokenizer(tok).add([-1])
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tok.check_ids([1, tok.vocab_size])
    # a model whose embedding is padded past the tokenizer may sample such an id
    assert tok.decode([tok.vocab_size + 5]) == IncrementalDetokenizer(tok).add(tok.vocab_size) == ""


def test_template_processing_adds_bos_like_hf(tmp_path):
    backend = _byte_level()
    backend.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A",
        pair="<|im_start|> $A <|im_start|> $B",
        special_tokens=[("<|im_start|>", 1)],
    )
    folder = _write(tmp_path, backend)
    hf = pytest.importorskip("transformers").AutoTokenizer.from_pretrained(str(folder))
    tok = Tokenizer.from_dir(folder)
    for text in TEXTS:
        assert tok.encode(text) == hf(text)["input_ids"]
        assert tok.encode(text)[0] == 1


def test_add_bos_token_without_post_processor(tmp_path):
    backend = _byte_level()
    backend.post_processor = None
    folder = _write(
        tmp_path, backend, tokenizer_config={"add_bos_token": True, "add_eos_token": True}
    )
    tok = Tokenizer.from_dir(folder)
    plain = tok.encode("Hello world", add_special_tokens=False)
    assert tok.encode("Hello world") == [1, *plain, 2]


def _split_char_ids(tok: Tokenizer, ids: list[int]) -> bool:
    return any("\ufffd" in tok.decode([i]) for i in ids)


def _metaspace_tokenizer(tmp_path: Path) -> Tokenizer:
    backend = _train(
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False),
        decoders.Sequence(
            [
                decoders.Replace("▁", " "),
                decoders.ByteFallback(),
                decoders.Fuse(),
                decoders.Strip(" ", 1, 0),
            ]
        ),
        byte_fallback=True,
    )
    backend.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    backend.pre_tokenizer = None
    return Tokenizer.from_dir(_write(tmp_path, backend))


@pytest.mark.parametrize("kind", ["byte_level", "metaspace"])
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_detokenizer_deltas_join_to_decode(tok, tmp_path, kind, skip_special_tokens):
    tokenizer = tok if kind == "byte_level" else _metaspace_tokenizer(tmp_path)
    rng = random.Random(0)
    for text in TEXTS[3:] + [SPLIT_TEXT]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        if text == SPLIT_TEXT:
            assert _split_char_ids(tokenizer, ids)
        detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
        deltas, i = [], 0
        while i < len(ids):
            n = rng.choice([1, 1, 1, 2, 3])
            deltas.append(detok.add(ids[i : i + n]))
            i += n
        deltas.append(detok.flush())
        expected = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        assert "".join(deltas) == expected == detok.text
        assert not any("\ufffd" in d for d in deltas)


def test_detokenizer_holds_split_character_back(tok):
    ids = tok.encode("🦄", add_special_tokens=False)
    assert len(ids) > 1
    detok = IncrementalDetokenizer(tok)
    assert [detok.add(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.add(ids[-1]) == "🦄"


def test_detokenizer_cost_stays_in_a_small_window(tok):
    class CountingBackend:
        def __init__(self, inner):
            self.inner, self.longest = inner, 0

        def decode(self, ids, skip_special_tokens):
            self.longest = max(self.longest, len(ids))
            return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)

    counting = Tokenizer(
        CountingBackend(tok._backend),
        tok.special_tokens,
        {},
        tok.eos_token_ids,
        tok.all_special_ids,
        tok.vocab_size,
    )
    ids = tok.encode(" ".join(TEXTS) * 20, add_special_tokens=False)
    detok = IncrementalDetokenizer(counting)
    for i in ids:
        detok.add(i)
    assert detok.text + detok.flush() == tok.decode(ids)
    assert len(ids) > 1000 and counting._backend.longest <= 16
