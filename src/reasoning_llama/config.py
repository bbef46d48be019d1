"""Model configuration and named presets."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reasoning_llama.errors import ConfigError

# GPT-2's 50,257 ids plus the six chat ids of DESIGN.md §1.
DEFAULT_VOCAB_SIZE = 50263


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the decoder-only transformer (DESIGN.md §2)."""

    vocab_size: int = DEFAULT_VOCAB_SIZE
    dim: int = 768
    n_layers: int = 6
    n_heads: int = 8
    n_kv_heads: int = 4
    ffn_dim: int = 768
    max_seq_len: int = 1280
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # The seed's extra SwiGLU block between the final norm and the head. With it off
    # the model is exactly transformers' LlamaForCausalLM.
    final_block: bool = True
    init_std: float = 0.02

    def __post_init__(self) -> None:
        problems = []
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_heads > 0 and self.dim % self.n_heads:
            problems.append(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.n_kv_heads > 0 and self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.n_heads > 0 and (self.dim // self.n_heads) % 2:
            problems.append(f"head dim ({self.dim // self.n_heads}) must be even for RoPE")
        if problems:
            raise ConfigError("invalid model config: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown model config keys: {', '.join(unknown)}")
        return cls(**values)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        try:
            values = json.loads(Path(path).read_text())
        except FileNotFoundError as e:
            raise ConfigError(f"model config not found: {path}") from e
        except json.JSONDecodeError as e:
            raise ConfigError(f"model config {path} is not valid JSON: {e}") from e
        if not isinstance(values, dict):
            raise ConfigError(f"model config {path} must hold a JSON object")
        return cls.from_dict(values)


PRESETS: dict[str, ModelConfig] = {
    # The reference model, "Reasoning-LLaMA-Small": 100,217,088 parameters.
    "small-100m": ModelConfig(),
    # For CPU work and the quickstart: most of its parameters are the 50,263-way
    # embedding and head, so the trunk can stay small.
    "tiny": ModelConfig(dim=192, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=512, max_seq_len=512),
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None
