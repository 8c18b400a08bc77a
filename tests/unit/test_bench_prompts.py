"""Prompts of an exact token count: token ids, a word-level tokenizer, the default model's."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import models, pre_tokenizers, processors

from tideserve.bench.prompts import PromptMaker
from tideserve.engine.tokenizer import Tokenizer

WORDS = [
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet",
    "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango",
    "uniform", "victor", "whiskey", "xray", "yankee", "zulu",
]  # fmt: skip


def word_level_dir(tmp_path, with_bos: bool):
    """A tokenizer.json whose vocabulary is WORDS crossed with a suffix, split on whitespace."""
    vocab = {"<unk>": 0, "<s>": 1}
    for w in WORDS:
        for suffix in ("", "s", "ed", "ing"):
            vocab.setdefault(w + suffix, len(vocab))
    backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if with_bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", 1)]
        )
    folder = tmp_path / ("bos" if with_bos else "plain")
    folder.mkdir()
    backend.save(str(folder / "tokenizer.json"))
    return folder


def test_token_id_prompts_have_the_exact_length_and_differ():
    maker = PromptMaker.token_ids()
    a, n = maker.make(37, random.Random(1))
    b, _ = maker.make(37, random.Random(2))
    assert maker.mode == "token_ids"
    assert n == 37 and len(a) == 37 and all(isinstance(t, int) for t in a)
    assert a != b


@pytest.mark.parametrize("with_bos", [False, True])
def test_text_prompts_encode_to_the_asked_count(tmp_path, with_bos):
    tok = Tokenizer.from_dir(word_level_dir(tmp_path, with_bos))
    maker = PromptMaker.for_tokenizer(tok)
    assert maker.mode == "text" and maker.is_additive
    assert maker.num_special == (1 if with_bos else 0)
    rng = random.Random(0)
    for n in (2, 7, 128, 1000):
        prompt, count = maker.make(n, rng)
        assert isinstance(prompt, str)
        assert count == n
        assert len(tok.encode(prompt)) == n


SYLLABLES = [a + b for a in "bdfgklmnprst" for b in "aeiou"]  # 60 one-token words


class MergingEncoder:
    """Every tenth word merges with the next: joining words does not add up."""

    vocab_size = len(SYLLABLES)

    def decode(self, ids, skip_special_tokens=True):
        return " " + SYLLABLES[ids[0]]

    def encode(self, text, add_special_tokens=True):
        n = len(text.split())
        return list(range(n - n // 10))


def test_tokenizers_that_do_not_add_up_are_corrected_and_honest():
    maker = PromptMaker.for_tokenizer(MergingEncoder())
    assert maker.mode == "text" and not maker.is_additive
    for n in (5, 50, 500):
        prompt, count = maker.make(n, random.Random(n))
        assert count == len(MergingEncoder().encode(prompt))
        assert abs(count - n) <= 1


def test_too_small_a_vocabulary_falls_back_to_token_ids():
    class Tiny(MergingEncoder):
        vocab_size = 5

    assert PromptMaker.for_tokenizer(Tiny()).mode == "token_ids"


def test_default_model_tokenizer_exact_counts():
    from tideserve.engine.default_model import default_model_dir, is_prepared

    if not is_prepared(default_model_dir()):
        pytest.skip("the default model is not prepared (tideserve model prepare)")
    tok = Tokenizer.from_dir(default_model_dir())
    maker = PromptMaker.for_tokenizer(tok)
    assert maker.mode == "text"
    rng = random.Random(5)
    for n in (1, 16, 300, 2048):
        prompt, count = maker.make(n, rng)
        assert count == n == len(tok.encode(prompt))
