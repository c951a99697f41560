"""The OpenAI wire format, as pydantic models: requests, responses, streamed chunks, errors.

Requests forbid unknown fields (`extra="forbid"`): a parameter nomoat does not implement is refused with a 400 that
names it, never silently ignored (OpenAI answers unknown arguments the same way). Only the parameters listed here
exist; ranges follow OpenAI's where it states them and `SamplingParams` where it does not (top_k, min_p,
repetition_penalty are vLLM's extensions; `response_format` types "regex" and "grammar" are nomoat's).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_STOP = 4  # OpenAI's limit on stop sequences
MAX_N = 16  # choices per request


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Request):
    """One part of a message's content; only text parts are supported."""

    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    """A function call: its name and its arguments as JSON text."""

    name: str
    arguments: str


class ToolCallOut(BaseModel):
    """A tool call of an assistant message (in a response, or sent back in the history)."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    """A message of the conversation; assistant messages may carry `tool_calls`, `tool` messages answer one."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(None, description="The author's name (passed to the chat template as `name`).")
    tool_calls: list[ToolCallOut] | None = None
    tool_call_id: str | None = None


class FunctionDefinition(_Request):
    """A function the model may call."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="The arguments' JSON schema.")
    strict: bool | None = None


class Tool(_Request):
    """An entry of `tools`."""

    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    """The function a named `tool_choice` forces."""

    name: str


class NamedToolChoice(_Request):
    """`tool_choice: {"type": "function", "function": {"name": ...}}`."""

    type: Literal["function"]
    function: NamedFunction


class JSONSchemaFormat(_Request):
    """The schema of `response_format: {"type": "json_schema", ...}`."""

    name: str = Field("response", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ResponseFormat(_Request):
    """`response_format`: free text, any JSON object, a JSON schema, or (nomoat's extensions) a regex or a grammar.

    The grammar is Lark as llguidance reads it (start rule `start`), or GBNF (rules with `::=`, start rule `root`).
    """

    type: Literal["text", "json_object", "json_schema", "regex", "grammar"]
    json_schema: JSONSchemaFormat | None = None
    regex: str | None = None
    grammar: str | None = None


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
    n: int | None = Field(None, ge=1, le=MAX_N, description="Choices to generate (they share the prompt's cache).")
    logit_bias: dict[str, float] | None = Field(None, description="Token id (as text) -> bias in [-100, 100].")
    response_format: ResponseFormat | None = None
    user: str | None = Field(None, description="An end-user identifier (logged in nothing; accepted for clients).")
    stream: bool | None = False
    stream_options: StreamOptions | None = None


class ChatCompletionRequest(SamplingFields):
    """`POST /v1/chat/completions`."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(SamplingFields):
    """`POST /v1/completions`: one prompt (text or token ids)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20, description="Return the top-N logprobs of each token.")
    echo: bool | None = Field(False, description="Return the prompt before the completion (with its logprobs).")
    max_tokens: int | None = Field(None, ge=0, description="Most tokens to generate (0 with `echo`: score only).")


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
    token_logprobs: list[float | None] = Field(default_factory=list, description="None for the first prompt token.")
    top_logprobs: list[dict[str, float] | None] | None = None
    text_offset: list[int] = Field(default_factory=list)


class AssistantMessage(BaseModel):
    """The generated message."""

    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(BaseModel):
    """A choice of a chat completion."""

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


class FunctionCallDelta(BaseModel):
    """Part of a streamed function call."""

    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    """Part of a streamed tool call (`index` says which call of the message it extends)."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class ChatDelta(BaseModel):
    """New content of a streamed chat choice."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


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
    """A choice of a text completion (also the streamed form)."""

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


class TokenizeRequest(_Request):
    """`POST /tokenize` (vLLM's shape): a prompt, or chat messages rendered with the template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    """The tokens of a `/tokenize` request."""

    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Request):
    """`POST /detokenize` (vLLM's shape)."""

    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    """The text of a `/detokenize` request."""

    prompt: str


class EmbeddingRequest(_Request):
    """`POST /v1/embeddings`: the mean over positions of the last layer's normed hidden state, L2-normalised."""

    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None


class Embedding(BaseModel):
    """One embedding."""

    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    """Token counts of an embeddings request."""

    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    """The answer of `POST /v1/embeddings`."""

    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
