"""Request and response bodies of the OpenAI-compatible API (the subset this server implements).

Requests forbid unknown fields: an option the server does not implement is a clear 400,
never silently ignored. Options OpenAI defines but this server supports only at their neutral
value (`frequency_penalty=0`, no tools, ...) say so in the schema (`maximum: 0`, `maxItems: 0`,
`const`), so the OpenAPI document never advertises a value the server refuses.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    field_validator,
    model_serializer,
)

from reasoning_llama.sampling import (
    MAX_LOGPROBS,
    MAX_REPETITION_PENALTY,
    MAX_TEMPERATURE,
    MIN_REPETITION_PENALTY,
)
from reasoning_llama.tokenizer import N_VOCAB

MAX_CHOICES = 16  # n: choices per request, each its own request in the engine's batch
MAX_STOPS = 16  # OpenAI takes 4; lm-evaluation-harness adds its end-of-text string to a task's own 4
MAX_PROMPTS = 64  # prompts in one /v1/completions request (each times n choices within the capacity)
SEED_MODULUS = 2**63  # SamplingParams' seeds are [0, 2**63); the API takes any integer


def _integral(value: Any) -> Any:
    """JSON Schema's integers include 5.0; strict validation would refuse it."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# Constraints first, then the validator: pydantic then writes them into the schema as JSON Schema's.
_WHOLE = BeforeValidator(_integral)
AnyInt = Annotated[int, _WHOLE]
PositiveInt = Annotated[int, Field(ge=1), _WHOLE]
NonNegativeInt = Annotated[int, Field(ge=0), _WHOLE]
LogprobCount = Annotated[int, Field(ge=0, le=MAX_LOGPROBS), _WHOLE]
TokenId = Annotated[int, Field(ge=0, lt=N_VOCAB), _WHOLE]


def _well_formed(value: Any) -> Any:
    """A lone UTF-16 surrogate (JSON can escape one) as U+FFFD, as the tokenizer reads it in any other
    field: pydantic's checked strings would refuse it where plain ones pass it on."""
    return _SURROGATE.sub("\ufffd", value) if isinstance(value, str) else value


_SURROGATE = re.compile("[\ud800-\udfff]")  # a str holds a surrogate only alone (pairs are decoded)
CheckedText = Annotated[str, Field(min_length=1), BeforeValidator(_well_formed)]
StopString = CheckedText


def _is_integer(value: Any) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, float) and value.is_integer()
    )


class _Request(BaseModel):
    # Strict: JSON's own types only (no "5" or true for an integer), as the schema says.
    # No NaN or infinity: a NaN passes no bound, and its error would name the bound it failed.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    # "developer" is what newer OpenAI clients send for a system prompt.
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None  # accepted, not rendered
    # An earlier answer's reasoning as servers send it back (llama.cpp's name, and vLLM's/OpenRouter's):
    # accepted and not rendered, as the chat format drops earlier turns' reasoning (DESIGN.md §1).
    reasoning_content: str | None = None
    reasoning: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def chat_role(self) -> str:
        return "system" if self.role == "developer" else self.role


class StreamOptions(_Request):
    include_usage: bool = False


class ResponseFormat(_Request):
    type: Literal["text"] = Field(description="Only plain text: there is no JSON mode.")


# Rules between fields, in the schema as in the validators that enforce them.
_STREAM_OPTIONS_NEED_STREAM = {
    "if": {"properties": {"stream_options": {"type": "object"}}, "required": ["stream_options"]},
    "then": {"properties": {"stream": {"const": True}}, "required": ["stream"]},
}
_SEVERAL_PROMPTS_TAKE_ONE_CHOICE = {
    "if": {
        "properties": {"prompt": {"type": "array", "minItems": 2, "items": {"type": ["string", "array"]}}},
        "required": ["prompt"],
    },
    "then": {"properties": {"n": {"enum": [1, None]}}},
}
_TOP_LOGPROBS_NEED_LOGPROBS = {
    "if": {"properties": {"top_logprobs": {"type": "integer", "minimum": 1}}, "required": ["top_logprobs"]},
    "then": {"properties": {"logprobs": {"const": True}}, "required": ["logprobs"]},
}


class _Sampling(_Request):
    """Fields shared by chat and raw completions; extra fields (top_k ...) are this server's own."""

    model_config = ConfigDict(json_schema_extra={"allOf": [_STREAM_OPTIONS_NEED_STREAM]})

    model: str = Field(description="The served model's id (GET /v1/models).")
    temperature: float | None = Field(
        default=None,
        ge=0.0,
        le=MAX_TEMPERATURE,
        description="Left out or null: 0, greedy (OpenAI's default is 1), so n choices agree unless a "
        "temperature is given.",
    )
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    max_tokens: PositiveInt | None = Field(
        default=None,
        description="Generated tokens at most (reasoning, the assistant header and the answer together); "
        "the prompt plus this must fit in the model's context (else 400 context_length_exceeded).",
    )
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOPS)] | None = Field(
        default=None, description=f"Up to {MAX_STOPS} non-empty strings; applied to the answer."
    )
    seed: AnyInt | None = Field(
        default=None,
        description="Any integer; the sampler uses it modulo 2**63, and choice i of n uses seed + i.",
    )
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    top_k: NonNegativeInt | None = None
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(
        default=None, ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY
    )
    user: str | None = None  # an end-user id for the operator's logs; not used
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES), _WHOLE] | None = Field(
        default=1,
        description="Choices to generate, each its own request in the continuous batch.",
    )
    # OpenAI options this server supports only at their neutral value.
    frequency_penalty: float | None = Field(
        default=0.0, ge=0.0, le=0.0, description="Only 0: use repetition_penalty."
    )
    presence_penalty: float | None = Field(
        default=0.0, ge=0.0, le=0.0, description="Only 0: use repetition_penalty."
    )
    logit_bias: dict[str, float] | None = Field(default=None, max_length=0, description="Not supported.")

    @field_validator("stop", mode="before")
    @classmethod
    def _check_stop(cls, value: Any) -> Any:
        stops = [value] if isinstance(value, str) else value if isinstance(value, list) else []
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return value

    # Chat's `logprobs` and completions' `echo` are their subclasses' own fields.
    @field_validator(
        "stream", "n", "frequency_penalty", "presence_penalty", "logprobs", "echo", check_fields=False
    )
    @classmethod
    def _null_is_the_default(cls, value: Any, info: ValidationInfo) -> Any:
        """OpenAI's API takes null for an optional field as its default (these are nullable in the schema)."""
        return cls.model_fields[str(info.field_name)].default if value is None else value

    @field_validator("frequency_penalty", "presence_penalty", mode="before")
    @classmethod
    def _no_penalty(cls, value: Any) -> Any:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value:
            raise ValueError("frequency and presence penalties are not supported; use repetition_penalty")
        return value

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _no_bias(cls, value: Any) -> Any:
        if isinstance(value, dict) and value:
            raise ValueError("logit_bias is not supported")
        return value

    @field_validator("stream_options")
    @classmethod
    def _needs_stream(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return value

    def sampler_seed(self) -> int | None:
        return None if self.seed is None else self.seed % SEED_MODULUS

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Sampling):
    model_config = ConfigDict(
        json_schema_extra={"allOf": [_STREAM_OPTIONS_NEED_STREAM, _TOP_LOGPROBS_NEED_LOGPROBS]}
    )

    messages: list[ChatMessage] = Field(
        min_length=1,
        description="The conversation; it must end with a user message (else 400). System messages "
        "join the first user message; assistant messages' reasoning is not rendered.",
    )
    max_completion_tokens: PositiveInt | None = Field(
        default=None,
        description="max_tokens' newer name; with both, the smaller applies (each must fit the context).",
    )
    reasoning_budget: NonNegativeInt | None = Field(
        default=None, description="Reasoning tokens at most; then the engine closes the reasoning."
    )
    logprobs: bool | None = Field(
        default=False,
        description="Return each sampled token's log-probability: logprobs.content for the answer, "
        "logprobs.reasoning for the reasoning.",
    )
    top_logprobs: LogprobCount | None = Field(
        default=None,
        description="With logprobs: this many most likely tokens at each position.",
    )
    # OpenAI options this server supports only at their neutral value.
    tools: list[Any] | None = Field(default=None, max_length=0, description="Not supported.")
    tool_choice: Literal["none"] | None = None
    functions: list[Any] | None = Field(default=None, max_length=0, description="Not supported.")
    function_call: Literal["none"] | None = None
    response_format: ResponseFormat | None = None

    @field_validator("tools", "functions", mode="before")
    @classmethod
    def _no_tools(cls, value: Any) -> Any:
        if isinstance(value, list) and value:
            raise ValueError("tools and function calling are not supported by this model")
        return value

    @field_validator("tool_choice", "function_call", mode="before")
    @classmethod
    def _no_tool_choice(cls, value: Any) -> Any:
        if value not in (None, "none"):
            raise ValueError("tools and function calling are not supported by this model")
        return value

    @field_validator("response_format", mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        if isinstance(value, dict) and value.get("type") != "text":
            raise ValueError("only response_format {'type': 'text'} is supported")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return value

    def token_limits(self) -> dict[str, int]:
        limits = {"max_tokens": self.max_tokens, "max_completion_tokens": self.max_completion_tokens}
        return {name: value for name, value in limits.items() if value is not None}

    def logprobs_wanted(self) -> int | None:
        """SamplingParams.logprobs: None when off, else the alternatives per token."""
        return (self.top_logprobs or 0) if self.logprobs else None


PromptText = CheckedText
TokenIds = Annotated[list[TokenId], Field(min_length=1)]


class CompletionRequest(_Sampling):
    model_config = ConfigDict(
        json_schema_extra={"allOf": [_STREAM_OPTIONS_NEED_STREAM, _SEVERAL_PROMPTS_TAKE_ONE_CHOICE]}
    )

    prompt: (
        PromptText
        | Annotated[list[PromptText], Field(min_length=1, max_length=MAX_PROMPTS)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]
    ) = Field(
        description="A prompt, text (encoded as plain text, never special ids) or token ids, or a list of "
        "prompts all of one kind (then n is 1): one choice per prompt, in their order."
    )
    max_tokens: PositiveInt | None = 16  # OpenAI's default for raw completions
    echo: bool | None = Field(default=False, description="Return the prompt before the completion.")
    logprobs: LogprobCount | None = Field(
        default=None,
        description="Return each token's log-probability and this many most likely tokens at each "
        "position (the prompt's too with echo; its first token has none).",
    )
    suffix: str | None = Field(default=None, max_length=0, description="Not supported.")

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompts(cls, value: Any, info: ValidationInfo) -> Any:
        """Say what is wrong in words (the union's own errors list every branch)."""
        several = isinstance(value, list) and bool(value) and isinstance(value[0], (str, list))
        if several and len(value) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request, got {len(value)}")
        if several and len(value) > 1 and info.data.get("n", 1) != 1:
            raise ValueError(
                "several prompts in one request take n = 1; send a prompt alone for more choices"
            )
        for i, one in enumerate(value if several else [value]):
            where = f"prompt {i}: " if several else ""
            if several and type(one) is not type(value[0]) and isinstance(one, (str, list)):
                raise ValueError(f"{where}a list of prompts holds texts or lists of token ids, not both")
            if one in ("", []):
                raise ValueError(f"{where}the prompt is empty")
            if isinstance(one, list) and all(_is_integer(t) for t in one):
                if not all(0 <= t < N_VOCAB for t in one):
                    raise ValueError(f"{where}token ids must be in [0, {N_VOCAB})")
            elif not isinstance(one, str):
                raise ValueError(f"{where}give a string, a list of token ids, or a list of either")
        return value

    @field_validator("suffix", mode="before")
    @classmethod
    def _no_suffix(cls, value: Any) -> Any:
        if value:
            raise ValueError("suffix is not supported")
        return value

    def token_limits(self) -> dict[str, int]:
        return {} if self.max_tokens is None else {"max_tokens": self.max_tokens}

    def prompts(self) -> list[str | list[int]]:
        """Every prompt (text or token ids), one when a single one was sent."""
        prompt = self.prompt
        if isinstance(prompt, list) and isinstance(prompt[0], (str, list)):
            return list(prompt)
        return [prompt]  # type: ignore[list-item]


# --- responses ------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error envelope: every status other than 200."""

    error: ErrorDetail


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int


class Usage(BaseModel):
    """Tokens of the prompt (counted once) and of every choice together."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    completion_tokens_details: CompletionTokensDetails


class TopLogprob(BaseModel):
    token: str = Field(
        description="The token's text; `bytes:\\xNN` for part of a character; a special id's name."
    )
    logprob: float
    bytes: list[int] | None = Field(description="The token's UTF-8 bytes; null for a special id.")


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = Field(
        default=None, description="The answer's sampled tokens, its closing end token included."
    )
    reasoning: list[ChatTokenLogprob] | None = Field(
        default=None, description="The reasoning's sampled tokens (this server's extension)."
    )
    refusal: None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    reasoning_content: str = Field(description="The reasoning (llama.cpp's name for it).")
    reasoning: str = Field(description="The reasoning again (vLLM's and OpenRouter's name).")


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None

    @model_serializer(mode="wrap")
    def _only_set(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """A delta carries only what changed, as OpenAI's do."""
        return {k: v for k, v in handler(self).items() if v is not None}


class ChunkChoice(BaseModel):
    index: int
    delta: ChunkDelta
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy shape: parallel lists, one entry per token."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class TextChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "reasoning-llama"
    context_length: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok", "stopped"]
    model: str
    max_context: int
    default_max_tokens: int  # a reply's limit when a request gives none (capped by the context)
    slots: int
    active_slots: int
    waiting: int
    in_flight: int
    api_key_required: bool
    last_error: str | None
