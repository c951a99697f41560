"""The built-in rewards of RL tuning, each against values worked out by hand."""

from __future__ import annotations

import pytest

from nomoat.train.rewards import BUILTINS, digit_match, exact_match, load_reward, numeric_match


def test_exact_match_compares_stripped_text():
    assert exact_match([" 32\n", "32.", "3 2"], [None] * 3, answer=["32", "32", "32"]) == [1.0, 0.0, 0.0]


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        ("32", "32", 1.0),
        (" 32 ", "32", 1.0),
        ("42", "32", 0.5),  # the units right, the tens wrong
        ("31", "32", 0.5),
        ("2", "32", 0.5),  # the units in place, the tens missing: 1 of 2 places
        ("132", "32", 2 / 3),  # an extra digit costs its place
        ("7", "7", 1.0),
        ("70", "7", 0.0),  # aligned by place value: 7 units against 0 units
        ("", "7", 0.0),
        ("", "", 1.0),
        ("abc", "12", 0.0),
    ],
)
def test_digit_match_gives_partial_credit_by_place(completion, answer, expected):
    assert digit_match([completion], [None], answer=[answer]) == [pytest.approx(expected)]


def test_digit_match_is_one_exactly_where_exact_match_is():
    completions = ["12", "21", "120", " 12", "1", "x12"]
    answers = ["12"] * len(completions)
    full = [d == 1.0 for d in digit_match(completions, [None] * 6, answer=answers)]
    assert full == [e == 1.0 for e in exact_match(completions, [None] * 6, answer=answers)]


def test_numeric_match_reads_the_last_number():
    got = numeric_match(["It is 12.", "12 or 13", "twelve", "1,5"], [None] * 4, answer=["12", "12", "12", "1.5"])
    assert got == [1.0, 0.0, 0.0, 1.0]


def test_the_builtins_are_loadable_by_name():
    for name in BUILTINS:
        assert load_reward(name) == (name, BUILTINS[name])
