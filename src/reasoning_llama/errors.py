"""One exception type per family of failure; the CLI prints their message as one line."""


class ReasoningLlamaError(Exception):
    """Base class: a problem the user can fix, described in the message."""


class ConfigError(ReasoningLlamaError):
    """A configuration value or file is wrong."""


class TokenizerError(ReasoningLlamaError):
    """The GPT-2 ranks cannot be obtained or verified."""


class DataError(ReasoningLlamaError):
    """Input data is missing or malformed."""


class CheckpointError(ReasoningLlamaError):
    """A checkpoint directory is missing, incomplete or does not match its config."""


class RequestError(ReasoningLlamaError):
    """A generation request is invalid (empty prompt, over the context, bad sampling values)."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code

    @classmethod
    def context_exceeded(
        cls, prompt_tokens: int, limit_name: str, limit: int, context: int
    ) -> "RequestError":
        """The prompt plus a token limit (`max_new_tokens`, or the API's names for it) beyond the context."""
        return cls(
            f"the prompt ({_tokens(prompt_tokens)}) plus {limit_name} ({limit}) is {prompt_tokens + limit} "
            f"tokens, beyond the model's context of {context}; shorten the prompt or lower {limit_name}",
            param=limit_name,
            code="context_length_exceeded",
        )

    @classmethod
    def no_room(cls, prompt_tokens: int, context: int, param: str) -> "RequestError":
        """The prompt alone fills the context (no token limit was given: none is to blame)."""
        return cls(
            f"the prompt ({_tokens(prompt_tokens)}) fills the model's context of {context}, leaving no "
            "room for a reply; shorten the prompt",
            param=param,
            code="context_length_exceeded",
        )


def _tokens(count: int) -> str:
    return f"{count} token" if count == 1 else f"{count} tokens"
