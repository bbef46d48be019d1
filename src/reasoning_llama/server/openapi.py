"""The OpenAPI document (GET /openapi.json): every status the API answers, each error with OpenAI's
envelope, and nothing the server does not do (no 422: validation errors are 400s here)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from reasoning_llama.server.schemas import ChatCompletionChunk, ErrorResponse
from reasoning_llama.server.settings import ServerSettings

_ERRORS = {
    400: "The request is invalid; `param` names the field. A value the schema refuses (a bad or "
    "unsupported value, an unknown field, a body that is not a JSON object), or one of the limits "
    "the schema cannot state, each with its `code`: the prompt plus max_tokens beyond the model's "
    "context (context_length_exceeded), more characters in all messages (or prompts) together than the "
    "server takes (prompt_too_long), a conversation that does not end with a user message or whose system "
    "message has no user message to join (invalid_conversation).",
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


def _event_stream(chunk: type[BaseModel]) -> dict[str, Any]:
    """text/event-stream: in Open API 3.1 `schema` describes one event (its fields, as parsed)."""
    return {
        "schema": {
            "type": "object",
            "required": ["data"],
            "properties": {
                "data": {
                    "description": f"A {chunk.__name__} as JSON, or `[DONE]` to end the stream.",
                    "anyOf": [
                        {
                            "type": "string",
                            "contentMediaType": "application/json",
                            "contentSchema": {"$ref": f"#/components/schemas/{chunk.__name__}"},
                        },
                        {"const": "[DONE]"},
                    ],
                }
            },
        }
    }


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """FastAPI `responses` for these error statuses: the envelope, what each means."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        out[status] = {"model": ErrorResponse, "description": _ERRORS[status]}
        if status == 503:
            out[status]["headers"] = _RETRY_AFTER
    return out


def generation_responses(body: type[BaseModel], chunk: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """The answers of a generation route: the body as JSON or as a stream of chunks, and every error."""
    return {
        200: {
            "model": body,
            "description": f"The completion. {_STREAM}",
            "content": {"text/event-stream": _event_stream(chunk)},
        },
        **error_responses(400, 401, 404, 413, 500, 503),
    }


def install_openapi(
    app: FastAPI, settings: ServerSettings, *, max_context: int, shortest_chat_prompt: int, capacity: int
) -> None:
    """Serve FastAPI's document without its 422s, with bearer authentication when a key is set, and
    with this server's own limits, so that it never advertises a value the server always refuses."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            _state_limits(
                schema["components"]["schemas"], settings, max_context, shortest_chat_prompt, capacity
            )
            for path, operations in schema["paths"].items():
                for operation in operations.values():
                    operation["responses"].pop("422", None)
                    if settings.api_key is not None and path.startswith("/v1/"):
                        operation["security"] = [{"bearer": []}]
            components = schema["components"]
            # The stream's chunks, which no route names as a body.
            chunk = ChatCompletionChunk.model_json_schema(
                ref_template="#/components/schemas/{model}", mode="serialization"
            )
            for name, definition in {**chunk.pop("$defs", {}), "ChatCompletionChunk": chunk}.items():
                components["schemas"].setdefault(name, definition)
            for name in ("HTTPValidationError", "ValidationError"):
                components.get("schemas", {}).pop(name, None)
            if settings.api_key is not None:
                components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _state_limits(
    schemas: dict[str, Any],
    settings: ServerSettings,
    max_context: int,
    shortest_chat_prompt: int,
    capacity: int,
) -> None:
    """This server's facts in the request schemas: its one model, and limits a value must keep.

    What the schema cannot say (a prompt plus max_tokens within the context, the characters of all
    messages together, the order of a conversation's roles) is a 400 with its own code.
    """
    chat, raw = schemas["ChatCompletionRequest"]["properties"], schemas["CompletionRequest"]["properties"]
    for properties, shortest_prompt in ((chat, shortest_chat_prompt), (raw, 1)):
        properties["model"]["enum"] = [settings.model_name]
        n = _branch(properties["n"], "integer")
        n["maximum"] = min(n["maximum"], capacity)
        for name in ("max_tokens", "max_completion_tokens"):
            if name in properties:
                _branch(properties[name], "integer")["maximum"] = max_context - shortest_prompt
    chat["messages"]["maxItems"] = settings.max_messages
    _branch(schemas["ChatMessage"]["properties"]["content"], "string")["maxLength"] = settings.max_total_chars
    for branch in raw["prompt"]["anyOf"]:
        if branch.get("type") == "string":
            branch["maxLength"] = settings.max_total_chars
        elif branch.get("items", {}).get("type") == "string":
            branch["items"]["maxLength"] = settings.max_total_chars
            branch["maxItems"] = min(branch["maxItems"], capacity)  # one choice each
        elif branch.get("items", {}).get("type") == "integer":
            branch["maxItems"] = max_context - 1
        else:
            branch["items"]["maxItems"] = max_context - 1
            branch["maxItems"] = min(branch["maxItems"], capacity)


def _branch(schema: dict[str, Any], kind: str) -> dict[str, Any]:
    """The part of a (possibly nullable) property's schema that holds values of JSON type `kind`."""
    return next(b for b in schema.get("anyOf", [schema]) if b.get("type") == kind)
