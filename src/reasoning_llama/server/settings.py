"""What an operator can tune about the server: where it listens, who may call it, how much it accepts."""

from __future__ import annotations

from dataclasses import dataclass

from reasoning_llama.errors import ConfigError


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"  # loopback unless the operator asks for more
    port: int = 8000
    api_key: str | None = None  # when set, /v1/* needs `Authorization: Bearer <key>`
    model_name: str = "reasoning-llama"  # the id /v1/models lists and requests must name
    max_queue: int = 32  # requests waiting beyond the engine's slots before 503
    max_body_bytes: int = 1_000_000
    max_messages: int = 256
    max_total_chars: int = 200_000  # over all message contents (or the raw prompt)
    default_max_tokens: int = 512  # when a request gives no max_tokens (capped by the context)
    retry_after_s: int = 1  # the Retry-After a 503 suggests

    def __post_init__(self) -> None:
        problems = []
        if not 0 <= self.port <= 65535:
            problems.append(f"port must be in 0..65535, got {self.port}")
        if self.api_key is not None and not self.api_key:
            problems.append("api_key must not be empty (leave it unset for no authentication)")
        if not self.model_name:
            problems.append("model_name must not be empty")
        for name in ("max_body_bytes", "max_messages", "max_total_chars", "default_max_tokens"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("max_queue", "retry_after_s"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if problems:
            raise ConfigError("invalid server settings: " + "; ".join(problems))
