"""The OpenAPI document (GET /openapi.json): every status the API answers, each error with OpenAI's
envelope, and nothing the server does not do (no 422: validation errors are 400s here)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from reasoning_llama.server.schemas import ErrorResponse
from reasoning_llama.server.settings import ServerSettings

_ERRORS = {
    400: "The request is invalid: a bad or unsupported value, an unknown field, a body that is not a "
    "JSON object, a conversation that does not end with a user message, too many messages or "
    "characters, or a prompt plus max_tokens beyond the model's context (code "
    "context_length_exceeded). `param` names the field.",
    401: "The server has an API key and the request did not send it as 'Authorization: Bearer <key>'.",
    404: "The model is not the one this server serves (code model_not_found).",
    413: "The request body is larger than the server's limit.",
    500: "The engine failed while generating (see the server's log).",
    503: "Every slot and queue place is taken, or the server is shutting down: retry after "
    "Retry-After seconds.",
}
_RETRY_AFTER = {
    "Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}
}
_STREAM = (
    "With `stream: true`: server-sent events, one `data: <chunk JSON>` per event, ended by `data: [DONE]`."
)


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """FastAPI `responses` for these error statuses: the envelope, what each means."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        out[status] = {"model": ErrorResponse, "description": _ERRORS[status]}
        if status == 503:
            out[status]["headers"] = _RETRY_AFTER
    return out


def generation_responses(body: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """The answers of a generation route: the body as JSON or as a stream, and every error."""
    return {
        200: {
            "model": body,
            "description": f"The completion. {_STREAM}",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
        **error_responses(400, 401, 404, 413, 500, 503),
    }


def install_openapi(app: FastAPI, settings: ServerSettings) -> None:
    """Serve FastAPI's document without its 422s, with bearer authentication when a key is set."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for path, operations in schema["paths"].items():
                for operation in operations.values():
                    operation["responses"].pop("422", None)
                    if settings.api_key is not None and path.startswith("/v1/"):
                        operation["security"] = [{"bearer": []}]
            components = schema.setdefault("components", {})
            for name in ("HTTPValidationError", "ValidationError"):
                components.get("schemas", {}).pop(name, None)
            if settings.api_key is not None:
                components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
