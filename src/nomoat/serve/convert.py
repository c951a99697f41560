"""OpenAI requests to engine inputs (`prompt_ids`, `sampling_params`), and engine outputs to OpenAI responses."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from nomoat.generate.engine import Completion, TokenLogprob
from nomoat.generate.sampling import SamplingParams
from nomoat.serve.errors import APIError
from nomoat.serve.protocol import (
    MAX_STOP,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatLogprobs,
    ChatMessage,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    TextCompletion,
    TokenLogprobOut,
    TopLogprob,
    Usage,
)
from nomoat.serve.structured import ToolPlan, raw_text, tool_message
from nomoat.tokenizer import ChatTemplateError, Tokenizer
from nomoat.tokenizer.tool_calls import template_messages


@dataclass
class Limits:
    """Per-request bounds of the server.

    Attributes:
        max_prompt_tokens: Longest prompt, in tokens.
        max_completion_tokens: Largest `max_tokens` (also the default when a request leaves it out).
        context: Tokens per engine row (prompt plus completion).
        vocab_size: Token ids of a prompt must be below this.
    """

    max_prompt_tokens: int
    max_completion_tokens: int
    context: int
    vocab_size: int


# ---- requests -------------------------------------------------------------------------------------------------------


def chat_message(m: ChatMessage) -> dict[str, Any]:
    """A request message as chat templates read it (OpenAI's `developer` is a `system` message to templates)."""
    content = m.content if m.content is None or isinstance(m.content, str) else "\n".join(p.text for p in m.content)
    out: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": content}
    if m.name is not None:
        out["name"] = m.name
    if m.tool_calls:
        out["tool_calls"] = [c.model_dump() for c in m.tool_calls]
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    return out


def prompt_ids(body: ChatCompletionRequest | CompletionRequest, tok: Tokenizer, limits: Limits) -> list[int]:
    """The prompt's token ids: a chat rendered with the model's template, or a completion prompt.

    Raises:
        APIError: 400 for a model without a chat template, a template error, several prompts, bad token ids, an
            empty prompt, or a prompt over the limit.
    """
    if isinstance(body, ChatCompletionRequest):
        param = "messages"
        if tok.chat_template is None:
            raise APIError(400, "This model has no chat template; use /v1/completions with a plain prompt.", param,
                           "no_chat_template")  # fmt: skip
        messages = template_messages([chat_message(m) for m in body.messages])
        tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
        try:
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tools=tools)
        except (ChatTemplateError, ValueError, TypeError) as e:
            raise APIError(400, f"The chat template refused these messages: {e}", param, "invalid_messages") from None
        ids = tok.encode(text, add_special_tokens=False)
    else:
        param = "prompt"
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise APIError(400, f"'prompt' holds {len(prompt)} prompts; this server takes one per request.",
                               param, "unsupported_value")  # fmt: skip
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = tok.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
            bad = [t for t in ids if not 0 <= t < limits.vocab_size]
            if bad:
                raise APIError(400, f"'prompt' has token id {bad[0]}, outside the vocabulary [0, {limits.vocab_size}).",
                               param, "invalid_value")  # fmt: skip
    if not ids:
        raise APIError(400, f"'{param}' is empty.", param, "invalid_value")
    if len(ids) > limits.max_prompt_tokens:
        raise APIError(400, f"The prompt has {len(ids)} tokens; this server accepts at most {limits.max_prompt_tokens} "
                       "prompt tokens.", param, "prompt_too_long")  # fmt: skip
    return ids


def sampling_params(body: ChatCompletionRequest | CompletionRequest, n_prompt: int, limits: Limits) -> SamplingParams:
    """The engine's sampling parameters for a request.

    Raises:
        APIError: 400 naming the parameter at fault.
    """
    chat = isinstance(body, ChatCompletionRequest)
    requested, param = body.max_tokens, "max_tokens"
    if chat and body.max_completion_tokens is not None:
        if requested is not None and requested != body.max_completion_tokens:
            raise APIError(400, "'max_tokens' and 'max_completion_tokens' disagree; send one of them.", "max_tokens",
                           "invalid_value")  # fmt: skip
        requested, param = body.max_completion_tokens, "max_completion_tokens"
    room = limits.context - n_prompt
    if requested == 0:
        if chat or not body.echo:
            raise APIError(400, f"'{param}' must be at least 1 (0 is allowed with 'echo' only).", param,
                           "invalid_value")  # fmt: skip
        requested = 1  # scoring only: nothing is generated (the server does not queue it)
    if requested is not None:
        if requested > limits.max_completion_tokens:
            raise APIError(400, f"'{param}' is {requested}; this server allows at most {limits.max_completion_tokens}.",
                           param, "invalid_value")  # fmt: skip
        if requested > room:
            raise APIError(400, f"This model's context is {limits.context} tokens: the prompt has {n_prompt} tokens "
                           f"and '{param}' asks for {requested} more.", param, "context_length_exceeded")  # fmt: skip
    elif room < 1:
        raise APIError(400, f"The prompt fills this model's context ({limits.context} tokens).", "messages" if chat
                       else "prompt", "context_length_exceeded")  # fmt: skip
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > MAX_STOP:
        raise APIError(400, f"'stop' has {len(stop)} sequences; at most {MAX_STOP} are allowed.", "stop",
                       "invalid_value")  # fmt: skip
    if any(not s for s in stop):
        raise APIError(400, "'stop' sequences must not be empty.", "stop", "invalid_value")
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "'stream_options' is only allowed with 'stream': true.", "stream_options", "invalid_value")
    if chat:
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true.", "top_logprobs", "invalid_value")
        want_logprobs, top = bool(body.logprobs), body.top_logprobs or 0
    else:
        want_logprobs, top = body.logprobs is not None, body.logprobs or 0
    fields = dict(
        temperature=body.temperature, top_p=body.top_p, min_p=body.min_p, repetition_penalty=body.repetition_penalty,
        frequency_penalty=body.frequency_penalty, presence_penalty=body.presence_penalty, seed=body.seed,
    )  # fmt: skip
    kwargs = {k: v for k, v in fields.items() if v is not None}
    max_new = requested or min(limits.max_completion_tokens, room)
    top_k = max(body.top_k or 0, 0)
    top_k = 0 if top_k >= limits.vocab_size else top_k  # keeping every token is no filter
    try:
        return SamplingParams(
            **kwargs, top_k=top_k, max_new_tokens=max_new, stop=stop, logprobs=want_logprobs,
            top_logprobs=top,
        )  # fmt: skip
    except ValueError as e:
        name = str(e).split(" ", 1)[0]
        raise APIError(400, f"Invalid value: {e}.", name if name in SamplingParams.__dataclass_fields__ else None,
                       "invalid_value") from None  # fmt: skip


# ---- responses ------------------------------------------------------------------------------------------------------


class TokenText:
    """Token id -> text (and UTF-8 bytes) for logprobs, cached."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        self.cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        """The token's text on its own (a partial UTF-8 character decodes as U+FFFD)."""
        text = self.cache.get(token_id)
        if text is None:
            text = self.cache[token_id] = self.tok.decode([token_id])
        return text


def chat_logprobs(lps: Sequence[TokenLogprob], text: TokenText) -> ChatLogprobs:
    """Chat-format logprobs of some tokens."""
    content = []
    for lp in lps:
        token = text(lp.token_id)
        top = [TopLogprob(token=text(i), logprob=v, bytes=list(text(i).encode())) for i, v in lp.top]
        content.append(TokenLogprobOut(token=token, logprob=lp.logprob, bytes=list(token.encode()), top_logprobs=top))
    return ChatLogprobs(content=content)


def completion_logprobs(lps: Sequence[TokenLogprob | None], text: TokenText, top: int,
                        offset: int = 0) -> CompletionLogprobs:  # fmt: skip
    """Legacy-format logprobs of some tokens; `offset` is the text offset of the first one."""
    out = CompletionLogprobs(top_logprobs=[] if top else None)
    for lp in lps:
        if lp is None:  # the first prompt token: nothing comes before it
            out.tokens.append("")
            out.token_logprobs.append(None)
            out.text_offset.append(offset)
            if out.top_logprobs is not None:
                out.top_logprobs.append(None)
            continue
        token = text(lp.token_id)
        out.tokens.append(token)
        out.token_logprobs.append(lp.logprob)
        out.text_offset.append(offset)
        offset += len(token)
        if out.top_logprobs is not None:
            out.top_logprobs.append({text(i): v for i, v in lp.top})
    return out


def usage(done: Completion) -> Usage:
    """Token counts of a finished request."""
    return Usage(prompt_tokens=done.prompt_tokens, completion_tokens=done.completion_tokens,
                 total_tokens=done.prompt_tokens + done.completion_tokens)  # fmt: skip


def usage_of(dones: Sequence[Completion]) -> Usage:
    """Token counts of the choices of one request (the prompt counted once)."""
    completion = sum(d.completion_tokens for d in dones)
    return Usage(prompt_tokens=dones[0].prompt_tokens, completion_tokens=completion,
                 total_tokens=dones[0].prompt_tokens + completion)  # fmt: skip


def chat_response(rid: str, model: str, done: Completion | Sequence[Completion], text: TokenText | None,
                  plan: ToolPlan | None = None, tok: Tokenizer | None = None) -> ChatCompletion:  # fmt: skip
    """The whole chat completion, one choice per `Completion` (`text` given when logprobs were asked for).

    With a tool plan, each answer is parsed for tool calls (finish reason "tool_calls" when it makes some).
    """
    dones = [done] if isinstance(done, Completion) else list(done)
    choices = []
    for i, d in enumerate(dones):
        answer = tok.decode(d.token_ids) if tok is not None and raw_text(plan) else d.text
        content, calls = tool_message(answer, plan)
        if calls is None:
            content = d.text
        reason = "tool_calls" if calls and d.finish_reason == "stop" else d.finish_reason
        choices.append(ChatChoice(index=i, message=AssistantMessage(content=content, tool_calls=calls),
                                  finish_reason=reason,
                                  logprobs=chat_logprobs(d.logprobs, text) if text else None))  # fmt: skip
    return ChatCompletion(id=rid, created=int(time.time()), model=model, choices=choices, usage=usage_of(dones))


def text_response(rid: str, model: str, done: Completion | Sequence[Completion], text: TokenText | None, top: int,
                  echo: tuple[str, Sequence[TokenLogprob | None]] | None = None) -> TextCompletion:  # fmt: skip
    """The whole text completion, one choice per `Completion` in `done`.

    `text` is given when logprobs were asked for (`top` alternatives each). `echo` is the prompt's text and its
    tokens' logprobs (None for the first) when `echo` was asked for: the prompt comes before each choice's text and
    logprobs.
    """
    dones = [done] if isinstance(done, Completion) else list(done)
    choices = []
    for i, d in enumerate(dones):
        lps = completion_logprobs(d.logprobs, text, top, len(echo[0]) if echo else 0) if text else None
        if echo and lps is not None:
            lps = _join_logprobs(completion_logprobs(echo[1], text, top), lps)
        choices.append(CompletionChoice(index=i, text=(echo[0] if echo else "") + d.text, logprobs=lps,
                                        finish_reason=d.finish_reason))  # fmt: skip
    return TextCompletion(id=rid, created=int(time.time()), model=model, choices=choices, usage=usage_of(dones))


def _join_logprobs(a: CompletionLogprobs, b: CompletionLogprobs) -> CompletionLogprobs:
    top = None if a.top_logprobs is None else [*a.top_logprobs, *(b.top_logprobs or [])]
    return CompletionLogprobs(tokens=a.tokens + b.tokens, token_logprobs=a.token_logprobs + b.token_logprobs,
                              top_logprobs=top, text_offset=a.text_offset + b.text_offset)  # fmt: skip


def scored_only(prompt_tokens: int) -> Completion:
    """The empty completion of a request that only scores its prompt (`max_tokens` 0 with `echo`)."""
    return Completion(request_id="", text="", token_ids=[], finish_reason="length", prompt_tokens=prompt_tokens,
                      completion_tokens=0, time_to_first_token_s=None, decode_tokens_per_s=None)  # fmt: skip


def choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """The sampling parameters of choice `index` of a request: a seeded request's choices get seeds seed+index."""
    if index == 0 or params.seed is None:
        return params
    return dataclasses.replace(params, seed=params.seed + index)


def chat_chunk(rid: str, model: str, created: int, **choice: object) -> ChatCompletionChunk:
    """One streamed chat chunk (`choice` fields: delta, logprobs, finish_reason)."""
    choice.setdefault("delta", ChatDelta())
    return ChatCompletionChunk(id=rid, created=created, model=model, choices=[ChatChunkChoice(**choice)])


def text_chunk(rid: str, model: str, created: int, **choice: object) -> TextCompletion:
    """One streamed text-completion chunk (`choice` fields: text, logprobs, finish_reason)."""
    choice.setdefault("text", "")
    return TextCompletion(id=rid, created=created, model=model, choices=[CompletionChoice(**choice)])
