r"""Tool calls in each model family's own format: detection, parsing, and the grammar that forces a call.

`family_of` reads the format off a chat template, `parse_tool_calls` reads calls out of generated text, and
`tool_grammar` makes the grammar that a model must follow when it has to call a tool.

Formats (the template family decides; `family_of` reads it off the chat template):
- "hermes" (Hermes, Qwen 2.5 and 3): `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, repeated.
- "llama3" (Llama 3.1-3.3): `{"name": ..., "parameters": {...}}`, maybe after `<|python_tag|>`, several joined by `;`.
- "mistral": `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` (v0.3), or `[TOOL_CALLS]name[ARGS]{...}` (v11+).
- "json" (any other template): a JSON object `{"name": ..., "arguments"|"parameters": {...}}` or a list of them.

Parsing never raises: text that does not hold well-formed calls is returned as content with no calls.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

Family = Literal["hermes", "llama3", "mistral", "json"]


@dataclass(frozen=True)
class ToolCall:
    """One parsed call: the function's name and its arguments as JSON text (OpenAI's shape)."""

    name: str
    arguments: str


def family_of(chat_template: str | None) -> Family:
    """The tool-call format a chat template teaches its model."""
    t = chat_template or ""
    if "<tool_call>" in t:
        return "hermes"
    if "[TOOL_CALLS]" in t or "[AVAILABLE_TOOLS]" in t:
        return "mistral"
    if "<|python_tag|>" in t or ("<|start_header_id|>" in t and "parameters" in t):
        return "llama3"
    return "json"


def _call_of(obj: Any) -> ToolCall | None:
    """A call from a decoded JSON object with a name and arguments (or parameters), else None."""
    if not isinstance(obj, Mapping) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, Mapping):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _calls_of(value: Any) -> list[ToolCall] | None:
    """Calls from a decoded object or list of objects; None if any item is not a call."""
    items = value if isinstance(value, list) else [value]
    calls = [_call_of(v) for v in items]
    return None if not calls or any(c is None for c in calls) else calls  # type: ignore[return-value]


def _json_values(text: str) -> list[Any] | None:
    """Consecutive JSON values in `text` (separated by whitespace or `;`), or None if anything else is there."""
    decoder, out, i = json.JSONDecoder(), [], 0
    while True:
        while i < len(text) and (text[i].isspace() or text[i] == ";"):
            i += 1
        if i == len(text):
            return out
        try:
            value, i = decoder.raw_decode(text, i)
        except ValueError:
            return None
        out.append(value)


_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)
_MISTRAL_V11 = re.compile(r"([A-Za-z0-9_.-]+)\[ARGS\]")


def _before(text: str, start: int) -> str | None:
    """The content before the first call, as generated (None when it is only whitespace)."""
    return text[:start] if text[:start].strip() else None


def parse_tool_calls(text: str, family: Family) -> tuple[str | None, list[ToolCall]]:
    """Split generated text into its content and its tool calls.

    Returns:
        (content, calls): content is the text before the first call (None when empty); calls is empty when the text
        holds no well-formed call, and then content is the whole text.
    """
    fallback = (text or None, [])
    if family == "hermes":
        start = text.find("<tool_call>")
        if start < 0:
            return fallback
        calls: list[ToolCall] = []
        for body in _HERMES.findall(text[start:]):
            values = _json_values(body)
            found = _calls_of(values[0]) if values and len(values) == 1 else None
            if found is None:
                return fallback
            calls += found
        return _before(text, start), calls
    if family == "mistral":
        start = text.find("[TOOL_CALLS]")
        if start < 0:
            return fallback
        rest = text[start + len("[TOOL_CALLS]"):].strip()
        if _MISTRAL_V11.match(rest):
            calls = []
            for part in rest.split("[TOOL_CALLS]"):
                m = _MISTRAL_V11.match(part.strip())
                values = _json_values(part.strip()[m.end():]) if m else None
                found = _calls_of({"name": m.group(1), "arguments": values[0]}) if m and values and len(values) == 1 \
                    else None
                if found is None:
                    return fallback
                calls += found
            return _before(text, start), calls
        values = _json_values(rest)
        found = _calls_of(values[0]) if values and len(values) == 1 else None
        return (_before(text, start), found) if found else fallback
    body = text.strip()
    prefix = ""
    if family == "llama3" and "<|python_tag|>" in body:
        prefix, body = body.split("<|python_tag|>", 1)
    if not body.startswith(("{", "[")):
        return fallback
    values = _json_values(body)
    if not values:
        return fallback
    calls = []
    for value in values:
        found = _calls_of(value)
        if found is None:
            return fallback
        calls += found
    return (prefix.strip() or None), calls


def call_marker(family: Family) -> str | None:
    """The text that opens a call in this format (None: a call opens with JSON)."""
    return {"hermes": "<tool_call>", "mistral": "[TOOL_CALLS]"}.get(family)


def _call_schema(tool: Mapping[str, Any], args_key: str) -> dict[str, Any]:
    fn = tool.get("function", tool)
    params = fn.get("parameters") or {"type": "object", "properties": {}}
    return {"type": "object", "properties": {"name": {"const": fn["name"]}, args_key: params},
            "required": ["name", args_key], "additionalProperties": False}  # fmt: skip


def tool_grammar(family: Family, tools: Sequence[Mapping[str, Any]], parallel: bool = True,
                 special_ids: Mapping[str, int] | None = None) -> str:  # fmt: skip
    """A Lark grammar (llguidance's dialect, with `%json` schemas) whose every sentence is a call to one of `tools`.

    Args:
        family: The model's tool-call format.
        tools: OpenAI tool definitions (`{"type": "function", "function": {"name", "parameters"}}`); pass one to force
            that function.
        parallel: Allow several calls in one answer.
        special_ids: Ids of format markers that are special tokens in the model's vocabulary (e.g. `[TOOL_CALLS]`):
            these are matched as tokens, not as text.
    """
    special_ids = special_ids or {}
    args_key = "parameters" if family == "llama3" else "arguments"
    schemas = [_call_schema(t, args_key) for t in tools]
    one = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}

    def lit(marker: str) -> str:
        return f"<[{special_ids[marker]}]>" if marker in special_ids else json.dumps(marker)

    compact = {"x-guidance": {"whitespace_flexible": False}}  # JSON without optional whitespace
    one = {**one, **compact}
    call = f"%json {json.dumps(one)}"
    if family == "hermes":
        more = ' ("\\n" call)*' if parallel else ""
        item = f'{lit("<tool_call>")} "\\n" {call} "\\n" {lit("</tool_call>")}'
        return f"start: call{more}\ncall: {item}\n"
    if family == "mistral":
        array = {"type": "array", "items": one, "minItems": 1, **({} if parallel else {"maxItems": 1}), **compact}
        return f"start: {lit('[TOOL_CALLS]')} %json {json.dumps(array)}\n"
    if family == "llama3":
        more = ' (";" call)*' if parallel else ""
        return f"start: call{more}\ncall: {call}\n"
    if parallel:
        array = {"type": "array", "items": one, "minItems": 1, **compact}
        return f"start: %json {json.dumps(array)}\n"
    return f"start: {call}\n"


def template_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI messages in the shape chat templates (and transformers) expect: a call's `arguments` as a dict."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                fn = dict(c.get("function", {}))
                if isinstance(fn.get("arguments"), str):
                    try:
                        fn["arguments"] = json.loads(fn["arguments"])
                    except ValueError:
                        pass  # left as text: the template prints it as given
                calls.append({**c, "function": fn})
            m["tool_calls"] = calls
        out.append(m)
    return out
