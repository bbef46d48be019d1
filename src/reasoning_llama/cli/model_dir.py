"""How every command names a model: a checkpoint directory, or a run directory (its best model, else
its latest checkpoint)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from reasoning_llama.errors import CheckpointError
from reasoning_llama.model_files import CONFIG

ModelDir = Annotated[
    Path,
    typer.Option(
        "--checkpoint",
        help="A checkpoint directory, or a run directory (its best model, else its latest checkpoint).",
    ),
]


def resolve_model_dir(path: Path) -> Path:
    """The checkpoint directory `path` names (see the module docstring)."""
    from reasoning_llama.training import run_checkpoints as ckpt

    path = path.expanduser()
    if path.name == ckpt.LATEST and path.is_file():  # RUN/latest, the pointer: the run's latest checkpoint
        latest = ckpt.latest_checkpoint(path.parent)
        if latest is not None:
            return latest
        path = path.parent
    if (path / CONFIG).is_file():
        return path
    if (path / ckpt.BEST / CONFIG).is_file():
        return path / ckpt.BEST
    latest = ckpt.latest_checkpoint(path) if path.is_dir() else None
    if latest is not None:
        return latest
    if not path.exists():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    raise CheckpointError(f"{path} is neither a checkpoint (no {CONFIG}) nor a run directory with one")


def model_dir_argument(value: str) -> Path:
    """`resolve_model_dir` as an argparse `type=` (the benchmarks' flags): its error as argparse's."""
    import argparse

    try:
        return resolve_model_dir(Path(value))
    except CheckpointError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
