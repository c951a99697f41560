"""The HTTP server: `create_app(engine, settings)` returns a FastAPI app over a `ServingEngine`, with `ServeSettings`.

Requests go straight into the engine's bounded queue (continuous batching: requests for different adapters share the
running batch); a full queue answers 429 with `Retry-After`. Each request gets an event queue whose `put` (called
from the engine's thread) wakes the event loop, so no thread waits per request. A client that disconnects, streamed
or not, cancels its generation at once and frees its row. The engine may be given as a zero-argument loader: it then
loads in a thread while the server already answers, `/health` saying 503 until it is ready (llama.cpp's semantics).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from nomoat.generate.engine import Completion, Delta, QueueFullError, RequestHandle
from nomoat.generate.sampling import SamplingParams
from nomoat.lora.peft_format import AdapterError
from nomoat.lora.registry import Registry
from nomoat.serve import convert, extras, structured
from nomoat.serve.adapters import (
    AdapterBusyError,
    AdapterConflictError,
    AdapterManager,
    BadModelError,
    UnknownModelError,
    parse_model,
)
from nomoat.serve.errors import APIError, error_body, error_response, validation_error
from nomoat.serve.metrics import Metrics
from nomoat.serve.middleware import APIKeyMiddleware, BodyLimitMiddleware
from nomoat.serve.protocol import (
    AdapterLoadRequest,
    ChatCompletionRequest,
    CompletionRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from nomoat.serve.studio import StudioSettings, mount_studio
from nomoat.tokenizer import Tokenizer

WEB_DIR = Path(__file__).parent / "web"
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/adapters", "/health", "/metrics")


class ServingEngine(Protocol):
    """The part of `nomoat.generate.engine.Engine` the server uses."""

    tokenizer: Tokenizer
    max_seq_len: int
    max_running: int
    max_queue: int
    num_running: int
    num_waiting: int

    def submit(self, prompt: list[int], params: SamplingParams, adapter: Any = (), request_id: str | None = None,
               events: queue.Queue | None = None, logits_hook: Any = None) -> RequestHandle:  # fmt: skip
        """Queue a request."""

    def add_adapter(self, name: str, folder: str | Path) -> None:
        """Load an adapter."""

    def remove_adapter(self, name: str) -> None:
        """Unload an adapter."""

    def start(self) -> None:
        """Run the scheduling loop in a background thread."""


@dataclass
class ServeSettings:
    """The server's knobs.

    Attributes:
        model_name: The base model's name in `model` fields and `/v1/models`.
        api_key: Required as `Authorization: Bearer KEY` on /v1 and /metrics when set.
        adapters: Adapters to register and load at start, name -> folder (more load lazily from the registry).
        max_loaded_adapters: Most adapters in memory at once (least recently used idle ones are evicted).
        max_prompt_tokens: Longest prompt (default: the engine's row length minus one).
        max_completion_tokens: Largest `max_tokens`, and the default for requests without one.
        max_body_bytes: Largest request body.
        retry_after_s: `Retry-After` of a 429.
        registry_home: The adapter registry's root (default `$NOMOAT_HOME`).
        studio: The web studio's folders and limits.
    """

    model_name: str
    api_key: str | None = None
    adapters: dict[str, Path] = field(default_factory=dict)
    max_loaded_adapters: int = 8
    max_prompt_tokens: int | None = None
    max_completion_tokens: int = 2048
    max_body_bytes: int = 2 * 2**20
    retry_after_s: int = 1
    registry_home: str | None = None
    studio: StudioSettings = field(default_factory=StudioSettings)


class ServerState:
    """What the routes share: the engine once loaded, the adapter manager, metrics."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.engine: ServingEngine | None = None
        self.manager: AdapterManager | None = None
        self.limits: convert.Limits | None = None
        self.token_text: convert.TokenText | None = None
        self.error: str | None = None
        self.created = int(time.time())
        self.metrics = Metrics(self._gauges)

    def attach(self, engine: ServingEngine) -> None:
        """Make the server ready on `engine`: load the start-up adapters, start the engine loop."""
        s = self.settings

        def on_event(kind: str) -> None:
            self.metrics.inc("nomoat_adapter_loads_total" if kind == "load" else "nomoat_adapter_evictions_total")

        manager = AdapterManager(engine, s.max_loaded_adapters, Registry(s.registry_home), on_event)
        for name, folder in s.adapters.items():
            manager.register(name, folder)
        for name in list(s.adapters)[: s.max_loaded_adapters]:
            manager.load(name)
        model = getattr(engine, "model", None)
        vocab = model.config.vocab_size if model is not None else engine.tokenizer.vocab_size
        max_prompt = min(s.max_prompt_tokens or engine.max_seq_len - 1, engine.max_seq_len - 1)
        self.limits = convert.Limits(max_prompt, s.max_completion_tokens, engine.max_seq_len, vocab)
        self.token_text = convert.TokenText(engine.tokenizer)
        self.manager = manager
        engine.start()
        self.engine = engine

    def ready(self) -> tuple[ServingEngine, AdapterManager]:
        """The engine and manager, or a 503 while loading (500 if loading failed)."""
        if self.engine is None or self.manager is None:
            if self.error:
                raise APIError(500, f"The model failed to load: {self.error}", code="model_load_failed")
            raise APIError(503, "The model is loading; retry shortly.", code="model_loading",
                           headers={"Retry-After": str(self.settings.retry_after_s)})  # fmt: skip
        return self.engine, self.manager

    def _gauges(self) -> dict[str, tuple[str, float]]:
        e = self.engine
        return {
            "nomoat_model_loaded": ("1 when the model is loaded and serving.", float(e is not None)),
            "nomoat_queue_depth": ("Requests waiting for a batch slot.", e.num_waiting if e else 0),
            "nomoat_running_requests": ("Requests being generated (batch rows in use).", e.num_running if e else 0),
            "nomoat_max_running": ("Batch rows.", e.max_running if e else 0),
            "nomoat_max_queue": ("Queue bound; beyond it requests get 429.", e.max_queue if e else 0),
            "nomoat_adapters_loaded": ("Adapters in memory.", self.manager.num_loaded if self.manager else 0),
        }


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

    def __init__(self, state: ServerState, request: Request, endpoint: str, adapters: list[str]) -> None:
        self.state = state
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
            self.handle.cancel()  # frees the row now (the engine lock is held for at most one step)
            m.inc("nomoat_requests_cancelled_total", endpoint=self.endpoint)
        if self.state.manager is not None and self.adapters:
            self.state.manager.release(self.adapters)
        if self.done is not None:
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


async def _generate(state: ServerState, request: Request, body: ChatCompletionRequest | CompletionRequest) -> Response:
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
    gen = _Generation(state, request, endpoint, names)
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    try:
        selection = tuple((engine_names[a], w) for a, w in stack)
        if extras.scoring_only(body):
            return await extras.scored(state, gen, body, ids, selection, rid)
        hook = make_hook() if make_hook else None
        gen.handle = engine.submit(ids, params, adapter=selection, request_id=rid, events=gen.events, logits_hook=hook)
        more = [engine.submit(ids, convert.choice_params(params, i), adapter=selection, request_id=f"{rid}-{i}",
                              logits_hook=make_hook() if make_hook else None) for i in range(1, n)]  # fmt: skip
    except QueueFullError:
        gen.close()
        state.metrics.inc("nomoat_requests_rejected_total", reason="queue_full")
        raise APIError(429, f"The server is busy: {engine.max_queue} requests are already waiting. Retry later.",
                       None, "queue_full", {"Retry-After": str(state.settings.retry_after_s)}) from None  # fmt: skip
    except ValueError as e:
        gen.close()
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
            h.cancel()
    if done is None:  # the client is gone; nobody reads this
        return Response(status_code=499)
    if any(d.finish_reason == "error" for d in dones or []):
        raise APIError(500, ENGINE_ERROR, None, "engine_error")
    text = state.token_text if (body.logprobs if chat else body.logprobs is not None) else None
    if chat:
        out = convert.chat_response(rid, body.model, dones, text, plan, engine.tokenizer)
    else:
        echo = await extras.echo_prompt(engine, body, ids, selection) if body.echo else None
        out = convert.text_response(rid, body.model, dones, text, body.logprobs or 0, echo)
    return JSONResponse(out.model_dump(mode="json"))


class _CountResponses:
    """ASGI wrapper counting responses by endpoint and status (`nomoat_requests_total`)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = next((e for e in ENDPOINTS if path == e or path.startswith(e + "/")), "other")

        async def counting_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                self.metrics.inc("nomoat_requests_total", endpoint=endpoint, status=str(message["status"]))
            await send(message)

        await self.app(scope, receive, counting_send)


_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (400, 401, 404, 429, 503)}


def create_app(engine: ServingEngine | Callable[[], ServingEngine], settings: ServeSettings,
               on_ready: Callable[[ServerState], None] | None = None,
               on_error: Callable[[BaseException], None] | None = None) -> Any:  # fmt: skip
    """Build the ASGI app.

    Args:
        engine: A generation engine (`nomoat.generate.engine.Engine`), or a zero-argument function that loads one:
            it then runs in a background thread and the server answers 503 until it returns.
        settings: The server's knobs.
        on_ready: Called (in the loading thread) once the server is ready.
        on_error: Called if loading fails (the server then answers 500 on the API).

    Returns:
        The app (FastAPI wrapped in the body-limit, API-key and metrics middleware), with `.state` (a
        `ServerState`) and `.fastapi` attributes.
    """
    state = ServerState(settings)
    app = FastAPI(title="nomoat", version="1", description="OpenAI-compatible API over nomoat's engine.")

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = "Not found." if exc.status_code == 404 else str(exc.detail)
        return JSONResponse(error_body(exc.status_code, message), exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(error_body(500, f"Internal server error: {type(exc).__name__}: {exc}"), 500)

    @app.post("/v1/chat/completions", response_model=None, responses=_ERRORS)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        """Chat completion (plain or streamed as server-sent events)."""
        return await _generate(state, request, body)

    @app.post("/v1/completions", response_model=None, responses=_ERRORS)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        """Text completion (plain or streamed as server-sent events)."""
        return await _generate(state, request, body)

    @app.get("/v1/models", response_model=ModelList, responses=_ERRORS)
    async def models() -> ModelList:
        """The base model and every adapter over it (loaded, registered, or in the registry)."""
        _, manager = state.ready()
        base = settings.model_name
        cards = [ModelCard(id=base, created=state.created)]
        adapters = await asyncio.to_thread(manager.names)
        cards += [ModelCard(id=n, created=state.created, parent=base, loaded=loaded) for n, loaded in adapters]
        return ModelList(data=cards)

    @app.post("/v1/adapters", response_model=ModelCard, responses={**_ERRORS, 409: {"model": ErrorResponse}})
    async def load_adapter(body: AdapterLoadRequest) -> ModelCard:
        """Load an adapter: from `path` (a folder on the server) or from the registry by `name`."""
        _, manager = state.ready()
        if body.name == settings.model_name:
            raise APIError(409, f"{body.name!r} is the base model's name.", "name", "name_taken")
        try:
            await asyncio.to_thread(manager.load, body.name, body.path)
        except UnknownModelError as e:
            raise APIError(404, str(e), "name", "model_not_found") from None
        except AdapterConflictError as e:
            raise APIError(409, str(e), "name", "name_taken") from None
        except AdapterBusyError as e:
            raise APIError(429, str(e), None, "adapter_slots_full",
                           {"Retry-After": str(settings.retry_after_s)}) from None  # fmt: skip
        except AdapterError as e:  # (a ValueError: first)
            raise APIError(400, str(e), "path", "invalid_adapter") from None
        except ValueError as e:
            raise APIError(400, str(e), "name", "invalid_value") from None
        return ModelCard(id=body.name, created=int(time.time()), parent=settings.model_name)

    @app.delete("/v1/adapters/{name}", responses={**_ERRORS, 409: {"model": ErrorResponse}})
    async def unload_adapter(name: str) -> dict[str, Any]:
        """Unload an adapter from memory (a registry adapter stays available and reloads on next use)."""
        _, manager = state.ready()
        try:
            found = await asyncio.to_thread(manager.unload, name)
        except AdapterConflictError as e:
            raise APIError(409, str(e), "name", "adapter_in_use") from None
        if not found:
            raise APIError(404, f"No adapter named {name!r} is loaded or registered.", "name", "model_not_found")
        return {"id": name, "object": "model", "deleted": True}

    @app.get("/health", responses={503: {"model": ErrorResponse}})
    async def health() -> dict[str, str]:
        """200 once the model is loaded; 503 while it loads."""
        state.ready()
        return {"status": "ok"}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        """Prometheus metrics: requests, tokens, latency histograms, queue depth, loaded adapters."""
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")

    app.include_router(extras.router(state))  # /v1/models/{id}, /tokenize, /detokenize, /v1/embeddings
    mount_studio(app, state)  # the studio's /v1/studio routes and the offline /docs
    if (WEB_DIR / "index.html").is_file():  # the web playground, when present
        app.mount("/", StaticFiles(directory=WEB_DIR, html=True), name="web")

    if callable(engine) and not hasattr(engine, "submit"):
        loader = engine

        def load() -> None:
            try:
                state.attach(loader())
            except BaseException as e:  # noqa: BLE001 - reported to the caller and on /health
                state.error = str(e) or type(e).__name__
                if on_error:
                    on_error(e)
                return
            if on_ready:
                on_ready(state)

        threading.Thread(target=load, name="nomoat-load", daemon=True).start()
    else:
        state.attach(engine)  # type: ignore[arg-type]
        if on_ready:
            on_ready(state)

    wrapped = _CountResponses(APIKeyMiddleware(BodyLimitMiddleware(app, settings.max_body_bytes), settings.api_key),
                              state.metrics)  # fmt: skip
    wrapped.state = state  # type: ignore[attr-defined]
    wrapped.fastapi = app  # type: ignore[attr-defined]
    return wrapped
