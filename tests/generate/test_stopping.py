"""Stop strings over streamed deltas, exhaustively over the ways a text can be split into deltas."""

from __future__ import annotations

import itertools

import pytest

from nomoat.generate.stopping import StopStringMatcher

# (text, stop strings): overlapping, prefix/suffix-related, repeated, absent, at the start/end, partial near-misses.
CASES = [
    ("hello world</s>tail", ["</s>"]),
    ("ab<|im_end|>c", ["<|im_end|>"]),
    ("xx<|im_<|im_end|>", ["<|im_end|>"]),
    ("aaab", ["aab"]),
    ("abababc", ["ababc"]),
    ("say STOP now", ["STOP", "OP now", "ST"]),
    ("one two three", ["three", "two"]),
    ("ab cde", ["cd", "de", "bc"]),
    ("prefix-match", ["pre", "prefix"]),
    ("the end", ["end", "the end"]),
    ("no stop here", ["stop!", "zzz"]),
    ("almost stopped", ["stopper"]),
    ("STOPxyz", ["STOP"]),
    ("xyzSTOP", ["STOP"]),
    ("a b c", []),
    ("café ☕ done", ["☕"]),
]


def _reference(text: str, stop: list[str]) -> tuple[str, bool]:
    """The OpenAI answer on the whole text: cut before the earliest occurrence of any stop string."""
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[: min(found)], True) if found else (text, False)


def _safe_len(text: str, stop: list[str]) -> int:
    """How much of a partial text (holding no stop string) is certainly output: everything before the first
    position from which the rest could still grow into a stop string (brute force over start positions)."""
    could_grow = [p for p in range(len(text)) if any(s.startswith(text[p:]) for s in stop)]
    return min(could_grow, default=len(text))


def _splits(text: str, parts: int) -> list[list[str]]:
    """Every split of `text` into `parts` deltas (empty deltas included)."""
    n = len(text)
    return [
        [text[a:b] for a, b in zip((0, *cuts), (*cuts, n))]
        for cuts in itertools.combinations_with_replacement(range(n + 1), parts - 1)
    ]


def _stream(deltas: list[str], stop: list[str]) -> tuple[str, bool]:
    """Feed deltas, checking after each push that exactly the safe part has been emitted."""
    matcher = StopStringMatcher(stop)
    emitted, seen, stopped = "", "", False
    for i, delta in enumerate(deltas):
        out, stopped = matcher.push(delta)
        emitted += out
        seen += delta
        ref, ref_stopped = _reference(seen, stop)
        assert stopped == ref_stopped
        if stopped:
            assert emitted == ref, "wrong cut"
            break
        # Nothing that could still turn into a stop string is out; everything that cannot is.
        assert emitted == seen[: _safe_len(seen, stop)], f"after {deltas[: i + 1]}"
    if not stopped:
        emitted += matcher.flush()
    return emitted, stopped


@pytest.mark.parametrize(("text", "stop"), CASES)
@pytest.mark.parametrize("parts", [1, 2, 3])
def test_every_split_gives_the_reference(text: str, stop: list[str], parts: int) -> None:
    want = _reference(text, stop)
    for deltas in _splits(text, parts):
        assert _stream(deltas, stop) == want, f"deltas {deltas}"


def test_character_by_character() -> None:
    for text, stop in CASES:
        assert _stream(list(text), stop) == _reference(text, stop)


def test_stop_equal_to_a_whole_delta() -> None:
    m = StopStringMatcher(["<eos>"])
    assert m.push("Hi") == ("Hi", False)
    assert m.push("<eos>") == ("", True)
    assert m.matched == "<eos>" and m.stopped
    assert m.push("more") == ("", True) and m.flush() == ""


def test_stop_spanning_three_deltas_is_held_then_dropped() -> None:
    m = StopStringMatcher(["<|end|>"])
    assert m.push("ok <|") == ("ok ", False)
    assert m.push("en") == ("", False)
    assert m.push("d|> after") == ("", True)


def test_held_text_is_released_once_it_cannot_be_a_stop() -> None:
    m = StopStringMatcher(["<|end|>"])
    assert m.push("a <|en") == ("a ", False)
    assert m.push("try") == ("<|entry", False)
    assert m.push("<") == ("", False)
    assert m.flush() == "<"  # generation ended without the stop string: the held text is output after all
    assert m.flush() == ""


def test_empty_stop_list_passes_everything_through() -> None:
    m = StopStringMatcher([])
    assert m.push("<") == ("<", False)
    assert m.push("") == ("", False)
    assert m.flush() == ""


def test_earliest_of_several_and_which_one_matched() -> None:
    m = StopStringMatcher(["world", "lo w", "xyz"])
    assert m.push("hello wor") == ("hel", True) and m.matched == "lo w"
    m = StopStringMatcher(["the end", "end"])  # both complete together: the earlier start wins
    assert m.push("see the end") == ("see ", True) and m.matched == "the end"


def test_a_stop_inside_another_stops_when_it_completes() -> None:
    # "bc" completes before "abcd" can: a stream stops there, whatever the deltas (a documented difference from
    # cutting the final text at the earliest start, which would need to generate past a complete stop string).
    for deltas in (["abcd"], ["ab", "cd"], ["a", "b", "c", "d"], ["xabcdy"]):
        m = StopStringMatcher(["abcd", "bc"])
        emitted, stopped = "", False
        for d in deltas:
            out, stopped = m.push(d)
            emitted += out
            if stopped:
                break
        assert stopped and m.matched == "bc"
        assert emitted == ("x" if deltas[0].startswith("x") else "") + "a"


def test_empty_stop_string_is_rejected() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        StopStringMatcher(["ok", ""])
