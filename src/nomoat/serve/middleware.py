"""Plain ASGI middleware, answered before FastAPI parses anything.

The API-key check, the request body limit and text check, 405 for a wrong method, 503 while the server drains for
shutdown, and a guard that turns a crash into a 500 that keeps the connection open.

Plain ASGI (not Starlette's `BaseHTTPMiddleware`) so streamed responses and client disconnects pass through
untouched.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from starlette.routing import BaseRoute, Match

from nomoat.serve.errors import error_bytes

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

PROTECTED = ("/v1", "/metrics")  # paths that need the key; /health and the web page do not
# A JSON escape of a UTF-16 surrogate: only then can a parsed body hold a lone one (raw UTF-8 cannot encode it).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
LOG = logging.getLogger("nomoat.serve")


async def _answer(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(headers or [])]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


class APIKeyMiddleware:
    """Require `Authorization: Bearer KEY` on the API paths; compared in constant time.

    Args:
        app: The wrapped ASGI app.
        api_key: The key; None disables the check.
    """

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self.key = api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check the key of an HTTP request to a protected path, then pass it on."""
        if self.key is None or scope["type"] != "http" or not scope["path"].startswith(PROTECTED):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"authorization", b"")
        scheme, _, token = given.partition(b" ")
        # compare_digest on bytes: time independent of where the strings differ (length still leaks, harmlessly).
        ok = scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)
        if not ok:
            message = "Incorrect API key provided." if given else "Missing API key: send 'Authorization: Bearer KEY'."
            body = error_bytes(401, message, code="invalid_api_key")
            await _answer(send, 401, body, [(b"www-authenticate", b"Bearer")])
            return
        await self.app(scope, receive, send)


def lone_surrogate(value: Any, path: tuple[str, ...] = ()) -> str | None:
    """The dotted path of the first string in parsed JSON that holds a lone surrogate (not Unicode), else None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return ".".join(path)
    elif isinstance(value, dict):
        for key, item in value.items():
            found = lone_surrogate(key, path) if isinstance(key, str) else None
            found = found if found is not None else lone_surrogate(item, (*path, str(key)))
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = lone_surrogate(item, (*path, str(i)))
            if found is not None:
                return found
    return None


def _surrogate_error(body: bytes) -> bytes | None:
    """A 400 body when the JSON `body` holds a lone surrogate; None otherwise (also for a body that is not JSON)."""
    if not _SURROGATE_ESCAPE.search(body):
        return None
    try:
        param = lone_surrogate(json.loads(body))
    except ValueError:
        return None  # not JSON: the route's own parsing answers that
    if param is None:
        return None
    message = (f"Invalid value for '{param}': the text holds a lone UTF-16 surrogate (an escape in \\ud800-\\udfff "
               "without its pair), which is not Unicode.")  # fmt: skip
    return error_bytes(400, message, param or None, "invalid_unicode")


class BodyLimitMiddleware:
    r"""Refuse request bodies over `max_bytes` with a 400 that states the limit, and JSON text that is not Unicode.

    The body is read here (up to the limit) and replayed to the app, so chunked uploads without a Content-Length
    are bounded too. A string with a lone surrogate (`"a\ud800b"`) is valid JSON but no tokenizer or file system
    takes it: it is refused here with a 400 naming the parameter.

    Args:
        app: The wrapped ASGI app.
        max_bytes: The limit.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _too_large(self, send: Send) -> None:
        message = f"The request body is larger than this server's limit of {self.max_bytes} bytes."
        await _answer(send, 400, error_bytes(400, message, code="request_too_large"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Read and bound the body of an HTTP request, then pass it on."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._too_large(send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending the body
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._too_large(send)
                return
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False
        invalid = _surrogate_error(body)
        if invalid is not None:
            await _answer(send, 400, invalid)
            return

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: waits for the client to disconnect

        await self.app(scope, replay, send)


class MethodCheckMiddleware:
    """Answer 405 with `Allow` when a route has the path but not the method.

    Without it, the web page mounted at `/` matches every path, so `GET /v1/chat/completions` would be a 404. The
    routes are read per request, so routers included after the app is built are covered.

    Args:
        app: The wrapped ASGI app.
        routes: The app's routes (mounts are skipped).
    """

    def __init__(self, app: ASGIApp, routes: Callable[[], Sequence[BaseRoute]]) -> None:
        self.app = app
        self.routes = routes

    def allowed(self, scope: Scope) -> list[str] | None:
        """The methods the path allows, when the request's method is not one of them; None otherwise."""
        methods: set[str] = set()
        for route in self.routes():
            route_methods = getattr(route, "methods", None)
            if not route_methods:
                continue  # a mount or a websocket route
            match, _ = route.matches(scope)
            if match == Match.FULL:
                return None
            if match == Match.PARTIAL:
                methods |= route_methods
        return sorted(methods) or None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on, or answer 405."""
        allow = self.allowed(scope) if scope["type"] == "http" else None
        if allow is None:
            await self.app(scope, receive, send)
            return
        message = f"Method {scope['method']} is not allowed on {scope['path']}; use {' or '.join(allow)}."
        body = error_bytes(405, message, code="method_not_allowed")
        await _answer(send, 405, body, [(b"allow", ", ".join(allow).encode())])


class DrainMiddleware:
    """Count requests in flight; while the server drains for shutdown, refuse new ones with 503.

    `/metrics` still answers while draining (scrapers see the drain end); `/health` says 503, so a load balancer
    stops sending requests. The refusal closes the connection.

    Args:
        app: The wrapped ASGI app.
        retry_after_s: `Retry-After` of the 503.
    """

    def __init__(self, app: ASGIApp, retry_after_s: int = 1) -> None:
        self.app = app
        self.retry_after = str(retry_after_s).encode()
        self.draining = False
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on (counted), or refuse it while draining."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.draining and scope["path"] != "/metrics":
            body = error_bytes(503, "The server is shutting down; retry on another instance.", code="shutting_down")
            await _answer(send, 503, body, [(b"retry-after", self.retry_after), (b"connection", b"close")])
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


class CrashGuardMiddleware:
    """Turn an exception that escapes the app into a finished response, so the connection stays usable.

    Starlette answers an unhandled exception with a 500 and then re-raises it, and the HTTP server closes the
    connection of a request whose app raised: the client's next request on that keep-alive connection is reset.
    Here the exception is logged and stops: a response not yet started gets a 500 in OpenAI's shape; a started one
    is ended (a stream of server-sent events with an error event and `[DONE]`).

    Args:
        app: The wrapped ASGI app.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the app; finish its response if it crashes."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = ended = sse = False

        async def watching_send(message: Message) -> None:
            nonlocal started, ended, sse
            if message["type"] == "http.response.start":
                started = True
                sse = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                          for k, v in message.get("headers", []))  # fmt: skip
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                ended = True
            await send(message)

        try:
            await self.app(scope, receive, watching_send)
        except Exception:  # noqa: BLE001 - logged, answered; the connection lives on
            LOG.exception("error while serving %s %s", scope.get("method"), scope.get("path"))
            message = "Internal server error (the server's log has the details)."
            if not started:
                await _answer(send, 500, error_bytes(500, message, code="internal_error"))
            elif not ended:
                tail = b""
                if sse:
                    tail = b"data: " + error_bytes(500, message, code="internal_error") + b"\n\ndata: [DONE]\n\n"
                await send({"type": "http.response.body", "body": tail, "more_body": False})
