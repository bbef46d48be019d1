"""The FastAPI app: OpenAI-compatible routes over one engine, metrics, health and the chat page."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.metadata
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from importlib.resources import files
from types import FrameType
from typing import Any

import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from reasoning_llama.errors import RequestError
from reasoning_llama.generation import Delta, Engine, GenerationResult
from reasoning_llama.sampling import SamplingParams, TokenLogprob
from reasoning_llama.server.errors import APIError, bad_request, from_request_error, install_error_handlers
from reasoning_llama.server.logprobs import CompletionLogprobsBuilder, chat_logprobs, joined
from reasoning_llama.server.metrics import ServerMetrics
from reasoning_llama.server.openapi import error_responses, generation_responses, install_openapi
from reasoning_llama.server.schemas import (
    SEED_MODULUS,
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkChoice,
    ChunkDelta,
    Completion,
    CompletionLogprobs,
    CompletionRequest,
    CompletionTokensDetails,
    Health,
    ModelCard,
    ModelList,
    TextChoice,
    Usage,
)
from reasoning_llama.server.security import ApiKeyCheck, BodySizeLimit
from reasoning_llama.server.settings import ServerSettings
from reasoning_llama.server.worker import EngineFailed, EngineWorker, Job, QueueFull, ShuttingDown
from reasoning_llama.tokenizer import ChatTokenizer

STATIC_DIR = files("reasoning_llama.server") / "static"
# The page loads nothing but its own files and talks to nothing but this server.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def begin_shutdown(app: FastAPI, grace_s: float = 0.0) -> None:
    """A shutdown's first step, for a signal handler: no new request is taken, and those running get
    `grace_s` seconds to finish; then each left gets "the server is shutting down" (503; a stream as
    its last event, then [DONE])."""
    app.state.server.worker.begin_stop(grace_s)


class Server(uvicorn.Server):
    """uvicorn serving an app of `create_app`, but a shutdown signal first tells the worker
    (`begin_shutdown`), which ends what is still running a second before uvicorn's grace period does:
    uvicorn alone would cut open streams off without a word."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        grace = self.config.timeout_graceful_shutdown
        begin_shutdown(self.config.app, math.inf if grace is None else max(0.0, grace - 1.0))
        super().handle_exit(sig, frame)


def create_app(engine: Engine, settings: ServerSettings | None = None) -> FastAPI:
    """An app serving `engine`; its worker thread runs while the app is up (lifespan)."""
    settings = settings or ServerSettings()
    state = _ServerState(engine, settings)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.worker.start()
        try:
            yield
        finally:
            state.worker.stop()

    # No /docs or /redoc: FastAPI's pages load their scripts from a CDN; /openapi.json stays.
    app = FastAPI(
        title="reasoning-llama",
        version=importlib.metadata.version("reasoning-llama"),
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.server = state
    install_error_handlers(app)
    app.include_router(_api_router(state), prefix="/v1")
    app.include_router(_service_router(state))
    app.mount("/static", StaticFiles(directory=str(STATIC_DIR)), name="static")
    install_openapi(
        app,
        settings,
        max_context=engine.max_context,
        shortest_chat_prompt=len(state.tokenizer.render_prompt([{"role": "user", "content": ""}])),
        capacity=state.worker.capacity,
    )
    # The last added runs first: count every answer (401s and 413s too); check the key before
    # reading the body; refuse big bodies before parsing them.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(ApiKeyCheck, api_key=settings.api_key)
    app.add_middleware(_CountRequests, metrics=state.metrics)
    return app


class _ServerState:
    """What the routes share: the engine, its worker, the tokenizer, limits and metrics."""

    def __init__(self, engine: Engine, settings: ServerSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.tokenizer: ChatTokenizer = engine.tokenizer
        self.metrics = ServerMetrics()
        self.worker = EngineWorker(engine, max_queue=settings.max_queue, on_finish=self.record)
        self.metrics.watch_engine(lambda: self.worker.waiting, lambda: self.worker.active)
        self.created = int(time.time())

    def check_model(self, model: str) -> None:
        if model != self.settings.model_name:
            raise APIError(
                404,
                f"model {model!r} does not exist; this server serves {self.settings.model_name!r} "
                "(see GET /v1/models)",
                param="model",
                code="model_not_found",
            )

    def check_size(self, n_messages: int, n_chars: int, *, param: str = "messages") -> None:
        limits = self.settings
        if n_messages > limits.max_messages:
            raise bad_request(
                f"too many messages: {n_messages} > the server's limit of {limits.max_messages}",
                param="messages",
                code="too_many_messages",
            )
        if n_chars > limits.max_total_chars:
            raise bad_request(
                f"the prompt text is too long: {n_chars} characters > the server's limit of "
                f"{limits.max_total_chars}",
                param=param,
                code="prompt_too_long",
            )

    def sampling_params(
        self, body: ChatCompletionRequest | CompletionRequest, prompt_len: int, **own: Any
    ) -> SamplingParams:
        """The request's sampling fields, plus `own` (what only one route has)."""
        limits = body.token_limits()
        context = self.engine.max_context
        for name, value in limits.items():  # each one given must fit, not only the one that applies
            if prompt_len + value > context:
                raise from_request_error(RequestError.context_exceeded(prompt_len, name, value, context))
        if limits:
            max_tokens = min(limits.values())
        else:  # as much as fits, up to the server's default
            param = "messages" if isinstance(body, ChatCompletionRequest) else "prompt"
            try:
                room = self.engine.room_for_reply(prompt_len, param=param)
            except RequestError as e:
                raise from_request_error(e) from None
            max_tokens = min(self.settings.default_max_tokens, room)
        values: dict[str, Any] = {
            "max_new_tokens": max_tokens,
            "stop": body.stop_list(),
            "seed": body.sampler_seed(),
        }
        for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
            if getattr(body, name) is not None:
                values[name] = getattr(body, name)
        return SamplingParams(**values, **own)

    def submit(self, prompts: Sequence[tuple[list[int], SamplingParams]], n: int = 1) -> list[Job]:
        """One engine request per choice of each (prompt ids, params), all queued or none: prompt by
        prompt, n choices each; choice i samples with seed + i."""
        if len(prompts) * n > self.worker.capacity:  # never fits, however idle: a 400, as the schema says
            param = "prompt" if len(prompts) > 1 else "n"
            raise bad_request(
                f"{param}: at most {self.worker.capacity} choices on this server (its slots plus queue places)",
                param=param,
            )
        choices = []
        for prompt_ids, params in prompts:
            try:
                self.engine.check_request(prompt_ids, params)  # sampling values, empty prompt, context
            except RequestError as e:
                raise from_request_error(e) from None
            for i in range(n):
                seed = None if params.seed is None or i == 0 else (params.seed + i) % SEED_MODULUS
                choices.append((prompt_ids, dataclasses.replace(params, seed=seed) if i else params))
        try:
            jobs = self.worker.submit_all(choices)
        except ShuttingDown as e:
            raise _failure(e, self.settings) from None
        except QueueFull as e:
            raise APIError(
                503,
                f"the server is at capacity ({e}); retry in a moment",
                code="server_overloaded",
                headers={"Retry-After": str(self.settings.retry_after_s)},
            ) from None
        self.metrics.prompt_tokens.inc(sum(len(ids) for ids, _ in prompts) * n)
        return jobs

    def record(self, job: Job, result: GenerationResult) -> None:
        self.metrics.record_generation(result)


def _usage(prompt: int, results: Sequence[GenerationResult]) -> Usage:
    """The prompts' tokens, each prompt once (as OpenAI counts them), the completions of every choice."""
    completion = sum(r.completion_tokens for r in results)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        completion_tokens_details=CompletionTokensDetails(
            reasoning_tokens=sum(r.reasoning_tokens for r in results)
        ),
    )


def _sse(payload: Mapping[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def _chunk_json(chunk: ChatCompletionChunk | Completion, include_usage: bool) -> str:
    return chunk.model_dump_json(exclude=None if include_usage else {"usage"})


async def _until_disconnect(request: Request, jobs: Sequence[Job]) -> None:
    """Cancel `jobs` when the client goes away (the body has been read, so the next message says so)."""
    while True:
        message: Message = await request.receive()
        if message["type"] == "http.disconnect":
            for job in jobs:
                job.cancel()
            return


def _failure(error: EngineFailed | QueueFull, settings: ServerSettings) -> APIError:
    """What the worker reports in a job's stream, as the client sees it."""
    if isinstance(error, QueueFull):  # the server is shutting down
        return APIError(503, str(error), headers={"Retry-After": str(settings.retry_after_s)})
    return APIError(500, str(error))


async def _merged(jobs: Sequence[Job]) -> AsyncIterator[tuple[int, Delta | GenerationResult]]:
    """The events of the choices' jobs as they come, with each one's index; ends after the last result.

    Leaving early (or a failure) cancels the jobs still running.
    """
    queue: asyncio.Queue[tuple[int, Delta | GenerationResult | BaseException]] = asyncio.Queue()

    async def forward(index: int, job: Job) -> None:
        try:
            async for event in job.results():
                queue.put_nowait((index, event))
        except (EngineFailed, QueueFull) as e:
            queue.put_nowait((index, e))

    tasks = [asyncio.create_task(forward(i, job)) for i, job in enumerate(jobs)]
    try:
        running = len(jobs)
        while running:
            index, event = await queue.get()
            if isinstance(event, BaseException):
                raise event
            yield index, event
            if isinstance(event, GenerationResult):
                running -= 1
    finally:
        for task in tasks:
            task.cancel()
        for job in jobs:
            job.cancel()


async def _collect(state: _ServerState, request: Request, jobs: Sequence[Job]) -> list[GenerationResult]:
    """Wait for every choice's result, cancelling the jobs if the client disconnects first."""
    watcher = asyncio.create_task(_until_disconnect(request, jobs))
    results: dict[int, GenerationResult] = {}
    try:
        async for index, event in _merged(jobs):
            if isinstance(event, GenerationResult):
                results[index] = event
    except (EngineFailed, QueueFull) as e:
        raise _failure(e, state.settings) from None
    finally:
        watcher.cancel()
    return [results[i] for i in range(len(jobs))]


def _api_router(state: _ServerState) -> APIRouter:
    router = APIRouter()
    settings = state.settings

    @router.get("/models", responses=error_responses(401))
    async def list_models() -> ModelList:
        return ModelList(data=[_model_card(state)])

    @router.get("/models/{model_id}", responses=error_responses(401, 404))
    async def get_model(model_id: str) -> ModelCard:
        state.check_model(model_id)
        return _model_card(state)

    @router.post(
        "/chat/completions",
        response_model=None,
        responses=generation_responses(ChatCompletion, ChatCompletionChunk),
    )
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> ChatCompletion | Response:
        state.check_model(body.model)
        messages = [{"role": m.chat_role(), "content": m.text()} for m in body.messages]
        state.check_size(len(messages), sum(len(m["content"]) for m in messages))
        prompt_ids = state.tokenizer.render_prompt(messages)  # a TokenizerError is a 400
        params = state.sampling_params(
            body, len(prompt_ids), reasoning_budget=body.reasoning_budget, logprobs=body.logprobs_wanted()
        )
        jobs = state.submit([(prompt_ids, params)], body.n)
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            events = _chat_stream(state, jobs, completion_id, created, body.include_usage(), len(prompt_ids))
            return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)
        results = await _collect(state, request, jobs)
        choices = [
            ChatChoice(
                index=index,
                message=AssistantMessage(
                    content=result.answer, reasoning_content=result.reasoning, reasoning=result.reasoning
                ),
                finish_reason=result.finish_reason,
                logprobs=None if result.logprobs is None else chat_logprobs(state.tokenizer, result.logprobs),
            )
            for index, result in enumerate(results)
        ]
        return ChatCompletion(
            id=completion_id,
            created=created,
            model=settings.model_name,
            choices=choices,
            usage=_usage(len(prompt_ids), results),
        )

    @router.post("/completions", response_model=None, responses=generation_responses(Completion, Completion))
    async def completions(body: CompletionRequest, request: Request) -> Completion | Response:
        state.check_model(body.model)
        prompts = []  # (ids, text) of each prompt
        for prompt in body.prompts():
            if isinstance(prompt, str):
                prompts.append((state.tokenizer.encode(prompt), prompt))  # plain BPE: never a special id
            else:
                prompts.append((list(prompt), state.tokenizer.decode(prompt)))

        def prompt_params(index: int, ids: list[int]) -> SamplingParams:
            try:
                return state.sampling_params(body, len(ids), raw=True, logprobs=body.logprobs)
            except APIError as e:
                if len(prompts) > 1:  # say which of the prompts
                    e.message = f"prompt {index}: {e.message}"
                raise

        state.check_size(1, sum(len(text) for _, text in prompts), param="prompt")
        jobs = state.submit([(ids, prompt_params(i, ids)) for i, (ids, _) in enumerate(prompts)], body.n)
        echoes: list[_Echo | None] = [None] * len(jobs)
        if body.echo:
            try:
                for p, (ids, text) in enumerate(prompts):
                    entries = None
                    if body.logprobs is not None:
                        scored = await asyncio.to_thread(state.engine.prompt_logprobs, ids, body.logprobs)
                        entries = [None, *scored]  # nothing predicts the first token
                    echoes[p * body.n : (p + 1) * body.n] = [_Echo(text, ids, entries)] * body.n
            except BaseException:  # the choices already queued would run for nobody
                for job in jobs:
                    job.cancel()
                raise
        prompt_tokens = sum(len(ids) for ids, _ in prompts)
        completion_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            events = _completion_stream(
                state, jobs, completion_id, created, body.include_usage(), echoes, prompt_tokens
            )
            return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)
        results = await _collect(state, request, jobs)
        choices = []
        for index, (result, echo) in enumerate(zip(results, echoes, strict=True)):
            builder = CompletionLogprobsBuilder(state.tokenizer)
            parts = [] if echo is None else echo.logprobs(builder)
            text = result.answer if echo is None else echo.text + result.answer
            logprobs = None
            if result.logprobs is not None:
                answer = result.logprobs["answer"]
                logprobs = joined([*parts, builder.add([e.token for e in answer], answer)])
            choices.append(
                TextChoice(index=index, text=text, finish_reason=result.finish_reason, logprobs=logprobs)
            )
        return Completion(
            id=completion_id,
            created=created,
            model=settings.model_name,
            choices=choices,
            usage=_usage(prompt_tokens, results),
        )

    return router


class _Echo:
    """The prompt a completion echoes before its text, with its tokens' logprobs when asked for."""

    def __init__(self, text: str, ids: list[int], entries: list[TokenLogprob | None] | None) -> None:
        self.text, self.ids, self.entries = text, ids, entries

    def logprobs(self, builder: CompletionLogprobsBuilder) -> list[CompletionLogprobs]:
        return [] if self.entries is None else [builder.add(self.ids, self.entries)]


def _model_card(state: _ServerState) -> ModelCard:
    return ModelCard(
        id=state.settings.model_name, created=state.created, context_length=state.engine.max_context
    )


async def _chat_stream(
    state: _ServerState,
    jobs: Sequence[Job],
    completion_id: str,
    created: int,
    include_usage: bool,
    prompt_tokens: int,
) -> AsyncIterator[str]:
    """OpenAI's chunk sequence: each choice's role, then reasoning/content deltas, each choice's
    finish, the usage of all, [DONE]."""

    def chunk(index: int, delta: ChunkDelta, finish_reason: str | None = None, **extra: Any) -> str:
        choice = ChunkChoice(index=index, delta=delta, finish_reason=finish_reason, **extra)
        body = ChatCompletionChunk(
            id=completion_id, created=created, model=state.settings.model_name, choices=[choice]
        )
        return _sse(_chunk_json(body, include_usage))

    for index in range(len(jobs)):
        yield chunk(index, ChunkDelta(role="assistant", content=""))
    results = []
    try:
        async for index, event in _merged(jobs):
            if isinstance(event, Delta):
                logprobs = {}
                if event.logprobs:
                    logprobs["logprobs"] = chat_logprobs(state.tokenizer, {event.kind: event.logprobs})
                if event.kind == "reasoning":
                    delta = ChunkDelta(reasoning_content=event.text, reasoning=event.text)
                else:
                    delta = ChunkDelta(content=event.text)
                yield chunk(index, delta, **logprobs)
                continue
            results.append(event)
            yield chunk(index, ChunkDelta(), event.finish_reason)
        if include_usage:
            usage = ChatCompletionChunk(
                id=completion_id,
                created=created,
                model=state.settings.model_name,
                choices=[],
                usage=_usage(prompt_tokens, results),
            )
            yield _sse(usage.model_dump_json())
    except (EngineFailed, QueueFull) as e:
        yield _sse(_failure(e, state.settings).body())
    yield _sse("[DONE]")


async def _completion_stream(
    state: _ServerState,
    jobs: Sequence[Job],
    completion_id: str,
    created: int,
    include_usage: bool,
    echoes: Sequence[_Echo | None],
    prompt_tokens: int,
) -> AsyncIterator[str]:
    """OpenAI's text_completion chunks: each choice's echoed prompt (if asked), the raw continuation's
    pieces, each choice's finish, the usage of all, [DONE]."""

    def chunk(choices: list[TextChoice], usage: Usage | None = None) -> str:
        body = Completion(
            id=completion_id, created=created, model=state.settings.model_name, choices=choices, usage=usage
        )
        return _sse(_chunk_json(body, include_usage))

    builders = [CompletionLogprobsBuilder(state.tokenizer) for _ in jobs]
    for index, (builder, echo) in enumerate(zip(builders, echoes, strict=True)):
        if echo is not None:
            logprobs = echo.logprobs(builder)
            yield chunk([TextChoice(index=index, text=echo.text, logprobs=logprobs[0] if logprobs else None)])
    results = []
    try:
        async for index, event in _merged(jobs):
            if isinstance(event, Delta):  # raw mode: every delta is continuation text
                logprobs = None
                if event.logprobs:
                    logprobs = builders[index].add([e.token for e in event.logprobs], event.logprobs)
                yield chunk([TextChoice(index=index, text=event.text, logprobs=logprobs)])
                continue
            results.append(event)
            yield chunk([TextChoice(index=index, text="", finish_reason=event.finish_reason)])
        if include_usage:
            yield chunk([], _usage(prompt_tokens, results))
    except (EngineFailed, QueueFull) as e:
        yield _sse(_failure(e, state.settings).body())
    yield _sse("[DONE]")


def _service_router(state: _ServerState) -> APIRouter:
    router = APIRouter()

    @router.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(str(STATIC_DIR / "index.html"), headers=PAGE_HEADERS)

    @router.get(
        "/health",
        response_model=Health,
        responses={503: {"model": Health, "description": "The engine's worker is not running."}},
    )
    async def health() -> JSONResponse:
        """503 only when the engine worker is not running; a past engine error is reported, not fatal."""
        worker = state.worker
        report = Health(
            status="ok" if worker.alive else "stopped",
            model=state.settings.model_name,
            max_context=state.engine.max_context,
            default_max_tokens=state.settings.default_max_tokens,
            slots=state.engine.max_batch_size,
            active_slots=worker.active,
            waiting=worker.waiting,
            in_flight=worker.outstanding,
            api_key_required=state.settings.api_key is not None,
            last_error=worker.last_error,
        )
        return JSONResponse(status_code=200 if worker.alive else 503, content=report.model_dump())

    @router.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return router


_ROUTES: Sequence[str] = ("/v1/chat/completions", "/v1/completions", "/v1/models")


class _CountRequests:
    """ASGI middleware: count API answers by route and status (other paths as 'other')."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        route = next((r for r in _ROUTES if path == r or path.startswith(r + "/")), None)
        if route is None:
            await self.app(scope, receive, send)
            return

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(route, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)
