"""The API around generation: `n` choices, `echo`, model cards, tokenize/detokenize, embeddings.

`echo` with logprobs gives each prompt token's logprob (evaluation harnesses' loglikelihood); `GET /v1/models/{id}`;
vLLM's `POST /tokenize` and `POST /detokenize`; `POST /v1/embeddings`.

Embeddings are the mean over the input's positions of the model's final normed hidden state (after the last
norm, before the output head), L2-normalised; with an adapter selection in `model`, the adapted model's.
"""

from __future__ import annotations

import asyncio
import base64
import struct
from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from nomoat.generate import scoring
from nomoat.generate.engine import TokenLogprob
from nomoat.lora.peft_format import AdapterError
from nomoat.serve import convert, openapi
from nomoat.serve.adapters import AdapterBusyError, BadModelError, UnknownModelError, parse_model
from nomoat.serve.errors import APIError
from nomoat.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    Embedding,
    EmbeddingList,
    EmbeddingRequest,
    EmbeddingUsage,
    ModelCard,
    TokenizeRequest,
    TokenizeResponse,
)
from nomoat.tokenizer import ChatTemplateError
from nomoat.tokenizer.tool_calls import template_messages

Body = ChatCompletionRequest | CompletionRequest


def check_choices(body: Body) -> int:
    """The number of choices; 400 for the combinations not served (several choices or an echo, streamed)."""
    n = body.n or 1
    if n > 1 and body.stream:
        raise APIError(400, "'n' > 1 is not supported with 'stream': true.", "n", "unsupported_value")
    if isinstance(body, CompletionRequest) and body.echo and body.stream:
        raise APIError(400, "'echo' is not supported with 'stream': true.", "echo", "unsupported_value")
    return n


def scoring_only(body: Body) -> bool:
    """A completion that only scores its prompt (`max_tokens` 0 with `echo`): nothing is generated."""
    return isinstance(body, CompletionRequest) and bool(body.echo) and body.max_tokens == 0


async def echo_prompt(engine: Any, body: CompletionRequest, ids: Sequence[int],
                      selection: Any) -> tuple[str, list[TokenLogprob | None]]:  # fmt: skip
    """The prompt's text and, when logprobs are asked for, its tokens' logprobs (None for the first)."""
    text = engine.tokenizer.decode(list(ids))
    if body.logprobs is None:
        return text, []
    lps = await asyncio.to_thread(scoring.prompt_logprobs, engine, ids, selection, body.logprobs or 0)
    return text, lps


async def scored(state: Any, gen: Any, body: CompletionRequest, ids: Sequence[int], selection: Any,
                 rid: str) -> Response:  # fmt: skip
    """The answer of a scoring-only completion: the prompt echoed, with its logprobs when asked for."""
    try:
        echo = await echo_prompt(state.engine, body, ids, selection)
    finally:
        gen.close()
    text = state.token_text if body.logprobs is not None else None
    out = convert.text_response(rid, body.model, convert.scored_only(len(ids)), text, body.logprobs or 0, echo)
    return JSONResponse(out.model_dump(mode="json"))


async def _acquire(state: Any, model: str) -> tuple[list[str], tuple[tuple[str, float], ...]]:
    """The adapters a `model` field names (loaded and marked in use: release them) and the engine's selection."""
    _, manager = state.ready()
    try:
        stack = parse_model(model, state.settings.model_name)
        names = [name for name, _ in stack]
        engine_names = await asyncio.to_thread(manager.acquire, names) if names else {}
    except UnknownModelError as e:
        raise APIError(404, str(e), "model", "model_not_found") from None
    except (BadModelError, AdapterError) as e:
        raise APIError(400, str(e), "model", "invalid_value") from None
    except AdapterBusyError as e:
        raise APIError(429, str(e), "model", "adapter_slots_full") from None
    return names, tuple((engine_names[a], w) for a, w in stack)


def _input_ids(state: Any, value: Any) -> list[list[int]]:
    tok, limits = state.engine.tokenizer, state.limits
    items = value if isinstance(value, list) and value and isinstance(value[0], (str, list)) else [value]
    out = []
    for item in items:
        ids = tok.encode(item) if isinstance(item, str) else [int(t) for t in item]
        if not ids:
            raise APIError(400, "'input' holds an empty text.", "input", "invalid_value")
        if any(not 0 <= t < limits.vocab_size for t in ids):
            raise APIError(400, "'input' has a token id outside the vocabulary.", "input", "invalid_value")
        if len(ids) > limits.max_prompt_tokens:
            raise APIError(400, f"An input has {len(ids)} tokens; at most {limits.max_prompt_tokens} are allowed.",
                           "input", "prompt_too_long")  # fmt: skip
        out.append(ids)
    return out


def router(state: Any) -> APIRouter:
    """The routes of this module over the server's state."""
    api = APIRouter(responses=openapi.errors(400, 404, 429))  # every route answers errors in OpenAI's shape

    @api.get("/v1/models/{model_id:path}", response_model=ModelCard)
    async def model_card(model_id: str) -> ModelCard:
        """One model: the base, or an adapter (loaded or in the registry)."""
        _, manager = state.ready()
        base = state.settings.model_name
        if model_id == base:
            return ModelCard(id=base, created=state.created)
        for name, loaded in await asyncio.to_thread(manager.names):
            if name == model_id:
                return ModelCard(id=name, created=state.created, parent=base, loaded=loaded)
        raise APIError(404, f"The model {model_id!r} does not exist.", "model", "model_not_found")

    @api.post("/tokenize", response_model=TokenizeResponse)
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        """Token ids of a prompt, or of chat messages rendered with the model's template (vLLM's shape)."""
        engine, _ = state.ready()
        tok = engine.tokenizer
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "Send exactly one of 'prompt' and 'messages'.", "prompt", "invalid_value")
        if body.messages is not None:
            messages = template_messages([convert.chat_message(m) for m in body.messages])
            try:
                text = tok.apply_chat_template(messages, add_generation_prompt=body.add_generation_prompt)
            except (ChatTemplateError, ValueError, TypeError) as e:
                raise APIError(400, f"The chat template refused these messages: {e}", "messages",
                               "invalid_messages") from None  # fmt: skip
            ids = tok.encode(text, add_special_tokens=False)
        else:
            ids = tok.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        strs = [tok.id_to_token(i) or "" for i in ids] if body.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=engine.max_seq_len, tokens=ids, token_strs=strs)

    @api.post("/detokenize", response_model=DetokenizeResponse)
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        """The text of token ids (vLLM's shape)."""
        engine, _ = state.ready()
        if any(not 0 <= t < state.limits.vocab_size for t in body.tokens):
            raise APIError(400, "'tokens' has an id outside the vocabulary.", "tokens", "invalid_value")
        return DetokenizeResponse(prompt=engine.tokenizer.decode(body.tokens))

    @api.post("/v1/embeddings", response_model=EmbeddingList)
    async def embeddings(body: EmbeddingRequest) -> EmbeddingList:
        """Mean-pooled, L2-normalised final hidden states of each input (base model or an adapter selection)."""
        engine, manager = state.ready()
        inputs = _input_ids(state, body.input)
        names, selection = await _acquire(state, body.model)
        try:
            vectors = [(await asyncio.to_thread(scoring.embedding, engine, ids, selection)).tolist() for ids in inputs]
        finally:
            manager.release(names)
        data, total = [], 0
        for i, (ids, vec) in enumerate(zip(inputs, vectors)):
            if body.dimensions is not None:
                vec = vec[: body.dimensions]
            total += len(ids)
            value: list[float] | str = vec
            if body.encoding_format == "base64":
                value = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
            data.append(Embedding(index=i, embedding=value))
        return EmbeddingList(data=data, model=body.model, usage=EmbeddingUsage(prompt_tokens=total, total_tokens=total))

    return api
