"""Stop strings over streamed text: hold back what may start a stop string, cut at a match.

Per request, the router feeds each detokenized delta to one ``StopChecker``:

1. ``feed(delta)`` joins the held-back tail and the delta, and looks for the earliest stop
   string in it. On a match it returns the text before the match and ``stopped=True``; the stop
   string itself is never emitted.
2. Otherwise it emits all but the longest tail that is a prefix of some stop string, and holds
   that tail until later text settles it: "Hel" is held while "Hello" is a stop string.
3. When generation ends for another reason (eos, length), ``flush()`` returns the held tail.

NOTE: nothing emitted ever ends with a proper prefix of a stop string, so a match always starts
inside the held tail or the new delta; each feed costs O(len(delta) + longest stop string).
"""

from __future__ import annotations

from collections.abc import Sequence

MAX_STOP_STRINGS = 4


def _held_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


class StopChecker:
    """Cuts a text stream at the first of up to four stop strings."""

    def __init__(
        self,
        stop_strings: Sequence[str] = (),
        include_stop_string: bool = False,
        max_stop_strings: int = MAX_STOP_STRINGS,
    ) -> None:
        if isinstance(stop_strings, str):
            stop_strings = [stop_strings]
        if len(stop_strings) > max_stop_strings:
            raise ValueError(
                f"at most {max_stop_strings} stop strings are allowed, got {len(stop_strings)}"
            )
        for stop in stop_strings:
            if not isinstance(stop, str) or not stop:
                raise ValueError(f"stop strings must be non-empty strings, got {stop!r}")
        self.stop_strings = tuple(stop_strings)
        self.include_stop_string = include_stop_string  # emit the matched stop string too
        self.matched: str | None = None  # the stop string that ended the stream, once stopped
        self._held = ""

    @property
    def stopped(self) -> bool:
        return self.matched is not None

    def feed(self, delta: str) -> tuple[str, bool]:
        """Return ``(text_to_emit, stopped)`` for the next delta; after a stop, emit nothing."""
        if self.stopped:
            return "", True
        text = self._held + delta
        match_at, match = len(text) + 1, None
        for stop in self.stop_strings:
            at = text.find(stop, 0, match_at + len(stop) - 1)
            if at != -1 and at < match_at:
                match_at, match = at, stop
        if match is not None:
            self.matched, self._held = match, ""
            end = match_at + len(match) if self.include_stop_string else match_at
            return text[:end], True
        hold = _held_length(text, self.stop_strings)
        self._held = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold], False

    def flush(self) -> str:
        """The held-back tail, once the stream has ended without a stop string."""
        held, self._held = self._held, ""
        return "" if self.stopped else held
