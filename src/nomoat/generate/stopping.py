"""`StopStringMatcher`: stop strings over a stream of text deltas (OpenAI / vLLM semantics).

The output ends right before the first stop string, which is never emitted; only a tail that could still grow into
a stop string is held back, and stop strings may straddle any number of deltas. "First" is decided as a
character-by-character stream would, independent of how text is split into deltas: this equals cutting at the
earliest stop string in the final text, except when one stop string lies strictly inside another ("bc" in "abcd"):
the inner one completes first and wins. Stop token ids are the engine's business, not this module's.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopStringMatcher:
    """Finds stop strings in streamed text and decides what is safe to emit.

    One matcher per request; feed it every detokenized delta in order.

    Args:
        stop: The stop strings (may be empty: everything passes straight through).

    Raises:
        ValueError: If a stop string is empty.
    """

    def __init__(self, stop: Sequence[str]) -> None:
        if any(not s for s in stop):
            raise ValueError(f"stop strings must be non-empty, got {list(stop)!r}")
        self.stop: list[str] = list(dict.fromkeys(stop))  # drop duplicates, keep order
        self._held = ""  # a tail that is a proper prefix of some stop string: never longer than the longest - 1
        self._matched: str | None = None

    @property
    def stopped(self) -> bool:
        """Whether a stop string was found (later pushes emit nothing)."""
        return self._matched is not None

    @property
    def matched(self) -> str | None:
        """The stop string that ended the output (vLLM's `stop_reason`), or None."""
        return self._matched

    def push(self, delta: str) -> tuple[str, bool]:
        """Add the next piece of generated text.

        Args:
            delta: The new text.

        Returns:
            `(text, stopped)`: the text that is now safe to emit (possibly empty), and whether a stop string was
            hit (then `text` ends right before it and generation should end).
        """
        if self._matched is not None:
            return "", True
        text = self._held + delta
        hit = self._first_stop(text)
        if hit is not None:
            start, self._matched = hit
            self._held = ""
            return text[:start], True
        keep = self._partial_len(text)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """Release the held-back text when generation ended without a stop string (empty after a stop).

        Returns:
            The text that was held back because it could have begun a stop string.
        """
        text, self._held = self._held, ""
        return "" if self._matched is not None else text

    def _first_stop(self, text: str) -> tuple[int, str] | None:
        """The (start, stop string) that completes first in `text`, ties to the earliest start, or None."""
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for s in self.stop:
            # The first occurrence of a given string is also the first of it to end.
            start = text.find(s)
            if start >= 0:
                cand = (start + len(s), start, s)
                best = cand if best is None or cand[:2] < best[:2] else best
        return None if best is None else (best[1], best[2])

    def _partial_len(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string (0 if none)."""
        longest = 0
        for s in self.stop:
            # Only lengths above the best so far can improve it; stop strings are short, so this stays cheap.
            for n in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:n]):
                    longest = n
                    break
        return longest
