"""`plot`: a run's curves as a PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def plot(
    run: Annotated[Path, typer.Argument(help="A run directory (with metrics.jsonl).")],
    out: Annotated[
        Path | None, typer.Option(help="The .png, .pdf or .svg file to write (default RUN/plot.png).")
    ] = None,
) -> None:
    """Plot a run's train/validation loss, learning rate and task accuracy to a PNG."""
    from reasoning_llama.training.plot import plot_run

    typer.echo(str(plot_run(run, out)))


def register(app: typer.Typer) -> None:
    app.command()(plot)
