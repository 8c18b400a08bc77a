"""Stop strings over a streamed text: held-back prefixes, cuts at the earliest match."""

from __future__ import annotations

import random

import pytest

from tideserve.engine.stop import StopChecker


def _stream(checker: StopChecker, deltas: list[str]) -> tuple[list[str], bool]:
    emitted, stopped = [], False
    for delta in deltas:
        text, stopped = checker.feed(delta)
        emitted.append(text)
        if stopped:
            return emitted, True
    return [*emitted, checker.flush()], stopped


def test_prefix_of_a_stop_string_is_held_until_settled():
    checker = StopChecker(["Hello"])
    assert checker.feed("say Hel") == ("say ", False)
    assert checker.feed("p me") == ("Help me", False)
    assert checker.feed(" Hell") == (" ", False)
    assert checker.feed("o world") == ("", True)
    assert checker.matched == "Hello" and checker.stopped
    assert checker.feed("more") == ("", True)
    assert checker.flush() == ""


def test_stop_string_split_over_many_deltas():
    emitted, stopped = _stream(StopChecker(["</answer>"]), list("42</answer> trailing"))
    assert stopped and "".join(emitted) == "42"


def test_earliest_match_wins_and_include_stop_string():
    checker = StopChecker(["world", "lo w"])
    assert checker.feed("hello world") == ("hel", True)
    assert checker.matched == "lo w"
    checker = StopChecker(["world", "lo w"], include_stop_string=True)
    assert checker.feed("hello world") == ("hello w", True)


def test_held_text_is_flushed_when_the_stream_ends():
    checker = StopChecker(["STOP"])
    assert checker.feed("almost ST") == ("almost ", False)
    assert checker.flush() == "ST"
    assert StopChecker([]).feed("anything") == ("anything", False)


def test_overlapping_prefixes_hold_the_longest_candidate():
    checker = StopChecker(["abab", "bx"])
    assert checker.feed("xxaba") == ("xx", False)
    assert checker.feed("b!") == ("", True)


@pytest.mark.parametrize(
    "stops, error",
    [
        (["a", "b", "c", "d", "e"], "at most 4 stop strings"),
        ([""], "non-empty strings"),
        ([None], "non-empty strings"),
    ],
)
def test_bad_stop_strings_raise_value_error(stops, error):
    with pytest.raises(ValueError, match=error):
        StopChecker(stops)


def test_any_chunking_matches_cutting_the_whole_text():
    rng = random.Random(0)
    alphabet = "ab<>/ é🎉"
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))
        stops = [
            "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 5)))
            for _ in range(rng.randrange(0, 5))
        ]
        found = [(text.find(s), s) for s in stops if s in text]
        expected = text[: min(found)[0]] if found else text
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randrange(1, 8))))
        deltas = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        emitted, stopped = _stream(StopChecker(stops), deltas)
        assert "".join(emitted) == expected and stopped == bool(found)
        for i in range(len(emitted)):
            prefix = "".join(emitted[: i + 1])
            assert not any(s in prefix for s in stops)
