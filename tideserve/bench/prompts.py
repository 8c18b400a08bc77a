"""Prompts of an exact token count, for the served model's tokenizer or for none.

Lifecycle: ``PromptMaker.for_tokenizer(tok)`` builds a pool of words that each encode to one
token after a space (read from the vocabulary) and checks once, on a long sample, whether joining
them adds up (``" w1 w2 ... wN"`` encodes to N tokens, as with byte-level BPE). Then each
``make(n, rng)`` is a random string of those words, cheap enough to build while replaying; where
the tokenizer does not add up, each prompt is encoded and corrected word by word instead. With no
tokenizer, ``PromptMaker.token_ids()`` makes random token-id lists, which the OpenAI completions
API accepts as ``prompt``. Every prompt differs from the others, so no prefix cache helps.
"""

from __future__ import annotations

import random
from typing import Protocol

_MAX_POOL = 2000  # words kept from the vocabulary
_SCAN_IDS = 40000  # vocabulary ids looked at for words
_ID_RANGE = (1000, 10000)  # token ids of token-id prompts: inside any real vocabulary
_MAX_FIXES = 8  # encode-and-correct rounds for tokenizers that do not add up


class Encoder(Protocol):
    vocab_size: int

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class PromptMaker:
    """Makes prompts of a given token count; ``mode`` is ``text`` or ``token_ids``."""

    def __init__(
        self, words: list[str], encoder: Encoder | None, num_special: int, is_additive: bool
    ) -> None:
        self.words = words  # one-token words, each sent after a space
        self.encoder = encoder  # None: token-id prompts
        self.num_special = num_special  # tokens the server's encode adds (BOS, ...)
        self.is_additive = is_additive  # " w1 ... wN" always encodes to N tokens
        self.mode = "text" if encoder is not None else "token_ids"

    @classmethod
    def token_ids(cls) -> PromptMaker:
        return cls([], None, 0, True)

    @classmethod
    def for_tokenizer(cls, tok: Encoder) -> PromptMaker:
        """A text prompt maker, or a token-id one when the vocabulary has too few plain words."""
        words = _one_token_words(tok)
        if len(words) < 50:
            return cls.token_ids()
        sample = random.Random(0).choices(words, k=4000)
        text = _join(sample)
        is_additive = len(tok.encode(text, add_special_tokens=False)) == len(sample)
        num_special = len(tok.encode(text)) - len(tok.encode(text, add_special_tokens=False))
        return cls(words, tok, max(0, num_special), is_additive)

    def make(self, num_tokens: int, rng: random.Random) -> tuple[str | list[int], int]:
        """A prompt for ``num_tokens`` tokens, and the count it really encodes to."""
        if self.encoder is None:
            return [rng.randrange(*_ID_RANGE) for _ in range(num_tokens)], num_tokens
        words = rng.choices(self.words, k=max(1, num_tokens - self.num_special))
        if self.is_additive:
            return _join(words), len(words) + self.num_special
        return _fit(self.encoder, self.words, words, num_tokens, rng)


def _fit(
    encoder: Encoder, pool: list[str], words: list[str], num_tokens: int, rng: random.Random
) -> tuple[str, int]:
    """Add or drop words until the prompt encodes to ``num_tokens`` (or the rounds run out)."""
    count = len(encoder.encode(_join(words)))
    for _ in range(_MAX_FIXES):
        if count == num_tokens:
            break
        if count < num_tokens:
            words += rng.choices(pool, k=num_tokens - count)
        else:
            del words[max(1, len(words) - (count - num_tokens)) :]
        count = len(encoder.encode(_join(words)))
    return _join(words), count


def _join(words: list[str]) -> str:
    return "".join(" " + w for w in words)


def _one_token_words(tok: Encoder) -> list[str]:
    """Lower-case ASCII words of the vocabulary that encode to one token after a space."""
    seen: set[str] = set()
    words: list[str] = []
    for i in range(min(tok.vocab_size, _SCAN_IDS)):
        w = tok.decode([i]).strip()
        if not (2 <= len(w) <= 10 and w.isascii() and w.isalpha() and w.islower()) or w in seen:
            continue
        seen.add(w)
        if len(tok.encode(" " + w, add_special_tokens=False)) == 1:
            words.append(w)
            if len(words) >= _MAX_POOL:
                break
    return words
