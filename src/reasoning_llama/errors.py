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
