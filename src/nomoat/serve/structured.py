"""Structured output and tool calling for the OpenAI routes.

A request's constraint and logit bias become the engine's per-row logits hook; the tool plan says which tools, whether
a call is forced, and in which format; tool calls are read back out of the generated text, whole or streamed as
OpenAI's `tool_calls` deltas.

A forced call (`tool_choice` "required" or a named function) is enforced with a grammar in the model's own tool-call
format, so the answer always parses; with "auto" the model chooses and the parser falls back to plain content.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nomoat.generate.constraints import Constraint, ConstraintError, Grammars, HookChain, LogitBias
from nomoat.serve.errors import APIError
from nomoat.serve.protocol import (
    ChatCompletionRequest,
    ChatDelta,
    CompletionRequest,
    FunctionCall,
    FunctionCallDelta,
    ToolCallDelta,
    ToolCallOut,
)
from nomoat.tokenizer import Tokenizer
from nomoat.tokenizer.tool_calls import Family, call_marker, family_of, parse_tool_calls, tool_grammar

Body = ChatCompletionRequest | CompletionRequest


@dataclass
class ToolPlan:
    """How a chat request uses tools.

    Attributes:
        family: The model's tool-call format.
        tools: The tool definitions the template renders (OpenAI's dicts).
        forced: The tools one of which must be called (empty: the model chooses).
        parallel: Several calls allowed in one answer.
    """

    family: Family
    tools: list[dict[str, Any]]
    forced: list[dict[str, Any]]
    parallel: bool


def tool_plan(body: Body, tok: Tokenizer) -> ToolPlan | None:
    """The request's tool plan; None without tools or with `tool_choice: "none"`.

    Raises:
        APIError: 400 for a named tool that is not in `tools`, or a tool choice without tools.
    """
    if not isinstance(body, ChatCompletionRequest):
        return None
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none"):
            raise APIError(400, "'tool_choice' needs 'tools'.", "tool_choice", "invalid_value")
        return None
    if choice == "none":
        return None
    tools = [t.model_dump(exclude_none=True) for t in body.tools]
    if choice is None or choice == "auto":
        forced = []
    elif choice == "required":
        forced = tools
    else:
        forced = [t for t in tools if t["function"]["name"] == choice.function.name]
        if not forced:
            raise APIError(400, f"'tool_choice' names {choice.function.name!r}, which is not in 'tools'.",
                           "tool_choice", "invalid_value")  # fmt: skip
    parallel = body.parallel_tool_calls is not False and not (choice is not None and not isinstance(choice, str))
    return ToolPlan(family_of(tok.get_chat_template(tools=tools) if tok.chat_template else None), tools, forced,
                    parallel)  # fmt: skip


def _constraint(body: Body, plan: ToolPlan | None, tok: Tokenizer) -> Constraint | None:
    """The grammar a request's output must follow, if any."""
    if plan is not None and plan.forced:
        marks = [m for m in ("<tool_call>", "</tool_call>", "[TOOL_CALLS]") if tok.token_to_id(m) is not None
                 and tok.token_to_id(m) in tok.all_special_ids]  # fmt: skip
        grammar = tool_grammar(plan.family, plan.forced, plan.parallel, {m: tok.token_to_id(m) for m in marks})
        return Constraint("grammar", grammar)
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return Constraint("json")
    if fmt.type == "json_schema":
        if fmt.json_schema is None:
            raise APIError(400, "'response_format' of type json_schema needs 'json_schema'.", "response_format",
                           "invalid_value")  # fmt: skip
        return Constraint("json_schema", fmt.json_schema.schema_, strict=bool(fmt.json_schema.strict))
    value = fmt.regex if fmt.type == "regex" else fmt.grammar
    if not value:
        raise APIError(400, f"'response_format' of type {fmt.type} needs '{fmt.type}'.", "response_format",
                       "invalid_value")  # fmt: skip
    return Constraint(fmt.type, value)


def hook_factory(body: Body, tok: Tokenizer, vocab_size: int, plan: ToolPlan | None) -> Callable[[], Any] | None:
    """A function making one logits hook per generated choice (each choice needs its own grammar state).

    The grammar is compiled here, so a bad schema, regex or grammar is a 400 before anything is queued.

    Raises:
        APIError: 400 naming `response_format`, `tool_choice` or `logit_bias`.
    """
    constraint = _constraint(body, plan, tok)
    grammars = None
    if constraint is not None:
        grammars = Grammars.of(tok, vocab_size)
        try:
            grammars.row(constraint)
        except ConstraintError as e:
            param = "tool_choice" if plan is not None and plan.forced else "response_format"
            raise APIError(400, f"Invalid {param}: {e}", param, "invalid_value") from None
    bias = None
    if body.logit_bias:
        try:
            values = {int(k): float(v) for k, v in body.logit_bias.items()}
        except ValueError:
            raise APIError(400, "'logit_bias' keys must be token ids.", "logit_bias", "invalid_value") from None
        if any(not 0 <= k < vocab_size for k in values) or any(not -100 <= v <= 100 for v in values.values()):
            raise APIError(400, f"'logit_bias' needs token ids in [0, {vocab_size}) and biases in [-100, 100].",
                           "logit_bias", "invalid_value")  # fmt: skip
        bias = LogitBias(values, vocab_size)
    if grammars is None and bias is None:
        return None

    def make() -> Any:
        row = grammars.row(constraint) if grammars is not None and constraint is not None else None
        return HookChain([bias, row])  # the bias first: the mask then removes what the grammar forbids

    return make


# ---- reading calls back -----------------------------------------------------------------------------------------


def raw_text(plan: ToolPlan | None) -> bool:
    """Whether calls are read from the text with special tokens kept (formats whose markers are special tokens)."""
    return plan is not None and plan.family in ("mistral", "llama3")


def _call_out(name: str, arguments: str) -> ToolCallOut:
    return ToolCallOut(id=f"call_{uuid.uuid4().hex[:24]}", function=FunctionCall(name=name, arguments=arguments))


def tool_message(text: str, plan: ToolPlan | None) -> tuple[str | None, list[ToolCallOut] | None]:
    """A finished answer's content and tool calls (None when it makes none)."""
    if plan is None:
        return text, None
    content, calls = parse_tool_calls(text, plan.family)
    if not calls:
        return text, None
    return content, [_call_out(c.name, c.arguments) for c in calls]


class ToolStream:
    """Turns a streamed answer's text into content deltas and, once it ends, `tool_calls` deltas.

    Content is streamed as it comes until a call may have started (the format's marker, or, for JSON formats, an
    answer opening with `{` or `[`); from there the text is held and parsed at the end, as the whole answer is.
    """

    def __init__(self, plan: ToolPlan, tok: Tokenizer) -> None:
        self.plan = plan
        self.detok = tok.stream_decoder(skip_special_tokens=False) if raw_text(plan) else None
        self.marker = call_marker(plan.family)
        self.text = ""  # everything generated
        self.sent = 0  # characters of `text` already sent as content
        self.holding = False
        self.calls: list[ToolCallOut] = []

    def _hold_from(self) -> int | None:
        """Where a call may start in the text (None: all of it is content so far)."""
        if self.marker is None:
            head = self.text.lstrip()
            if not head:
                return 0
            return 0 if head[0] in "{[" or head.startswith("<|python_tag|>"[: len(head)]) else None
        at = self.text.find(self.marker)
        if at >= 0:
            return at
        for k in range(min(len(self.marker), len(self.text)), 0, -1):  # a marker's prefix at the end may grow
            if self.marker.startswith(self.text[-k:]):
                return len(self.text) - k
        return None

    def push(self, text: str, token_ids: list[int]) -> list[ChatDelta]:
        """New generated text (and its tokens) -> the deltas to send now."""
        self.text += text if self.detok is None else "".join(self.detok.add(t) for t in token_ids)
        if self.holding:
            return []
        start = self._hold_from()
        end = len(self.text) if start is None else start
        if self.marker is None and start is not None and self.text.strip():
            self.holding = True
        elif self.marker is not None and start is not None and self.text.find(self.marker) >= 0:
            self.holding = True
        out = [ChatDelta(content=self.text[self.sent:end])] if end > self.sent else []
        self.sent = max(self.sent, end)
        return out

    def finish(self) -> list[ChatDelta]:
        """The deltas that end the answer: held content, then one delta per tool call."""
        if self.detok is not None:
            self.text += self.detok.flush()
        content, calls = tool_message(self.text, self.plan)
        if calls is None:
            rest = self.text[self.sent:]
            return [ChatDelta(content=rest)] if rest else []
        self.calls = calls
        out = []
        before = (content or "")[self.sent:]
        if before:
            out.append(ChatDelta(content=before))
        for i, call in enumerate(calls):
            fn = FunctionCallDelta(name=call.function.name, arguments=call.function.arguments)
            out.append(ChatDelta(tool_calls=[ToolCallDelta(index=i, id=call.id, type="function", function=fn)]))
        return out
