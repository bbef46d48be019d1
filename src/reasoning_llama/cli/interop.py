"""`export` and `import`: move weights to and from the transformers (HF) Llama format."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from reasoning_llama.cli.model_dir import ModelDir, resolve_model_dir
from reasoning_llama.errors import ConfigError

FORMATS = ("hf",)


def _check_format(value: str) -> None:
    if value not in FORMATS:
        raise ConfigError(f"unknown format {value!r}; supported: {', '.join(FORMATS)}")


def export(
    out: Annotated[Path, typer.Argument(metavar="OUT", help="The directory to write.")],
    checkpoint: ModelDir,
    to: Annotated[
        str, typer.Option("--to", help="Target format: hf (transformers LlamaForCausalLM).")
    ] = "hf",
    dtype: Annotated[str, typer.Option(help="Weight dtype: float32, bfloat16 or float16.")] = "float32",
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace OUT if it is an existing model directory.")
    ] = False,
) -> None:
    """Write a checkpoint (trained with final_block: false) as a transformers model directory."""
    from reasoning_llama.interop.hf import export_hf

    _check_format(to)
    path = export_hf(resolve_model_dir(checkpoint), out, dtype=dtype, overwrite=overwrite)
    typer.echo(f"exported {checkpoint} to {path} (LlamaForCausalLM, {dtype})", err=True)


def import_(
    source: Annotated[
        Path, typer.Argument(metavar="SRC", help="A local transformers LlamaForCausalLM directory.")
    ],
    out: Annotated[Path, typer.Option(help="The reasoning-llama checkpoint directory to write.")],
    from_: Annotated[str, typer.Option("--from", help="Source format: hf (transformers Llama).")] = "hf",
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace OUT if it is an existing model directory.")
    ] = False,
) -> None:
    """Convert a local safetensors LlamaForCausalLM directory into a reasoning-llama checkpoint."""
    from reasoning_llama.interop.hf import import_hf

    _check_format(from_)
    path = import_hf(source, out, overwrite=overwrite)
    typer.echo(f"imported {source} to {path}", err=True)


def register(app: typer.Typer) -> None:
    app.command()(export)
    app.command("import")(import_)
