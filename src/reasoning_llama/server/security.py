"""Who may call the API (a bearer key compared in constant time) and how big a request may be."""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from reasoning_llama.server.errors import APIError


class ApiKeyCheck:
    """ASGI middleware: with a key configured, the API (`/v1/...`) demands `Authorization: Bearer
    <key>`, before anything reads the request's body (an unauthorised caller learns nothing of it)."""

    def __init__(self, app: ASGIApp, api_key: str | None, prefix: str = "/v1") -> None:
        self.app = app
        self.expected = api_key.encode() if api_key else None
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        guarded = path == self.prefix or path.startswith(self.prefix + "/")
        if scope["type"] != "http" or self.expected is None or not guarded:
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            error = APIError(
                401, "missing API key: send the header 'Authorization: Bearer <key>'", code="invalid_api_key"
            )
        # compare_digest takes time independent of where the strings differ.
        elif not hmac.compare_digest(token.strip().encode("latin-1"), self.expected):
            error = APIError(401, "incorrect API key provided", code="invalid_api_key")
        else:
            await self.app(scope, receive, send)
            return
        await error.response()(scope, receive, send)


class BodySizeLimit:
    """ASGI middleware: answer 413 to a request body over `max_bytes` (declared or streamed)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(scope, receive, send)
            return
        # Read the whole (bounded) body first, then replay it to the app; later
        # receives pass through so the app still learns about a disconnect.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, _replay([message], receive), send)
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._reject(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body: Message = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([body], receive), send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = APIError(413, f"the request body is larger than the server's limit of {self.max_bytes} bytes")
        await error.response()(scope, receive, send)


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replayed() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed
