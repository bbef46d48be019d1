"""`quickstart`: the README's main job (train a tiny model, then show what it learned)."""

from __future__ import annotations

import json
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
    stop_at_step: Annotated[
        int | None,
        typer.Option(
            help="Save and stop after this step, as Ctrl-C would (resume it with `train --resume`)."
        ),
    ] = None,
) -> None:
    """Train a tiny model on synthetic reasoning tasks, then show accuracy before/after and a sample."""
    from reasoning_llama.quickstart import QuickstartStopped, format_report, run_quickstart

    if minutes <= 0:
        raise ConfigError(f"--minutes must be positive, got {minutes}")
    if stop_at_step is not None and stop_at_step < 1:
        raise ConfigError(f"--stop-at-step must be >= 1, got {stop_at_step}")
    try:
        report = run_quickstart(
            out,
            minutes=minutes,
            fast=fast,
            overwrite=overwrite,
            progress=not as_json,
            say=echo_err,
            stop_at_step=stop_at_step,
        )
    except QuickstartStopped as stopped:
        result = stopped.result
        echo_err(result.stopped_note())
        if as_json:
            where = {
                "step": result.step,
                "total_steps": result.total_steps,
                "checkpoint": str(result.checkpoint),
            }
            print(json.dumps({**where, "stop_reason": result.stop_reason, "resume_with": result.resume_with}))
        if result.stop_reason == "interrupted":
            raise typer.Exit(INTERRUPTED_EXIT) from None
        return
    echo_err(format_report(report))
    if as_json:
        print(json.dumps(report.to_dict()))


def register(app: typer.Typer) -> None:
    app.command()(quickstart)
