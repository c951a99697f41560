"""The access log: one line per HTTP request (method, path, status, tokens, time), as text or as JSON.

`AccessLog` is the outermost ASGI layer: it times each request, takes the status from the response and the token
counts a generation route leaves in the request's scope (`record_usage`), and writes to the `nomoat.serve.access`
logger, which `log_handler` formats. The query string is never logged (it may hold secrets); nor are headers.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from datetime import datetime, timezone
from typing import IO, Any

from nomoat.serve.metrics import Metrics

LOGGER = "nomoat.serve.access"
USAGE = "nomoat.usage"  # scope key: a dict a generation route fills with its token counts and request id
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/adapters", "/health", "/metrics")
FORMATS = ("text", "json")


def record_usage(scope: dict[str, Any], prompt_tokens: int, completion_tokens: int, request_id: str) -> None:
    """Leave a generation's token counts for the access log (a no-op outside `AccessLog`)."""
    usage = scope.get(USAGE)
    if usage is not None:
        usage.update(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, request_id=request_id)


class AccessLog:
    """ASGI wrapper: logs one line per HTTP request, and counts responses by endpoint and status (metrics).

    Args:
        app: The wrapped ASGI app.
        metrics: Where `nomoat_requests_total` is counted.
    """

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        self.log = logging.getLogger(LOGGER)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Serve the request, then log it."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 0
        path = scope["path"]
        endpoint = next((e for e in ENDPOINTS if path == e or path.startswith(e + "/")), "other")
        usage: dict[str, Any] = {}
        scope[USAGE] = usage

        async def watching_send(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                self.metrics.inc("nomoat_requests_total", endpoint=endpoint, status=str(status))
            await send(message)

        try:
            await self.app(scope, receive, watching_send)
        finally:
            if self.log.isEnabledFor(logging.INFO):
                client = scope.get("client")
                self.log.info("%s %s %s", scope["method"], path, status, extra={"access": {
                    "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                    "client": f"{client[0]}:{client[1]}" if client else None,
                    "method": scope["method"], "path": path, "status": status,
                    "prompt_tokens": usage.get("prompt_tokens"), "completion_tokens": usage.get("completion_tokens"),
                    "duration_s": round(time.perf_counter() - started, 6), "request_id": usage.get("request_id"),
                }})  # fmt: skip


class _Text(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        a = getattr(record, "access", None)
        if a is None:
            return super().format(record)
        tokens = "-" if a["completion_tokens"] is None else f"{a['prompt_tokens']}+{a['completion_tokens']}"
        rid = f" {a['request_id']}" if a["request_id"] else ""
        return (f"{a['time']} {a['client'] or '-'} \"{a['method']} {a['path']}\" {a['status']} tokens={tokens} "
                f"{a['duration_s']:.3f}s{rid}")  # fmt: skip


class _JSON(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        a = getattr(record, "access", None)
        return json.dumps(a if a is not None else {"message": record.getMessage()}, ensure_ascii=False)


def log_handler(fmt: str = "text", stream: IO[str] | None = None) -> logging.Handler:
    """A handler that writes access-log lines to `stream` (default stderr).

    Args:
        fmt: `text` (one readable line) or `json` (one JSON object per line).
        stream: Where to write.

    Raises:
        ValueError: An unknown format.
    """
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_Text() if fmt == "text" else _JSON())
    return handler


def enable(fmt: str = "text", stream: IO[str] | None = None) -> None:
    """Write the access log to `stream` (default stderr) in `fmt` (the CLI's `--log-format`)."""
    logger = logging.getLogger(LOGGER)
    logger.addHandler(log_handler(fmt, stream))
    logger.setLevel(logging.INFO)
    logger.propagate = False
