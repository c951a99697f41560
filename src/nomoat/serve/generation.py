"""One generation request from HTTP to the engine and back, answered plain or as server-sent events.

`generate` validates a request, queues it and answers it. Each request gets an event queue whose `put` (called from
the engine's thread) hands the event to the event loop, so no thread waits per request. A client that disconnects,
streamed or not, cancels its generation at once and frees its row. The token counts of a finished generation go to
the metrics and the access log.

Calls into the engine that take its lock (`submit`, `cancel`) run in a thread pool, never on the event loop: the
engine holds that lock for a whole step (a prefill can take a second), and a blocked loop delivers no token to any
client, so a crowd of requests arriving together would get its first tokens all at once, late.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import queue
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from nomoat.generate.engine import Completion, Delta, QueueFullError, RequestHandle
from nomoat.lora.peft_format import AdapterError
from nomoat.serve import convert, extras, structured
from nomoat.serve.access import record_usage
from nomoat.serve.adapters import AdapterBusyError, BadModelError, UnknownModelError, parse_model
from nomoat.serve.errors import APIError
from nomoat.serve.protocol import ChatCompletionRequest, CompletionRequest
from nomoat.serve.state import ServerState

# Threads that wait for the engine's lock on behalf of the event loop (waiting threads cost no CPU).
_ENGINE_CALLS = ThreadPoolExecutor(max_workers=64, thread_name_prefix="nomoat-engine-call")


class _Events(queue.Queue):
    """The queue the engine puts a request's events into: each `put` hands the event to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.loop = loop
        self.items: asyncio.Queue[Delta | Completion] = asyncio.Queue()

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:  # noqa: D102
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server is shutting down
            self.loop.call_soon_threadsafe(self.items.put_nowait, item)


async def _disconnected(receive: Callable[[], Any]) -> None:
    """Return when the client disconnects (after the body, `receive` only reports that)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class _Generation:
    """One request in the engine: its events, the client watch, and clean-up (exactly once)."""

    def __init__(self, state: ServerState, request: Request, endpoint: str, adapters: list[str], rid: str) -> None:
        self.state = state
        self.scope = request.scope
        self.rid = rid
        self.endpoint = endpoint
        self.adapters = adapters
        self.started = time.perf_counter()
        self.events = _Events(asyncio.get_running_loop())
        self.disconnect = asyncio.ensure_future(_disconnected(request.receive))
        self.handle: RequestHandle | None = None
        self.done: Completion | None = None
        self.closed = False

    async def next_event(self) -> Delta | Completion | None:
        """The next event, or None when the client has gone."""
        items = self.events.items
        if items.empty():
            get = asyncio.ensure_future(items.get())
            await asyncio.wait({get, self.disconnect}, return_when=asyncio.FIRST_COMPLETED)
            if not get.done():
                get.cancel()
                return None
            event = get.result()
        else:
            event = items.get_nowait()
        if isinstance(event, Completion):
            self.done = event
        return event

    async def result(self) -> Completion | None:
        """Wait for the completion; None when the client disconnected first."""
        while True:
            event = await self.next_event()
            if event is None or isinstance(event, Completion):
                return event

    def close(self) -> None:
        """Cancel the generation if unfinished (client gone), release the adapters, record metrics."""
        if self.closed:
            return
        self.closed = True
        self.disconnect.cancel()
        m = self.state.metrics
        if self.handle is not None and self.done is None:
            _ENGINE_CALLS.submit(self.handle.cancel)  # frees the row once the engine's step ends
            m.inc("nomoat_requests_cancelled_total", endpoint=self.endpoint)
        if self.state.manager is not None and self.adapters:
            self.state.manager.release(self.adapters)
        if self.done is not None:
            record_usage(self.scope, self.done.prompt_tokens, self.done.completion_tokens, self.rid)
            m.inc("nomoat_prompt_tokens_total", self.done.prompt_tokens)
            m.inc("nomoat_completion_tokens_total", self.done.completion_tokens)
            m.observe("nomoat_request_duration_seconds", time.perf_counter() - self.started, endpoint=self.endpoint)
            if self.done.time_to_first_token_s is not None:
                m.observe("nomoat_time_to_first_token_seconds", self.done.time_to_first_token_s)


class _SSE(StreamingResponse):
    """A streamed response that cleans up its generation however the stream ends (even if it never starts)."""

    def __init__(self, gen: _Generation, body: AsyncIterator[str]) -> None:
        super().__init__(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.gen = gen

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:  # noqa: D102
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.gen.close()


ENGINE_ERROR = "The generation failed inside the server (its log has the details); the request was not completed."


def _engine_error_event() -> str:
    """The SSE event that ends a stream whose generation failed (OpenAI's error shape), then `[DONE]`."""
    error = {"error": {"message": ENGINE_ERROR, "type": "server_error", "param": None, "code": "engine_error"}}
    return f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n"


def _sse(obj: Any) -> str:
    return f"data: {obj.model_dump_json()}\n\n"


async def _chat_stream(gen: _Generation, rid: str, model: str, body: ChatCompletionRequest,
                       tools: structured.ToolStream | None = None) -> AsyncIterator[str]:  # fmt: skip
    created, text = int(time.time()), gen.state.token_text if body.logprobs else None
    yield _sse(convert.chat_chunk(rid, model, created, delta=convert.ChatDelta(role="assistant", content="")))
    while True:
        event = await gen.next_event()
        if event is None:
            return
        if tools is not None and isinstance(event, Delta):  # content streams until a tool call may start
            for delta in tools.push(event.text, event.token_ids):
                yield _sse(convert.chat_chunk(rid, model, created, delta=delta))
            continue
        if tools is not None and event.finish_reason != "error":
            for delta in tools.finish():
                yield _sse(convert.chat_chunk(rid, model, created, delta=delta))
            if tools.calls and event.finish_reason == "stop":
                event = dataclasses.replace(event, finish_reason="tool_calls")
        if isinstance(event, Delta):
            if event.text or (text and event.logprobs):
                lps = convert.chat_logprobs(event.logprobs, text) if text else None
                yield _sse(convert.chat_chunk(rid, model, created, delta=convert.ChatDelta(content=event.text),
                                              logprobs=lps))  # fmt: skip
            continue
        if event.finish_reason == "error":
            yield _engine_error_event()
            return
        yield _sse(convert.chat_chunk(rid, model, created, finish_reason=event.finish_reason))
        if body.stream_options and body.stream_options.include_usage:
            yield _sse(convert.ChatCompletionChunk(id=rid, created=created, model=model, choices=[],
                                                   usage=convert.usage(event)))  # fmt: skip
        yield "data: [DONE]\n\n"
        return


async def _text_stream(gen: _Generation, rid: str, model: str, body: CompletionRequest) -> AsyncIterator[str]:
    created, text = int(time.time()), gen.state.token_text if body.logprobs is not None else None
    offset = 0
    while True:
        event = await gen.next_event()
        if event is None:
            return
        if isinstance(event, Delta):
            if event.text or (text and event.logprobs):
                lps = convert.completion_logprobs(event.logprobs, text, body.logprobs or 0, offset) if text else None
                offset += len(event.text)
                yield _sse(convert.text_chunk(rid, model, created, text=event.text, logprobs=lps))
            continue
        if event.finish_reason == "error":
            yield _engine_error_event()
            return
        yield _sse(convert.text_chunk(rid, model, created, finish_reason=event.finish_reason))
        if body.stream_options and body.stream_options.include_usage:
            yield _sse(convert.TextCompletion(id=rid, created=created, model=model, choices=[],
                                              usage=convert.usage(event)))  # fmt: skip
        yield "data: [DONE]\n\n"
        return


async def _submit(engine: Any, ids: list[int], params: Any, selection: tuple, rid: str, events: _Events | None,
                  hook: Any = None) -> Any:  # fmt: skip
    """`engine.submit` in a thread; if this request is cancelled meanwhile, the generation is cancelled too."""
    loop = asyncio.get_running_loop()
    call = loop.run_in_executor(_ENGINE_CALLS, lambda: engine.submit(ids, params, adapter=selection, request_id=rid,
                                                                     events=events, logits_hook=hook))  # fmt: skip
    try:
        return await asyncio.shield(call)
    except asyncio.CancelledError:
        call.add_done_callback(lambda f: f.cancelled() or f.exception() or _ENGINE_CALLS.submit(f.result().cancel))
        raise


async def generate(state: ServerState, request: Request, body: ChatCompletionRequest | CompletionRequest) -> Response:
    """Validate, queue, and answer (plain or streamed) one generation request."""
    engine, manager = state.ready()
    assert state.limits is not None
    chat = isinstance(body, ChatCompletionRequest)
    endpoint = "/v1/chat/completions" if chat else "/v1/completions"
    try:
        stack = parse_model(body.model, state.settings.model_name)
    except UnknownModelError as e:
        raise APIError(404, str(e), "model", "model_not_found") from None
    except BadModelError as e:
        raise APIError(400, str(e), "model", "invalid_value") from None
    ids = convert.prompt_ids(body, engine.tokenizer, state.limits)
    params = convert.sampling_params(body, len(ids), state.limits)
    plan = structured.tool_plan(body, engine.tokenizer)
    make_hook = structured.hook_factory(body, engine.tokenizer, state.limits.vocab_size, plan)
    n = extras.check_choices(body)
    names = [name for name, _ in stack]
    try:
        engine_names = await asyncio.to_thread(manager.acquire, names) if names else {}
    except UnknownModelError as e:
        raise APIError(404, str(e), "model", "model_not_found") from None
    except BadModelError as e:
        raise APIError(400, str(e), "model", "invalid_value") from None
    except AdapterBusyError as e:
        state.metrics.inc("nomoat_requests_rejected_total", reason="adapter_slots")
        raise APIError(429, str(e), "model", "adapter_slots_full",
                       {"Retry-After": str(state.settings.retry_after_s)}) from None  # fmt: skip
    except AdapterError as e:
        raise APIError(400, f"The adapter cannot be loaded: {e}", "model", "invalid_adapter") from None
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    gen = _Generation(state, request, endpoint, names, rid)
    more: list[Any] = []  # the other choices' handles (n > 1)
    try:
        selection = tuple((engine_names[a], w) for a, w in stack)
        if extras.scoring_only(body):
            return await extras.scored(state, gen, body, ids, selection, rid)
        gen.handle = await _submit(engine, ids, params, selection, rid, gen.events, make_hook() if make_hook else None)
        for i in range(1, n):
            more.append(await _submit(engine, ids, convert.choice_params(params, i), selection, f"{rid}-{i}", None,
                                      make_hook() if make_hook else None))  # fmt: skip
    except QueueFullError:
        gen.close()
        for h in more:
            _ENGINE_CALLS.submit(h.cancel)
        state.metrics.inc("nomoat_requests_rejected_total", reason="queue_full")
        raise APIError(429, f"The server is busy: {engine.max_queue} requests are already waiting. Retry later.",
                       None, "queue_full", {"Retry-After": str(state.settings.retry_after_s)}) from None  # fmt: skip
    except ValueError as e:
        gen.close()
        for h in more:
            _ENGINE_CALLS.submit(h.cancel)
        raise APIError(400, str(e), "messages" if chat else "prompt", "invalid_value") from None
    if body.stream:
        if chat:
            tools = structured.ToolStream(plan, engine.tokenizer) if plan is not None else None
            return _SSE(gen, _chat_stream(gen, rid, body.model, body, tools))  # type: ignore[arg-type]
        return _SSE(gen, _text_stream(gen, rid, body.model, body))  # type: ignore[arg-type]
    try:
        done = await gen.result()
        dones = [done, *[await asyncio.to_thread(h.result) for h in more]] if done is not None else None
    finally:
        gen.close()
        for h in more:
            _ENGINE_CALLS.submit(h.cancel)
    if done is None or dones is None:  # the client is gone; nobody reads this
        return Response(status_code=499)
    if any(d.finish_reason == "error" for d in dones):
        raise APIError(500, ENGINE_ERROR, None, "engine_error")
    text = state.token_text if (body.logprobs if chat else body.logprobs is not None) else None
    if chat:
        out = convert.chat_response(rid, body.model, dones, text, plan, engine.tokenizer)
    else:
        echo = await extras.echo_prompt(engine, body, ids, selection) if body.echo else None
        out = convert.text_response(rid, body.model, dones, text, body.logprobs or 0, echo)
    return JSONResponse(out.model_dump(mode="json"))
