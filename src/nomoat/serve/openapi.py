"""What the OpenAPI schema says beyond the routes: the responses each route can give, and the security scheme.

Every status a route can answer is documented with its body (errors in OpenAI's shape), so a schema-driven client
or fuzzer can check each response; bodies that fail validation are answered 400 (never FastAPI's 422, which is
removed). With an API key the protected paths declare HTTP bearer authentication.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from nomoat.serve.middleware import PROTECTED
from nomoat.serve.protocol import ErrorResponse

SCHEME = "bearer"
_WHY = {
    400: "The request is invalid; `error.param` names the parameter.",
    401: "The API key is missing or wrong.",
    403: "Not allowed on this server.",
    404: "No such model, adapter, job or file.",
    409: "The name is taken, or the adapter is in use.",
    413: "The upload is larger than the server allows.",
    429: "The queue or the adapter slots are full; retry after `Retry-After` seconds.",
    500: "The server failed; the request was not completed.",
    503: "The model is loading, or the server is shutting down; retry after `Retry-After` seconds.",
}


class Health(BaseModel):
    """`GET /health` once the model is loaded."""

    status: Literal["ok"]


class Deleted(BaseModel):
    """`DELETE /v1/adapters/{name}`."""

    id: str
    object: Literal["model"] = "model"
    deleted: bool


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The error responses of a route: the given codes, and 401, 500 and 503."""
    json_body = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}  # on any route
    return {code: {"model": ErrorResponse, "description": _WHY[code], "content": json_body}
            for code in sorted({*codes, 401, 500, 503})}  # fmt: skip


def streamed(model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """A generation's 200: `model` as JSON, or (with `stream: true`) server-sent events of chunks."""
    event = {
        "type": "object",
        "description": "One server-sent event: `data` is a chunk as JSON, or `[DONE]` after the last one.",
        "properties": {"event": {"type": "string"}, "data": {"type": "string"}, "id": {"type": "string"},
                       "retry": {"type": "integer"}},
        "required": ["data"],
    }  # fmt: skip
    return {200: {"model": model, "description": "The completion (JSON), or its chunks as server-sent events.",
                  "content": {"text/event-stream": {"schema": event}}}}  # fmt: skip


def install(app: FastAPI, api_key: bool, protected: Sequence[str] = PROTECTED) -> None:
    """Build `app`'s schema with the bearer scheme (when `api_key`) and without FastAPI's 422 responses."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for path, operations in schema.get("paths", {}).items():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
                if api_key and path.startswith(tuple(protected)):
                    operation["security"] = [{SCHEME: []}]
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        if api_key:
            schema.setdefault("components", {})["securitySchemes"] = {
                SCHEME: {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The server's API key (`nomoat serve --api-key`), as `Authorization: Bearer KEY`.",
                }
            }
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
