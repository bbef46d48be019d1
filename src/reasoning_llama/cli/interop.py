"""`export` and `import`: move weights to and from the transformers (HF) Llama format, and out to
llama.cpp's GGUF."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from reasoning_llama.cli.model_dir import ModelDir, resolve_model_dir
from reasoning_llama.errors import ConfigError

EXPORT_FORMATS = ("hf", "gguf")
IMPORT_FORMATS = ("hf",)


def _check_format(value: str, formats: tuple[str, ...]) -> None:
    if value not in formats:
        raise ConfigError(f"unknown format {value!r}; supported: {', '.join(formats)}")


def export(
    out: Annotated[
        str, typer.Argument(metavar="OUT", help="The directory (hf) or the .gguf file (gguf) to write.")
    ],
    checkpoint: ModelDir,
    to: Annotated[
        str | None,
        typer.Option(
            "--to",
            help="Target format: hf (transformers LlamaForCausalLM) or gguf (llama.cpp); "
            "default gguf for an OUT ending in .gguf, else hf.",
        ),
    ] = None,
    dtype: Annotated[
        str | None,
        typer.Option(
            help="Weights: float32 (default), bfloat16 or float16 for hf; f32 (default), f16 or q8_0 for gguf."
        ),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="Replace OUT if it is an existing model directory or GGUF file."),
    ] = False,
) -> None:
    """Write a checkpoint (trained with final_block: false) as a transformers model directory or a GGUF file."""
    to = to or ("gguf" if out.lower().endswith(".gguf") else "hf")
    _check_format(to, EXPORT_FORMATS)
    source = resolve_model_dir(checkpoint)
    if to == "gguf":
        from reasoning_llama.interop.gguf import export_gguf

        if out.endswith(("/", os.sep)):  # a Path would drop the slash and write a file of that name
            raise ConfigError(
                f"{out} names a directory; the GGUF export writes one file, e.g. {Path(out) / 'model.gguf'}"
            )
        dtype = dtype or "f32"
        path = export_gguf(source, Path(out), dtype=dtype, overwrite=overwrite)
        typer.echo(f"exported {checkpoint} to {path} (GGUF for llama.cpp, {dtype})", err=True)
        return
    from reasoning_llama.interop.hf import export_hf

    dtype = dtype or "float32"
    path = export_hf(source, Path(out), dtype=dtype, overwrite=overwrite)
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

    _check_format(from_, IMPORT_FORMATS)
    path = import_hf(source, out, overwrite=overwrite)
    typer.echo(f"imported {source} to {path}", err=True)


def register(app: typer.Typer) -> None:
    app.command()(export)
    app.command("import")(import_)
