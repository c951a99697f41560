"""Plain ASGI middleware: API-key check and request body limit, answered before FastAPI parses anything.

Plain ASGI (not Starlette's `BaseHTTPMiddleware`) so streamed responses and client disconnects pass through
untouched.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

from nomoat.serve.errors import error_bytes

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

PROTECTED = ("/v1", "/metrics")  # paths that need the key; /health and the web page do not


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


class BodyLimitMiddleware:
    """Refuse request bodies over `max_bytes` with a 400 that states the limit.

    The body is read here (up to the limit) and replayed to the app, so chunked uploads without a Content-Length
    are bounded too.

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

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: waits for the client to disconnect

        await self.app(scope, replay, send)
