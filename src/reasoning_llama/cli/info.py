"""`info` and `tokenize`: look at a model's shape and at token ids."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from reasoning_llama.cli.model_dir import resolve_model_dir
from reasoning_llama.config import get_preset
from reasoning_llama.errors import ConfigError
from reasoning_llama.model_files import load_config


def info(
    preset: Annotated[str | None, typer.Option(help="A named preset, e.g. small-100m or tiny.")] = None,
    checkpoint: Annotated[
        Path | None, typer.Option(help="A checkpoint directory, or a run directory (its best model).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Print a model's config and its parameter count broken down by part."""
    import torch

    from reasoning_llama.model import Transformer

    if (preset is None) == (checkpoint is None):
        raise ConfigError("give exactly one of --preset or --checkpoint")
    directory = None if checkpoint is None else resolve_model_dir(checkpoint)  # a run's: its best/
    config = get_preset(preset) if preset is not None else load_config(directory)
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = Transformer(config)
    report = {
        "source": preset or str(directory),
        "config": config.to_dict(),
        "parameters": model.parameter_breakdown(),
    }
    if as_json:
        print(json.dumps(report))
        return
    typer.echo(f"{report['source']}:")
    for key, value in report["config"].items():
        typer.echo(f"  {key:<14} {value}")
    typer.echo("parameters:")
    for part, count in report["parameters"].items():
        typer.echo(f"  {part:<14} {count:>13,}")


def tokenize(
    text: Annotated[str, typer.Argument(help="Plain text; special tokens are never produced from it.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Print the GPT-2 BPE ids of TEXT."""
    from reasoning_llama.tokenizer import get_tokenizer

    tokenizer = get_tokenizer()
    ids = tokenizer.encode(text)
    if as_json:
        print(json.dumps({"text": text, "ids": ids, "tokens": [tokenizer.decode([i]) for i in ids]}))
    else:
        typer.echo(" ".join(map(str, ids)))


def register(app: typer.Typer) -> None:
    app.command()(info)
    app.command()(tokenize)
