"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, for every failure of the server.

FastAPI answers a body that does not fit the schema with a 422 in its own shape; OpenAI clients expect a 400 that
names the offending parameter, so `validation_error` rewrites pydantic's errors into that.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from fastapi.responses import JSONResponse

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          409: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          503: "service_unavailable"}  # fmt: skip
_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "TextPart"}


class APIError(Exception):
    """An error answered with an OpenAI-shaped JSON body.

    Args:
        status: HTTP status code.
        message: What went wrong and how to fix it.
        param: The request parameter at fault, if any.
        code: A machine-readable code (e.g. `model_not_found`).
        headers: Extra response headers (e.g. `Retry-After`).
    """

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """The JSON body of an error."""
    kind = _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(err: APIError) -> JSONResponse:
    """The response for an `APIError`."""
    return JSONResponse(error_body(err.status, err.message, err.param, err.code), err.status, headers=err.headers)


def error_bytes(status: int, message: str, param: str | None = None, code: str | None = None) -> bytes:
    """An error body as bytes, for the ASGI middleware (which answers before FastAPI runs)."""
    return json.dumps(error_body(status, message, param, code)).encode()


def _path(loc: Sequence[Any]) -> str:
    """`("body", "messages", 0, "content", "str")` -> `messages.0.content` (union member tags dropped)."""
    parts = []
    for item in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(item, int):
            parts.append(str(item))
        elif isinstance(item, str) and _FIELD.fullmatch(item) and item not in _UNION_TAGS:
            parts.append(item)
    return ".".join(parts)


def validation_error(errors: Sequence[dict[str, Any]]) -> APIError:
    """A 400 from FastAPI's validation errors: the first error, naming its parameter."""
    # An unknown parameter says the most about the request: report it first.
    errors = sorted(errors, key=lambda e: e.get("type") != "extra_forbidden")
    err = errors[0] if errors else {"type": "value_error", "loc": (), "msg": "invalid request"}
    kind, param = err.get("type", ""), _path(err.get("loc", ()))
    if kind == "json_invalid":
        return APIError(400, f"We could not parse the JSON body of your request ({err.get('msg')}).",
                        code="invalid_json")  # fmt: skip
    if kind == "extra_forbidden":
        return APIError(400, f"Unsupported parameter: '{param}' is not supported by this server (nomoat).", param,
                        "unsupported_parameter")  # fmt: skip
    if kind == "missing":
        return APIError(400, f"Missing required parameter: '{param}'.", param, "missing_required_parameter")
    if not param:
        return APIError(400, f"The request body must be a JSON object ({err.get('msg')}).", None, "invalid_body")
    if param == "n":
        return APIError(400, "Invalid value for 'n': only n=1 is supported by this server.", "n", "unsupported_value")
    return APIError(400, f"Invalid value for '{param}': {err.get('msg')}.", param, "invalid_value")
