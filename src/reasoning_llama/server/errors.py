"""The OpenAI error envelope `{"error": {"message", "type", "param", "code"}}` for every failure.

A client's mistake is a 4xx with a message saying what to fix, never a 500.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from reasoning_llama.errors import RequestError, TokenizerError

log = logging.getLogger(__name__)

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """An error answered with the OpenAI envelope."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    @property
    def type(self) -> str:
        return _TYPE_BY_STATUS.get(
            self.status, "server_error" if self.status >= 500 else "invalid_request_error"
        )

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# SamplingParams names its own fields; the API calls some of them differently.
_API_PARAM = {"max_new_tokens": "max_tokens"}


def from_request_error(error: RequestError) -> APIError:
    message, param = str(error), error.param
    if param in _API_PARAM:
        message, param = message.replace(param, _API_PARAM[param]), _API_PARAM[param]
    return bad_request(message, param=param, code=error.code)


def _location(loc: tuple[Any, ...]) -> str:
    """`("body", "messages", 0, "role")` -> `messages.0.role`: field names and indices, without
    pydantic's steps through a union or a validator (`str`, `constrained-str`, `list[...]`)."""
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(p for p in parts if p.isdigit() or (p.isidentifier() and p not in _UNION_BRANCHES))


_UNION_BRANCHES = {"str", "int", "float", "bool"}


def _validation_error(error: RequestValidationError) -> APIError:
    problems = error.errors()
    if not problems:
        return bad_request("invalid request")
    # The deepest location is the most specific (a bad content part rather than "not a string").
    first = max(problems, key=lambda problem: len(problem.get("loc", ())))
    kind = first.get("type", "")
    if kind == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return bad_request(f"the request body is not valid JSON ({detail})".replace(" ()", ""))
    param = _location(tuple(first.get("loc", ())))
    if not param and kind in ("missing", "model_attributes_type", "dict_type"):
        return bad_request(
            "the request body must be a JSON object sent with 'Content-Type: application/json'"
        )
    if kind == "extra_forbidden":  # the unknown key as sent, whatever it is ("max-tokens", "", "str")
        *parents, key = first.get("loc", ("",))
        where = _location(tuple(parents))
        param = f"{where}.{key}" if where else str(key)
        name = str(key) if str(key).isidentifier() else json.dumps(key)
        shown = f"{where}.{name}" if where else name
        return bad_request(
            f"unrecognized request argument: {shown} (the supported ones: GET /openapi.json)", param=param
        )
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    if kind == "missing":
        message = "this field is required"
    more = (
        f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})"
        if len(problems) > 1
        else ""
    )
    return bad_request(f"{param}: {message}{more}" if param else f"{message}{more}", param=param or None)


def install_error_handlers(app: FastAPI) -> None:
    """Every error the app can raise becomes the envelope; unknown ones are a logged 500."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, error: RequestError) -> JSONResponse:
        return from_request_error(error).response()

    @app.exception_handler(TokenizerError)
    async def _tokenizer_error(_: Request, error: TokenizerError) -> JSONResponse:
        # Raised by the chat format's rules on the conversation's roles and order.
        return bad_request(str(error), param="messages", code="invalid_conversation").response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, error: RequestValidationError) -> JSONResponse:
        return _validation_error(error).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, error: StarletteHTTPException) -> JSONResponse:
        message = error.detail if isinstance(error.detail, str) else "request failed"
        # FastAPI's one message for every body it could not read: say which way it failed.
        if isinstance(error.__cause__, UnicodeDecodeError):
            message = f"the request body is not valid JSON: JSON is UTF-8 text ({error.__cause__.reason})"
        elif isinstance(error.__cause__, RecursionError):
            message = "the request body is not valid JSON here: it is nested too deeply"
        if error.status_code == 404:
            message = "no such route; the API lives under /v1 (its schema: GET /openapi.json)"
        return APIError(error.status_code, message, headers=dict(error.headers or {})).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error while serving a request")
        return APIError(500, f"internal server error ({type(error).__name__}); see the server log").response()
