"""`quickstart`: the README's main job (train a tiny model, then show what it learned)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Annotated

import typer

from reasoning_llama.cli.options import INTERRUPTED_EXIT, echo_err
from reasoning_llama.errors import ConfigError


def quickstart(
    out: Annotated[Path, typer.Option(help="The run directory.")] = Path("runs/quickstart"),
    minutes: Annotated[float, typer.Option(help="Training time budget in minutes.")] = 8.0,
    fast: Annotated[bool, typer.Option(help="A smoke run of the whole path in well under a minute.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier run in --out.")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object on stdout at the end.")
    ] = False,
) -> None:
    """Train a tiny model on synthetic reasoning tasks, then show accuracy before/after and a sample."""
    from reasoning_llama.quickstart import format_report, run_quickstart

    if minutes <= 0:
        raise ConfigError(f"--minutes must be positive, got {minutes}")
    report = run_quickstart(
        out, minutes=minutes, fast=fast, overwrite=overwrite, progress=not as_json, say=echo_err
    )
    echo_err(format_report(report))
    if report.stop_reason == "interrupted":
        echo_err(
            f"interrupted; the run is resumable: reasoning-llama train --out {shlex.quote(str(out))} --resume"
        )
        raise typer.Exit(INTERRUPTED_EXIT)
    if as_json:
        print(json.dumps(report.to_dict()))


def register(app: typer.Typer) -> None:
    app.command()(quickstart)
