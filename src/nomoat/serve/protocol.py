"""The OpenAI wire format, as pydantic models: requests, responses, streamed chunks, errors.

Requests forbid unknown fields (`extra="forbid"`): a parameter nomoat does not implement is refused with a 400 that
names it, never silently ignored. Only the parameters listed here exist; ranges follow OpenAI's where it states them
and `SamplingParams` where it does not (top_k, min_p, repetition_penalty are vLLM's extensions).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_STOP = 4  # OpenAI's limit on stop sequences


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Request):
    """One part of a message's content; only text parts are supported."""

    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    """A message of the conversation (no tool calls, no names: those are refused)."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]


class StreamOptions(_Request):
    """Options of a streamed response."""

    include_usage: bool = False


class SamplingFields(_Request):
    """Fields shared by chat and text completions."""

    model: str = Field(description="The base model's name, an adapter's name, or a stack `base+a:1.0+b:0.5`.")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate.")
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, description="Keep the k most likely tokens; 0 or -1 disables it.")
    min_p: float | None = Field(None, ge=0, le=1)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0)
    stop: str | list[str] | None = Field(None, description=f"Up to {MAX_STOP} stop strings.")
    seed: int | None = None
    n: int | None = Field(None, ge=1, le=1, description="Only 1 is supported.")
    user: str | None = Field(None, description="An end-user identifier (logged in nothing; accepted for clients).")
    stream: bool | None = False
    stream_options: StreamOptions | None = None


class ChatCompletionRequest(SamplingFields):
    """`POST /v1/chat/completions`."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(SamplingFields):
    """`POST /v1/completions`: one prompt (text or token ids)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20, description="Return the top-N logprobs of each token.")


class AdapterLoadRequest(_Request):
    """`POST /v1/adapters`: load an adapter from a folder on the server, or from the adapter registry by name."""

    name: str = Field(description="The adapter's model name (letters, digits, `._-`).")
    path: str | None = Field(None, description="A PEFT adapter folder on the server; default: the registry entry.")


# ---- responses ------------------------------------------------------------------------------------------------------


class Usage(BaseModel):
    """Token counts of a request."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    """An alternative token at one position."""

    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobOut(TopLogprob):
    """A chosen token with its alternatives."""

    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    """Logprobs of a chat choice."""

    content: list[TokenLogprobOut] | None = None
    refusal: list[TokenLogprobOut] | None = None


class CompletionLogprobs(BaseModel):
    """Logprobs of a text completion choice (the legacy format)."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] | None = None
    text_offset: list[int] = Field(default_factory=list)


class AssistantMessage(BaseModel):
    """The generated message."""

    role: Literal["assistant"] = "assistant"
    content: str
    refusal: str | None = None


class ChatChoice(BaseModel):
    """The (only) choice of a chat completion."""

    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str


class ChatCompletion(BaseModel):
    """A chat completion."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ChatDelta(BaseModel):
    """New content of a streamed chat choice."""

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    """A streamed chat choice."""

    index: int = 0
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionChoice(BaseModel):
    """The (only) choice of a text completion (also the streamed form)."""

    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class TextCompletion(BaseModel):
    """A text completion, or one streamed chunk of one."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    """An entry of `GET /v1/models`: the base model or an adapter over it."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "nomoat"
    parent: str | None = Field(None, description="For an adapter: the base model it runs on.")
    loaded: bool = Field(True, description="Whether the adapter is in memory now (others load on first use).")


class ModelList(BaseModel):
    """`GET /v1/models`."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    """The body of an error, as OpenAI shapes it."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every non-2xx response: `{"error": {"message", "type", "param", "code"}}`."""

    error: ErrorDetail
