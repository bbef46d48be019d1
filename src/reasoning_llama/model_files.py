"""Model checkpoint directories (DESIGN.md §4): model.safetensors + config.json + tokenizer.json.

Writes are atomic (`atomic.write_dir`), so a crash mid-write never leaves a half-written checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from reasoning_llama import atomic
from reasoning_llama.config import ModelConfig
from reasoning_llama.errors import CheckpointError, ConfigError
from reasoning_llama.model import Transformer, uninitialised_transformer
from reasoning_llama.tokenizer import ChatTokenizer

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def write_model_files(
    directory: Path, model: Transformer, state: dict[str, torch.Tensor] | None = None
) -> None:
    """Write weights, config and tokenizer description into an existing directory.

    state: the weights to write instead of `model.state_dict()` (e.g. gathered from shards).
    """
    state = model.state_dict() if state is None else state
    state = {name: t.detach().contiguous().cpu() for name, t in state.items()}
    save_file(state, str(directory / WEIGHTS), metadata={"format": "pt"})
    model.config.save(directory / CONFIG)
    ChatTokenizer.save(directory)


def save_model(directory: str | Path, model: Transformer) -> Path:
    """Atomically write a model checkpoint directory."""
    return atomic.write_dir(directory, lambda tmp: write_model_files(tmp, model))


def weights_digest(directory: str | Path) -> str:
    """sha256 of a checkpoint's weights file: what tells two models of the same shape apart."""
    digest = hashlib.sha256()
    with open(Path(directory) / WEIGHTS, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def load_config(directory: str | Path) -> ModelConfig:
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    if not (directory / CONFIG).is_file():
        raise CheckpointError(f"{directory} has no {CONFIG}; is it a checkpoint directory?")
    try:
        return ModelConfig.load(directory / CONFIG)
    except ConfigError as e:
        if _is_transformers_config(directory / CONFIG):
            raise CheckpointError(
                f"{directory} is a transformers model, not a reasoning-llama checkpoint; convert it with: "
                f"reasoning-llama import --from hf {shlex.quote(str(directory))} --out DIR"
            ) from None
        raise CheckpointError(str(e)) from None


def _is_transformers_config(path: Path) -> bool:
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(values, dict) and "model_type" in values


def load_model(
    directory: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> Transformer:
    """Build the model from `config.json` and load `model.safetensors` (no pickle involved)."""
    directory = Path(directory)
    config = load_config(directory)
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{directory} has no {WEIGHTS}")
    ChatTokenizer.check_compatible(directory)
    try:
        state = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {weights}: {e}") from None
    model = uninitialised_transformer(config)
    check_state_dict(model, state, what=f"{weights} does not match {directory / CONFIG}")
    model.load_state_dict(state, assign=True)
    model.to(device)  # the RoPE tables, which the file does not hold
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def check_state_dict(model: Transformer, state: dict[str, torch.Tensor], *, what: str) -> None:
    """Raise a CheckpointError, prefixed by `what`, naming missing, unexpected and misshapen tensors."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k} {tuple(state[k].shape)} vs config {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]

    def first(names: list[str]) -> str:
        return ", ".join(names[:3]) + (" ..." if len(names) > 3 else "")

    parts = [f"missing {first(missing)}"] if missing else []
    parts += [f"unexpected {first(unexpected)}"] if unexpected else []
    parts += [f"shape mismatch: {'; '.join(wrong[:3])}"] if wrong else []
    if parts:
        raise CheckpointError(f"{what}: " + "; ".join(parts))
