"""Training examples and the dataset formats that produce them.

A format is a function from one record (a dict read from a JSON/JSONL/CSV/Parquet file) to an example:
`Conversation` (chat SFT), `Text` (continued pretraining) or `Preference` (DPO). Formats live in a registry,
`FORMATS`, filled with the `register_format` decorator, so a new one is a dozen lines. `detect_format` picks a
format from a record's keys for `--format auto`.

Parsers raise `RecordError` (a field and what is wrong with it); the loader adds the file and line and turns
those into one `DataError` that lists every problem found, so users fix their data in one pass.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from nomoat.util import errors as util_errors

__all__ = [
    "FORMATS", "ROLES", "Conversation", "DataError", "Example", "Feedback", "FormatSpec", "NoTrainableTokensError",
    "Preference", "Prompt", "RecordError", "Source", "Text", "detect_format", "parse_record", "register_format",
    "rename_columns",
]

ROLES = ("system", "user", "assistant")
TOOL_ROLES = (*ROLES, "tool")  # the `messages` format also takes tool results and assistant tool calls
# ShareGPT speaker names -> roles.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
# Column names people use for a format's fields: used to suggest `--columns field=column` in errors.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "instruction": ("prompt", "question", "query", "instruction", "input", "problem"),
    "input": ("context", "input"),
    "context": ("input", "context"),
    "output": ("response", "answer", "completion", "output", "target", "solution"),
    "response": ("output", "answer", "completion", "response", "target", "solution"),
    "text": ("content", "document", "body", "text"),
    "messages": ("conversations", "conversation", "messages", "chat", "dialog"),
    "conversations": ("messages", "conversation", "chat", "dialog"),
    "prompt": ("question", "instruction", "query", "input"),
    "chosen": ("accepted", "preferred", "better"),
    "rejected": ("dispreferred", "worse"),
}


class DataError(util_errors.DataError, ValueError):
    """A dataset problem; the message names the file, line (or row), field, what is wrong and what to do.

    Attributes:
        errors: Each problem found, one line each (the message lists them all).
    """

    def __init__(self, errors: str | Sequence[str], more: bool = False) -> None:
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        if len(self.errors) == 1 and not more:
            message = self.errors[0]
        else:
            head = f"{len(self.errors)} problems in the data"
            head += f" (stopped after the first {len(self.errors)}):" if more else ":"
            message = "\n".join([head, *(f"  {e}" for e in self.errors)])
        super().__init__(message)


class NoTrainableTokensError(DataError):
    """A batch has no token to compute a loss on (every label is masked)."""


class RecordError(ValueError):
    """A problem with one field of one record, raised by format parsers (the loader adds file and line)."""

    def __init__(self, field: str | None, problem: str, hint: str = "") -> None:
        self.field, self.problem, self.hint = field, problem, hint
        super().__init__(f'field "{field}" {problem}' if field else problem)


class Source(NamedTuple):
    """Where an example comes from: a file and a 1-based line (JSONL, CSV, JSON), 0-based row (Parquet) or record."""

    file: str
    index: int
    unit: str = "line"

    def __str__(self) -> str:
        return f"{self.file}:{self.index}" if self.unit == "line" else f"{self.file} {self.unit} {self.index}"


@dataclass
class Conversation:
    """A chat: `messages` are `{"role": "system"|"user"|"assistant"|"tool", "content": str}` dicts.

    An assistant message may also carry OpenAI `tool_calls` (its `content` may then be empty), a tool message its
    `tool_call_id` and `name`; `tools` are the function definitions the conversation was held with (rendered by the
    chat template as transformers passes `tools=`).
    """

    messages: list[dict[str, Any]]
    source: Source | None = None
    tools: list[dict[str, Any]] | None = None


@dataclass
class Text:
    """Raw text for continued pretraining (every token is trained)."""

    text: str
    source: Source | None = None


@dataclass
class Preference:
    """A preference pair: a prompt (messages) and two answers, each a list of assistant messages."""

    prompt: list[dict[str, str]]
    chosen: list[dict[str, str]]
    rejected: list[dict[str, str]]
    source: Source | None = None


@dataclass
class Feedback:
    """Unpaired feedback (KTO): a prompt (messages), one answer (assistant messages) and whether it is desirable."""

    prompt: list[dict[str, str]]
    completion: list[dict[str, str]]
    desirable: bool
    source: Source | None = None


@dataclass
class Prompt:
    """A prompt alone (RL): its messages and the record's other columns (passed on to reward functions)."""

    prompt: list[dict[str, str]]
    columns: dict[str, Any]
    source: Source | None = None


Example = Conversation | Text | Preference | Feedback | Prompt
Parser = Callable[[Mapping[str, Any]], Example]


@dataclass
class FormatSpec:
    """A registered format: its parser and the fields it reads (used by detection and error messages)."""

    name: str
    parse: Parser
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()
    description: str = ""
    kind: str = "sft"  # "sft", "text", "preference", "feedback" or "prompt"

    def __call__(self, record: Mapping[str, Any]) -> Example:
        """Parse a record (whose keys are already the format's field names)."""
        return self.parse(record)


FORMATS: dict[str, FormatSpec] = {}


def register_format(
    name: str, required: Sequence[str], optional: Sequence[str] = (), kind: str = "sft"
) -> Callable[[Parser], Parser]:
    """Register a parser under `name` (a decorator). Detection tries formats in registration order.

    Args:
        name: The `--format` name.
        required: Fields a record must have; `detect_format` picks the first format whose fields are all present.
        optional: Fields it also reads.
        kind: "sft" (gives `Conversation`), "text" (`Text`) or "preference" (`Preference`).
    """

    def wrap(fn: Parser) -> Parser:
        FORMATS[name] = FormatSpec(name, fn, tuple(required), tuple(optional), (fn.__doc__ or "").strip(), kind)
        return fn

    return wrap


# ------------------------------------------------------------------------------------------------ field helpers
def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", type(None): "null", bool: "a boolean"}.get(
        type(value), f"a {type(value).__name__}")


def _string(record: Mapping[str, Any], name: str, optional: bool = False) -> str:
    """A string field: missing, null, empty and non-string values are errors unless `optional` (then "")."""
    value = record.get(name)
    if value is None:
        if optional:
            return ""
        raise RecordError(name, "is missing" if name not in record else "is null")
    if not isinstance(value, str):
        raise RecordError(name, f"must be a string, got {_type_name(value)} ({json.dumps(value, default=str)[:40]})",
                          "Quote the value in the file.")
    if not value.strip() and not optional:
        raise RecordError(name, "is empty", "Fill it in or remove the record.")
    return value


def _as_list(record: Mapping[str, Any], name: str) -> list[Any]:
    """A list field; a string holding a JSON list (a CSV cell) is decoded."""
    value = record.get(name)
    if value is None:
        raise RecordError(name, "is missing" if name not in record else "is null")
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise RecordError(name, f"holds text that is not a valid JSON list ({e.msg} at char {e.pos})") from None
    if not isinstance(value, (list, tuple)):
        raise RecordError(name, f"must be a list of messages, got {_type_name(value)}")
    if not value:
        raise RecordError(name, "is an empty list", "Remove the record or add its messages.")
    return list(value)


def _content(value: Any, where: str) -> str:
    """Message content: a string, or OpenAI-style parts `[{"type": "text", "text": ...}]` (joined)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        texts = []
        for part in value:
            if isinstance(part, Mapping) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, Mapping) else _type_name(part)
                raise RecordError(where, f"has a content part of type {kind!r}; only text parts are supported")
        return "".join(texts)
    raise RecordError(where, "is missing" if value is None else f"must be a string, got {_type_name(value)}")


def _messages(items: Sequence[Any], name: str, role_key: str = "role", content_key: str = "content",
              role_map: Mapping[str, str] | None = None, tools: bool = False) -> list[dict[str, Any]]:
    """Normalise a list of message dicts to `{"role", "content"}` with roles in `ROLES` (`TOOL_ROLES` with `tools`).

    With `tools`, an assistant message keeps its `tool_calls` (and may have no text then), a tool message its
    `tool_call_id` and `name`.
    """
    out = []
    roles = TOOL_ROLES if tools else ROLES
    for i, item in enumerate(items):
        where = f"{name}[{i}]"
        if not isinstance(item, Mapping):
            raise RecordError(where, f"must be an object with {role_key!r} and {content_key!r}, got {_type_name(item)}")
        if role_key not in item:
            raise RecordError(f"{where}.{role_key}", f"is missing (found keys: {', '.join(map(str, item)) or 'none'})")
        raw_role = item[role_key]
        role = (role_map or {r: r for r in roles}).get(raw_role) if isinstance(raw_role, str) else None
        if role is None:
            allowed = ", ".join(role_map or roles)
            raise RecordError(f"{where}.{role_key}", f"has unknown role {raw_role!r} (allowed: {allowed})")
        calls = item.get("tool_calls") if tools and role == "assistant" else None
        if calls is not None:
            _check_tool_calls(calls, f"{where}.tool_calls")
        raw = item.get(content_key)
        content = "" if calls and raw is None else _content(raw, f"{where}.{content_key}")
        if not content.strip() and not calls:
            raise RecordError(f"{where}.{content_key}", "is empty", "Every message needs some text.")
        message: dict[str, Any] = {"role": role, "content": content}
        if calls:
            message["tool_calls"] = [dict(c) for c in calls]
        if tools and role == "tool":
            message.update({k: item[k] for k in ("tool_call_id", "name") if isinstance(item.get(k), str)})
        out.append(message)
    return out


def _check_tool_calls(calls: Any, where: str) -> None:
    """OpenAI's shape: `[{"type": "function", "function": {"name": str, "arguments": str | object}}]`."""
    if not isinstance(calls, list) or not calls:
        raise RecordError(where, f"must be a non-empty list of calls, got {_type_name(calls)}")
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise RecordError(f"{where}[{j}]", "must be {\"type\": \"function\", \"function\": {\"name\": ..., "
                              "\"arguments\": ...}}")  # fmt: skip


def _need_assistant(messages: list[dict[str, str]], name: str) -> list[dict[str, str]]:
    if not any(m["role"] == "assistant" for m in messages):
        raise RecordError(name, "has no assistant turn, so there is nothing to train on",
                          "Add the assistant's answer, or use --format text for raw text.")
    return messages


def _turns(user: str, answer: str, system: str = "") -> list[dict[str, str]]:
    head = [{"role": "system", "content": system}] if system.strip() else []
    return [*head, {"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def _join(first: str, second: str) -> str:
    return f"{first}\n\n{second}" if second.strip() else first


# ---------------------------------------------------------------------------------------------------- formats
# Detection order: the most specific key sets first.
@register_format("preference", required=("chosen", "rejected"), optional=("prompt", "system"), kind="preference")
def parse_preference(record: Mapping[str, Any]) -> Preference:
    """prompt/chosen/rejected; each a string or a list of messages (a prompt may be left in both answers)."""
    chosen, rejected = _answer(record, "chosen"), _answer(record, "rejected")
    prompt: list[dict[str, str]] = []
    if record.get("prompt") is not None:
        raw = record["prompt"]
        if isinstance(raw, str) and not raw.lstrip().startswith("["):
            prompt = [{"role": "user", "content": _string(record, "prompt")}]
        else:
            prompt = _messages(_as_list(record, "prompt"), "prompt")
    else:  # Anthropic HH style: whole conversations in chosen/rejected; the shared start is the prompt.
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    system = _string(record, "system", optional=True)
    if system.strip() and not any(m["role"] == "system" for m in prompt):
        prompt = [{"role": "system", "content": system}, *prompt]
    if not prompt:
        raise RecordError("prompt", "is missing", "Add a prompt field, or give chosen/rejected as full conversations.")
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        if not answer or not any(m["content"].strip() for m in answer):
            raise RecordError(name, "is empty", "Each answer of a pair needs some text.")
        if answer[0]["role"] != "assistant":
            raise RecordError(name, f"must start with an assistant message, got role {answer[0]['role']!r}")
    return Preference(prompt, chosen, rejected)


def _answer(record: Mapping[str, Any], name: str) -> list[dict[str, str]]:
    raw = record.get(name)
    if isinstance(raw, str) and not raw.lstrip().startswith("["):
        return [{"role": "assistant", "content": _string(record, name)}]
    return _messages(_as_list(record, name), name)


@register_format("messages", required=("messages",), optional=("tools",))
def parse_messages(record: Mapping[str, Any]) -> Conversation:
    """OpenAI chat: messages: [{role, content}] (text or text parts, tool calls, tool results), optional tools."""
    messages = _need_assistant(_messages(_as_list(record, "messages"), "messages", tools=True), "messages")
    tools = record.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, Mapping) for t in tools)):
        raise RecordError("tools", f"must be a list of tool definitions, got {_type_name(tools)}")
    return Conversation(messages, tools=[dict(t) for t in tools] if tools else None)


@register_format("sharegpt", required=("conversations",), optional=("system",))
def parse_sharegpt(record: Mapping[str, Any]) -> Conversation:
    """ShareGPT: conversations: [{from: human|gpt|system|user|assistant, value}], optional system."""
    messages = _messages(_as_list(record, "conversations"), "conversations", "from", "value", SHAREGPT_ROLES)
    system = _string(record, "system", optional=True)
    if system.strip() and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system}, *messages]
    return Conversation(_need_assistant(messages, "conversations"))


@register_format("alpaca", required=("instruction", "output"), optional=("input", "system"))
def parse_alpaca(record: Mapping[str, Any]) -> Conversation:
    """Alpaca: instruction, optional input (appended after a blank line), output, optional system."""
    user = _join(_string(record, "instruction"), _string(record, "input", optional=True))
    return Conversation(_turns(user, _string(record, "output"), _string(record, "system", optional=True)))


@register_format("dolly", required=("instruction", "response"), optional=("context", "system"))
def parse_dolly(record: Mapping[str, Any]) -> Conversation:
    """Dolly: instruction, optional context (appended after a blank line), response."""
    user = _join(_string(record, "instruction"), _string(record, "context", optional=True))
    return Conversation(_turns(user, _string(record, "response"), _string(record, "system", optional=True)))


@register_format("text", required=("text",), kind="text")
def parse_text(record: Mapping[str, Any]) -> Text:
    """Raw text (continued pretraining): a text field, trained on every token."""
    return Text(_string(record, "text"))


def _prompt_messages(record: Mapping[str, Any], name: str) -> list[dict[str, str]]:
    raw = record.get(name)
    if isinstance(raw, str) and not raw.lstrip().startswith("["):
        return [{"role": "user", "content": _string(record, name)}]
    return _messages(_as_list(record, name), name)


_TRUE, _FALSE = ("true", "1", "yes", "desirable"), ("false", "0", "no", "undesirable")


@register_format("kto", required=("prompt", "completion", "label"), kind="feedback")
def parse_feedback(record: Mapping[str, Any]) -> Feedback:
    """Unpaired feedback (KTO): prompt, completion (strings or message lists), label true/false."""
    label = record.get("label")
    if isinstance(label, str) and label.strip().lower() in (*_TRUE, *_FALSE):
        label = label.strip().lower() in _TRUE
    if isinstance(label, int) and label in (0, 1):
        label = bool(label)
    if not isinstance(label, bool):
        raise RecordError("label", f"must be true or false, got {json.dumps(label, default=str)[:40]}")
    completion = _answer(record, "completion")
    if not any(m["content"].strip() for m in completion) or completion[0]["role"] != "assistant":
        raise RecordError("completion", "must be a non-empty answer (assistant messages)")
    return Feedback(_prompt_messages(record, "prompt"), completion, label)


@register_format("prompt", required=("prompt",), optional=("messages", "system"), kind="prompt")
def parse_prompt(record: Mapping[str, Any]) -> Prompt:
    """Prompts alone (RL): prompt (a string or messages) or messages; other columns go to the reward functions."""
    name = "prompt" if record.get("prompt") is not None or "messages" not in record else "messages"
    prompt = _prompt_messages(record, name)
    system = _string(record, "system", optional=True)
    if system.strip() and not any(m["role"] == "system" for m in prompt):
        prompt = [{"role": "system", "content": system}, *prompt]
    return Prompt(prompt, {k: v for k, v in record.items() if k not in (name, "system")})


# ------------------------------------------------------------------------------------------ detection & columns
def rename_columns(record: Mapping[str, Any], columns: Mapping[str, str] | None) -> dict[str, Any]:
    """Rename a record's keys from the file's column names to the format's field names.

    Args:
        record: The record as read.
        columns: `{format field: file column}`, e.g. `{"output": "answer"}`.
    """
    if not columns:
        return dict(record)
    inverse = {column: name for name, column in columns.items()}
    return {inverse.get(k, k): v for k, v in record.items() if not (k in columns and k not in inverse)}


def detect_format(record: Mapping[str, Any], columns: Mapping[str, str] | None = None) -> str:
    """Pick the format of a record from its keys (the first registered format whose required fields are all there).

    Args:
        record: A record as read from the file.
        columns: The column mapping, applied before matching.

    Raises:
        DataError: No format fits; the message lists the formats, their fields, and the keys seen.
    """
    keys = set(rename_columns(record, columns))
    for spec in FORMATS.values():
        if spec.kind != "prompt" and set(spec.required) <= keys:  # prompts alone are named (RL picks them itself)
            return spec.name
    listing = "; ".join(f"{s.name} ({', '.join(s.required)})" for s in FORMATS.values())
    raise DataError(
        f"could not detect the data format from the keys {', '.join(sorted(map(str, keys))) or '(none)'}. "
        f"Known formats and their required fields: {listing}. Pass --format NAME, and --columns FIELD=COLUMN to map "
        "your column names to the format's fields (e.g. --columns output=answer)."
    )


def _suggest(spec: FormatSpec, keys: Sequence[str], missing: str) -> str:
    """A hint for a missing field: other formats that fit the keys, and columns that might be meant."""
    options = [f"--format {s.name}" for s in FORMATS.values() if s.name != spec.name and set(s.required) <= set(keys)]
    wanted = set(spec.required) | set(spec.optional)
    unused = [k for k in keys if k not in wanted]
    guesses = [k for k in SYNONYMS.get(missing, ()) if k in unused]
    if not guesses and len(unused) == 1:
        guesses = unused
    options += [f"--columns {missing}={g}" for g in guesses[:1]]
    return f" Use {' or '.join(options)}." if options else ""


def parse_record(
    spec: FormatSpec | None, record: Any, source: Source, columns: Mapping[str, str] | None = None
) -> Example:
    """Parse one record with a format, turning its problems into a located one-line message.

    Args:
        spec: The format.
        record: The record as read (anything: non-objects are reported).
        source: Where it comes from.
        columns: The column mapping.

    Raises:
        RecordError: With the full located message as its `problem` (and the field in `field`).
    """
    if not isinstance(record, Mapping):
        raise RecordError(None, f"{source}: expected an object with fields, got {_type_name(record)}")
    if spec is None:
        raise RecordError(None, f"{source}: no format given")
    renamed = rename_columns(record, columns)
    try:
        example = spec.parse(renamed)
    except RecordError as e:
        base = (e.field or "").split("[")[0].split(".")[0]
        column = (columns or {}).get(base)
        label = f'field "{e.field}"' + (f' (column "{column}")' if column else "")
        message = f"{source}: {label} {e.problem}"
        if e.problem in ("is missing", "is null") and e.field in spec.required:
            keys = list(map(str, renamed))
            message += (f" ({spec.name} records need {' and '.join(spec.required)}; "
                        f"found keys: {', '.join(map(str, record)) or 'none'}).")
            message += _suggest(spec, keys, e.field)
        elif e.hint:
            message += f". {e.hint}"
        raise RecordError(e.field, message) from None
    example.source = source
    return example

