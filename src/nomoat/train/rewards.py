"""Reward functions for RL tuning (GRPO, RLOO): the built-ins, loading user functions, and scoring a batch.

A reward function has TRL's signature: `reward(completions, prompts, **columns) -> list[float]`, one float (or None:
no opinion) per completion; `columns` holds the data record's other fields, one list per column, aligned with the
completions. `--reward` names a built-in (`exact_match`, `digit_match`, `numeric_match`, `json_valid`,
`regex=PATTERN`, `length=N`) or a user function as `module:function` or `path/to/file.py:function`. `score` runs
every function on a batch and checks what comes back, naming the function that failed.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from nomoat.util.errors import NomoatError, UsageError

RewardFn = Callable[..., Sequence[float | None]]
NUMBER = re.compile(r"-?\d+(?:[.,]\d+)?")


class RewardError(NomoatError, ValueError):
    """A reward function raised, or returned something other than one number per completion."""


def _column(columns: dict[str, Any], name: str, fn: str) -> list[Any]:
    if name not in columns:
        raise RewardError(f"reward {fn} needs a column {name!r} in the data; columns: {', '.join(columns) or 'none'}")
    return columns[name]


def exact_match(completions: list[str], prompts: list[Any], **columns: Any) -> list[float]:
    """1 where the completion, stripped, equals the `answer` column's value, else 0."""
    answers = _column(columns, "answer", "exact_match")
    return [float(c.strip() == str(a).strip()) for c, a in zip(completions, answers)]


def digit_match(completions: list[str], prompts: list[Any], **columns: Any) -> list[float]:
    """Partial credit: the share of the `answer` column's characters that the completion has at the same place.

    Both are stripped and aligned on their last character (so digits of a number line up by place value); the count
    of equal places is divided by the longer length. 1 exactly where `exact_match` gives 1; "42" for "32" gives 0.5.
    """
    answers = _column(columns, "answer", "digit_match")
    out = []
    for c, a in zip(completions, answers):
        c, a = c.strip(), str(a).strip()
        longest = max(len(c), len(a))
        out.append(sum(x == y for x, y in zip(reversed(c), reversed(a))) / longest if longest else 1.0)
    return out


def numeric_match(completions: list[str], prompts: list[Any], **columns: Any) -> list[float]:
    """1 where the completion's last number equals the `answer` column's number (to 1e-6), else 0."""
    answers = _column(columns, "answer", "numeric_match")
    out = []
    for c, a in zip(completions, answers):
        found = NUMBER.findall(c)
        try:
            out.append(float(bool(found) and math.isclose(float(found[-1].replace(",", ".")), float(a), abs_tol=1e-6)))
        except (TypeError, ValueError):
            out.append(0.0)
    return out


def json_valid(completions: list[str], prompts: list[Any], **columns: Any) -> list[float]:
    """1 where the completion parses as JSON, else 0."""
    out = []
    for c in completions:
        try:
            json.loads(c)
            out.append(1.0)
        except ValueError:
            out.append(0.0)
    return out


def _regex(pattern: str) -> RewardFn:
    try:
        compiled = re.compile(pattern, re.DOTALL)
    except re.error as e:
        raise UsageError(f"--reward regex={pattern}: not a valid regular expression ({e})") from None

    def regex(completions: list[str], prompts: list[Any], **columns: Any) -> list[float]:
        """1 where the whole completion matches the pattern, else 0."""
        return [float(compiled.fullmatch(c.strip()) is not None) for c in completions]

    return regex


def _length(target: str) -> RewardFn:
    try:
        n = int(target)
    except ValueError:
        raise UsageError(f"--reward length={target}: expected a number of characters") from None

    def length(completions: list[str], prompts: list[Any], **columns: Any) -> list[float]:
        """1 at `n` characters, falling linearly to 0 at 0 and at 2n."""
        return [max(0.0, 1 - abs(len(c) - n) / max(n, 1)) for c in completions]

    return length


BUILTINS: dict[str, RewardFn] = {"exact_match": exact_match, "digit_match": digit_match,
                                 "numeric_match": numeric_match, "json_valid": json_valid}  # fmt: skip
WITH_ARGUMENT: dict[str, Callable[[str], RewardFn]] = {"regex": _regex, "length": _length}


def load_reward(spec: str) -> tuple[str, RewardFn]:
    """The reward function named by `spec` and its display name.

    Raises:
        UsageError: Unknown built-in, missing module or file, or no such function in it.
    """
    name, eq, arg = spec.partition("=")
    if eq and name in WITH_ARGUMENT:
        return spec, WITH_ARGUMENT[name](arg)
    if spec in BUILTINS:
        return spec, BUILTINS[spec]
    module_name, colon, fn_name = spec.rpartition(":")
    if not colon or not module_name or not fn_name:
        raise UsageError(f"--reward {spec!r}: not a built-in reward and not MODULE:FUNCTION",
                         hint=f"built-ins: {', '.join([*BUILTINS, 'regex=PATTERN', 'length=N'])}")  # fmt: skip
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).expanduser()
            if not path.is_file():
                raise UsageError(f"--reward {spec}: file {path} not found")
            unit = importlib.util.spec_from_file_location(f"nomoat_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(unit)  # type: ignore[arg-type]
            sys.modules[unit.name] = module  # type: ignore[union-attr]
            unit.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            module = importlib.import_module(module_name)
    except ImportError as e:
        hint = "put the module on PYTHONPATH, or give a file as path/to/file.py:function"
        raise UsageError(f"--reward {spec}: cannot import {module_name} ({e})", hint=hint) from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise UsageError(f"--reward {spec}: {module_name} has no function {fn_name}")
    return spec, fn


def score(rewards: Sequence[tuple[str, RewardFn]], completions: list[str], prompts: list[Any],
          columns: dict[str, list[Any]]) -> list[list[float]]:  # fmt: skip
    """Every reward function's scores of a batch: one list per function, NaN where a function returned None.

    Raises:
        RewardError: A function raised, or did not return one number (or None) per completion.
    """
    out = []
    for name, fn in rewards:
        try:
            values = fn(completions=completions, prompts=prompts, **columns)
        except RewardError:
            raise
        except Exception as e:  # a user's function may raise anything: report it with its name
            raise RewardError(f"reward {name} raised {type(e).__name__}: {e}") from e
        if not isinstance(values, Sequence) or isinstance(values, (str, bytes)) or len(values) != len(completions):
            got = f"{len(values)} values" if isinstance(values, Sequence) else type(values).__name__
            raise RewardError(f"reward {name} returned {got} for {len(completions)} completions",
                              hint="return one float (or None) per completion")  # fmt: skip
        try:
            out.append([math.nan if v is None else float(v) for v in values])
        except (TypeError, ValueError):
            raise RewardError(f"reward {name} returned a value that is not a number: {list(values)[:3]}") from None
    return out


__all__ = ["BUILTINS", "RewardError", "RewardFn", "digit_match", "exact_match", "json_valid", "load_reward",
           "numeric_match", "score"]  # fmt: skip
