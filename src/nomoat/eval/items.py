"""Task items (`TaskItem`, `load_task_items`): reading and validating them, `score_answer`, and their prompts.

A generation item is `{"prompt": ..., "answer": ..., "match": "exact"|"contains"|"regex"}`, with optional `system`
(a system prompt), `messages` (earlier turns: a multi-turn conversation that `prompt`, when given, continues as
the last user turn), `extract` (a regular expression: its first group, or the whole match, is taken from the
prediction before matching, as lm-evaluation-harness's regex filter) and `ignore_case`. A multiple-choice item is
`{"prompt": ..., "choices": [...], "answer": index or the text of a choice}`.

A line holding only defaults (`{"match": "contains"}`, with any of `match`, `system`, `extract`, `ignore_case` and
no `prompt`) sets them for the items after it in its file: a per-file match mode.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nomoat.data import DEFAULT_CHAT_TEMPLATE, DataError, Source
from nomoat.data.formats import ROLES, RecordError
from nomoat.data.loading import _expand, read_records
from nomoat.tokenizer import ChatTemplateError, Tokenizer

__all__ = ["DEFAULT_KEYS", "MATCH_MODES", "TaskItem", "load_task_items", "parse_item", "prompt_text", "score_answer"]

MATCH_MODES = ("exact", "contains", "regex")
DEFAULT_KEYS = ("match", "system", "extract", "ignore_case")  # the keys of a per-file defaults line


@dataclass
class TaskItem:
    """One evaluation item (see the module docstring for the record format).

    Attributes:
        prompt: The question (the last user turn), or None when `messages` already ends with a user turn.
        answer: The expected answer (generation), or the index of the right choice (multiple choice).
        match: How a generation is compared with the answer: "exact", "contains" or "regex".
        system: A system prompt for this item (None: the evaluation's default).
        messages: Earlier turns of a multi-turn conversation.
        choices: The options of a multiple-choice item (None for a generation item).
        extract: A regular expression applied to the prediction before matching.
        ignore_case: Compare case-insensitively.
        source: Where the item comes from.
    """

    prompt: str | None
    answer: str | int
    match: str = "exact"
    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)
    choices: list[str] | None = None
    extract: str | None = None
    ignore_case: bool = False
    source: Source | None = None

    @property
    def kind(self) -> str:
        """`"choice"` for a multiple-choice item, else `"generate"`."""
        return "choice" if self.choices is not None else "generate"

    @property
    def answer_text(self) -> str:
        """The expected answer as text (the right choice's text for a multiple-choice item)."""
        return self.choices[int(self.answer)] if self.choices is not None else str(self.answer)


def score_answer(
    prediction: str, answer: str, match: str = "exact", extract: str | None = None, ignore_case: bool = False
) -> bool:
    """Whether a prediction counts as the answer.

    Args:
        prediction: The generated text.
        answer: The expected answer; for `match="regex"` a regular expression.
        match: "exact": equal after stripping surrounding whitespace on both; "contains": the stripped answer
            occurs in the prediction; "regex": `re.search(answer, stripped prediction)` finds a match (anchor
            it with `^...$` for a full match).
        extract: A regular expression searched in the prediction first; its first group that matched (or the
            whole match when it has no group) replaces the prediction. No match: wrong.
        ignore_case: Compare case-insensitively (casefolded; for regexes, `re.IGNORECASE`).

    Returns:
        True when the prediction is right.

    Raises:
        ValueError: An unknown match mode or an invalid regular expression.
    """
    if match not in MATCH_MODES:
        raise ValueError(f"match must be one of {', '.join(MATCH_MODES)}, got {match!r}")
    flags = re.IGNORECASE if ignore_case else 0
    text = prediction
    if extract is not None:
        found = re.search(extract, prediction, flags)
        if found is None:
            return False
        text = next((g for g in found.groups() if g is not None), found.group(0))
    text = text.strip()
    if match == "regex":
        return re.search(answer, text, flags) is not None
    expected = answer.strip()
    if ignore_case:
        text, expected = text.casefold(), expected.casefold()
    return text == expected if match == "exact" else expected in text


# ----------------------------------------------------------------------------------------------------- parsing
def _check_regex(pattern: Any, name: str) -> str:
    if not isinstance(pattern, str):
        raise RecordError(name, f"must be a string (a regular expression), got {type(pattern).__name__}")
    try:
        re.compile(pattern)
    except re.error as e:
        raise RecordError(name, f"is not a valid regular expression ({e}): {pattern!r}",
                          "Escape special characters such as ( ) [ ] . * + ? with a backslash") from None  # fmt: skip
    return pattern


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise RecordError("messages", f"must be a list of {{role, content}} objects, got {type(value).__name__}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, Mapping) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise RecordError(f"messages[{i}]", f"must be {{\"role\": one of {', '.join(ROLES)}, \"content\": "
                              f"text}}, got {str(m)[:80]}")  # fmt: skip
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _choice_answer(answer: Any, choices: list[str]) -> int:
    if isinstance(answer, bool) or answer is None:
        raise RecordError("answer", "must be the index of the right choice (0-based) or its text")
    if isinstance(answer, int):
        if not 0 <= answer < len(choices):
            raise RecordError("answer", f"is {answer}, but there are {len(choices)} choices (indices 0 to "
                              f"{len(choices) - 1})")  # fmt: skip
        return answer
    if isinstance(answer, str):
        stripped = [c.strip() for c in choices]
        if answer.strip() in stripped:
            return stripped.index(answer.strip())
        raise RecordError("answer", f"{answer!r} is not one of the choices {choices}",
                          "Give the index of the right choice (0-based) or its exact text")  # fmt: skip
    raise RecordError("answer", f"must be an index or a choice's text, got {type(answer).__name__}")


def parse_item(record: Any, source: Source | None = None, defaults: Mapping[str, Any] | None = None) -> TaskItem:
    """Validate one record as a `TaskItem`.

    Args:
        record: The record (a dict).
        source: Where it comes from (prefixed to error messages).
        defaults: Values for `match`, `system`, `extract`, `ignore_case` where the record has none.

    Raises:
        DataError: What is wrong, where, and what to do.
    """
    where = f"{source}: " if source else ""
    try:
        return _parse(record, {**(defaults or {})})
    except RecordError as e:
        label = f'field "{e.field}" ' if e.field else ""
        raise DataError(f"{where}{label}{e.problem}" + (f". {e.hint}" if e.hint else "")) from None


def _parse(record: Any, defaults: dict[str, Any]) -> TaskItem:
    if not isinstance(record, Mapping):
        raise RecordError(None, f"expected an object such as {{\"prompt\": ..., \"answer\": ...}}, got "
                          f"{type(record).__name__}")  # fmt: skip
    get = {**defaults, **{k: v for k, v in record.items() if v is not None}}.get
    prompt, messages = get("prompt"), _messages(get("messages", []))
    if prompt is not None and not isinstance(prompt, str):
        raise RecordError("prompt", f"must be text, got {type(prompt).__name__}")
    if prompt is None and (not messages or messages[-1]["role"] != "user"):
        keys = ", ".join(map(str, record)) or "none"
        raise RecordError("prompt", f"is missing (found keys: {keys})", "Each item needs \"prompt\" (the question), "
                          "or \"messages\" ending with a user turn, and \"answer\"")  # fmt: skip
    if "answer" not in record:
        raise RecordError("answer", "is missing", "Add the expected answer (for choices: its index or text)")
    system = get("system")
    if system is not None and not isinstance(system, str):
        raise RecordError("system", f"must be text, got {type(system).__name__}")
    ignore_case = get("ignore_case", False)
    if not isinstance(ignore_case, bool):
        raise RecordError("ignore_case", f"must be true or false, got {ignore_case!r}")
    extract = get("extract")
    if extract is not None:
        _check_regex(extract, "extract")
    item = TaskItem(prompt, "", system=system, messages=messages, extract=extract, ignore_case=ignore_case)
    choices = get("choices")
    if choices is not None:
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise RecordError("choices", "must be a list of at least two non-empty strings")
        item.choices, item.answer = list(choices), _choice_answer(record["answer"], choices)
        return item
    match = get("match", "exact")
    if match not in MATCH_MODES:
        raise RecordError("match", f"is {match!r}; use one of {', '.join(MATCH_MODES)}")
    answer = record["answer"]
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise RecordError("answer", f"must be text (or a number), got {type(answer).__name__}")
    item.match, item.answer = match, str(answer)
    if match == "regex":
        _check_regex(item.answer, "answer")
    return item


def _is_defaults(record: Any) -> bool:
    return isinstance(record, Mapping) and bool(record) and set(record) <= set(DEFAULT_KEYS)


def load_task_items(
    path_or_paths: str | Path | Sequence[str | Path],
    match: str | None = None,
    limit: int | None = None,
    max_errors: int = 10,
) -> list[TaskItem]:
    """Read task items from JSONL (or JSON, CSV, Parquet) files.

    Args:
        path_or_paths: A file, a folder, or a list of them.
        match: The default match mode (a file's defaults line and each item's `match` override it).
        limit: Keep at most this many items.
        max_errors: Stop after this many bad records and report them together.

    Raises:
        DataError: Missing/unsupported files, no items, or bad records (each as `file:line: what, what to do`).
    """
    if match is not None and match not in MATCH_MODES:
        raise DataError(f"match must be one of {', '.join(MATCH_MODES)}, got {match!r}")
    items: list[TaskItem] = []
    errors: list[str] = []
    for path in _expand(path_or_paths):
        defaults: dict[str, Any] = {"match": match} if match else {}
        for entry in read_records(path):
            if limit is not None and len(items) >= limit:
                break
            if isinstance(entry, RecordError):
                errors.append(entry.problem)
            elif _is_defaults(entry[1]):
                try:
                    parse_item({"prompt": "", "answer": "", **entry[1]}, entry[0])  # validates the values
                    defaults.update(entry[1])
                except DataError as e:
                    errors += e.errors
            else:
                try:
                    item = parse_item(entry[1], entry[0], defaults)
                except DataError as e:
                    errors += e.errors
                else:
                    item.source = entry[0]
                    items.append(item)
            if len(errors) >= max_errors:
                raise DataError(errors, more=True)
    if errors:
        raise DataError(errors)
    if not items:
        raise DataError(f'{path_or_paths}: no task items found; each line needs {{"prompt": ..., "answer": ...}}')
    return items


# ----------------------------------------------------------------------------------------------------- prompts
def item_messages(item: TaskItem, system: str | None = None) -> list[dict[str, str]]:
    """The conversation to prompt with: system (the item's, else `system`), earlier turns, then the prompt."""
    sys = item.system if item.system is not None else system
    messages = []
    if sys and not (item.messages and item.messages[0]["role"] == "system"):
        messages.append({"role": "system", "content": sys})
    messages += item.messages
    if item.prompt is not None:
        messages.append({"role": "user", "content": item.prompt})
    return messages


def use_chat(tokenizer: Tokenizer, chat: bool | None) -> bool:
    """Whether prompts go through a chat template: `chat`, or by default whether the tokenizer has one."""
    return tokenizer.chat_template is not None if chat is None else chat


def prompt_text(item: TaskItem, tokenizer: Tokenizer, system: str | None = None, chat: bool | None = None) -> str:
    """The text the model continues: the chat template with a generation prompt, or the plain prompt.

    In chat mode (default when the tokenizer has a chat template) the conversation of `item_messages` is rendered
    with `add_generation_prompt=True`; a tokenizer without a template renders multi-turn items with ChatML (what
    training uses for it). Otherwise the text is the system prompt, a blank line and the prompt.

    Raises:
        DataError: The chat template rejects the conversation.
    """
    messages = item_messages(item, system)
    if not use_chat(tokenizer, chat) and not item.messages:
        sys = item.system if item.system is not None else system
        return (f"{sys}\n\n" if sys else "") + (item.prompt or "")
    template = tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, chat_template=template)
    except (ChatTemplateError, ValueError, TypeError) as e:
        raise DataError(f"{item.source or 'item'}: the chat template rejected this item: {e}") from None
    assert isinstance(text, str)
    return text


def prompt_ids(item: TaskItem, tokenizer: Tokenizer, system: str | None = None, chat: bool | None = None) -> list[int]:
    """`prompt_text` encoded: a rendered template as is (it holds its own bos), a plain prompt with special tokens."""
    rendered = use_chat(tokenizer, chat) or bool(item.messages)
    return tokenizer.encode(prompt_text(item, tokenizer, system, chat), add_special_tokens=not rendered)
