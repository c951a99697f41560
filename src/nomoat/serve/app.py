"""The HTTP server: `create_app(engine, settings)` returns the ASGI app over a `ServingEngine`, with `ServeSettings`.

Requests go straight into the engine's bounded queue (continuous batching: requests for different adapters share the
running batch); a full queue answers 429 with `Retry-After` (one request's way is `serve.generation`). The engine
may be given as a zero-argument loader: it then loads in a thread while the server already answers, `/health` saying
503 until it is ready (llama.cpp's semantics). The routes are FastAPI's; around them sit plain ASGI layers, outermost
first: the access log, the crash guard, the shutdown drain, CORS, the API key, the body limit, the method check.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from nomoat.lora.peft_format import AdapterError
from nomoat.serve import extras, openapi
from nomoat.serve.access import AccessLog
from nomoat.serve.adapters import (
    AdapterBusyError,
    AdapterConflictError,
    AdapterPathError,
    UnknownModelError,
    allowed_folder,
)
from nomoat.serve.errors import APIError, error_body, error_response, validation_error
from nomoat.serve.generation import generate
from nomoat.serve.middleware import (
    APIKeyMiddleware,
    BodyLimitMiddleware,
    CrashGuardMiddleware,
    DrainMiddleware,
    MethodCheckMiddleware,
)
from nomoat.serve.protocol import (
    AdapterLoadRequest,
    ChatCompletion,
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    TextCompletion,
)
from nomoat.serve.state import ServerState, ServeSettings, ServingEngine
from nomoat.serve.studio import mount_studio

__all__ = ["ServeSettings", "ServerState", "ServingEngine", "create_app"]

WEB_DIR = Path(__file__).parent / "web"


def _handlers(app: FastAPI) -> None:
    """Every error answered in OpenAI's shape."""

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
        # Starlette re-raises after this answer; CrashGuardMiddleware logs it and keeps the connection.
        return JSONResponse(error_body(500, f"Internal server error: {type(exc).__name__}: {exc}"), 500)


def _generation_routes(app: FastAPI, state: ServerState) -> None:
    errors = openapi.errors(400, 404, 429)

    @app.post("/v1/chat/completions", response_model=None, responses={**openapi.streamed(ChatCompletion), **errors})
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        """Chat completion (plain or streamed as server-sent events)."""
        return await generate(state, request, body)

    @app.post("/v1/completions", response_model=None, responses={**openapi.streamed(TextCompletion), **errors})
    async def completions(body: CompletionRequest, request: Request) -> Response:
        """Text completion (plain or streamed as server-sent events)."""
        return await generate(state, request, body)


def _model_routes(app: FastAPI, state: ServerState) -> None:
    settings = state.settings

    @app.get("/v1/models", response_model=ModelList, responses=openapi.errors())
    async def models() -> ModelList:
        """The base model and every adapter over it (loaded, registered, or in the registry)."""
        _, manager = state.ready()
        base = settings.model_name
        cards = [ModelCard(id=base, created=state.created)]
        adapters = await asyncio.to_thread(manager.names)
        cards += [ModelCard(id=n, created=state.created, parent=base, loaded=loaded) for n, loaded in adapters]
        return ModelList(data=cards)

    @app.post("/v1/adapters", response_model=ModelCard, responses=openapi.errors(400, 403, 404, 409, 429))
    async def load_adapter(body: AdapterLoadRequest) -> ModelCard:
        """Load an adapter: from the registry by `name`, or from `path` (a folder the server allows)."""
        _, manager = state.ready()
        if body.name == settings.model_name:
            raise APIError(409, f"{body.name!r} is the base model's name.", "name", "name_taken")
        try:
            folder = None if body.path is None else allowed_folder(body.path, settings.adapter_dirs)
            await asyncio.to_thread(manager.load, body.name, folder)
        except AdapterPathError as e:
            raise APIError(403, str(e), "path", "path_not_allowed") from None
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

    @app.delete("/v1/adapters/{name}", response_model=openapi.Deleted, responses=openapi.errors(404, 409))
    async def unload_adapter(name: str) -> openapi.Deleted:
        """Unload an adapter from memory (a registry adapter stays available and reloads on next use)."""
        _, manager = state.ready()
        try:
            found = await asyncio.to_thread(manager.unload, name)
        except AdapterConflictError as e:
            raise APIError(409, str(e), "name", "adapter_in_use") from None
        if not found:
            raise APIError(404, f"No adapter named {name!r} is loaded or registered.", "name", "model_not_found")
        return openapi.Deleted(id=name, deleted=True)


def _service_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health", response_model=openapi.Health, responses=openapi.errors())
    async def health() -> openapi.Health:
        """200 once the model is loaded; 503 while it loads or the server shuts down."""
        state.ready()
        return openapi.Health(status="ok")

    @app.get("/metrics", response_class=PlainTextResponse, responses=openapi.errors())
    async def metrics(request: Request) -> Response:
        """Prometheus metrics (OpenMetrics when asked): requests, tokens, latency histograms, queue, adapters."""
        body, content_type = state.metrics.render(request.headers.get("accept"))
        return Response(body, media_type=content_type)


def _start(
    state: ServerState,
    engine: ServingEngine | Callable[[], ServingEngine],
    on_ready: Callable[[ServerState], None] | None,
    on_error: Callable[[BaseException], None] | None,
) -> None:
    """Attach the engine now, or load it in a background thread when given as a loader."""
    if not (callable(engine) and not hasattr(engine, "submit")):
        state.attach(engine)  # type: ignore[arg-type]
        if on_ready:
            on_ready(state)
        return
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


def _wrap(app: FastAPI, state: ServerState) -> Any:
    """The ASGI layers around the routes (see the module's docstring for the order and why)."""
    s = state.settings
    inner: Any = MethodCheckMiddleware(app, lambda: app.router.routes)
    inner = APIKeyMiddleware(BodyLimitMiddleware(inner, s.max_body_bytes), s.api_key)
    if s.cors_origins:  # outside the key check: a browser's preflight carries no key
        inner = CORSMiddleware(inner, allow_origins=list(s.cors_origins), allow_methods=["GET", "POST", "DELETE"],
                               allow_headers=["Authorization", "Content-Type"], expose_headers=["Retry-After"],
                               max_age=600)  # fmt: skip
    state.drain = DrainMiddleware(inner, s.retry_after_s)
    return AccessLog(CrashGuardMiddleware(state.drain), state.metrics)


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
        The app (FastAPI wrapped in the ASGI layers), with `.state` (a `ServerState`) and `.fastapi` attributes.
    """
    state = ServerState(settings)
    app = FastAPI(title="nomoat", version="1", description="OpenAI-compatible API over nomoat's engine.")
    _handlers(app)
    _generation_routes(app, state)
    _model_routes(app, state)
    _service_routes(app, state)
    app.include_router(extras.router(state))  # /v1/models/{id}, /tokenize, /detokenize, /v1/embeddings
    mount_studio(app, state)  # the studio's /v1/studio routes and the offline /docs
    openapi.install(app, api_key=bool(settings.api_key))
    if (WEB_DIR / "index.html").is_file():  # the web playground, when present
        app.mount("/", StaticFiles(directory=WEB_DIR, html=True), name="web")
    _start(state, engine, on_ready, on_error)
    wrapped = _wrap(app, state)
    wrapped.state = state
    wrapped.fastapi = app
    return wrapped
