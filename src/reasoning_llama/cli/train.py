"""`train`: train a model into a run directory, or resume one."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

import typer

from reasoning_llama.cli.model_dir import resolve_model_dir
from reasoning_llama.cli.options import (
    INTERRUPTED_EXIT,
    Threads,
    echo_err,
    said_once_per_machine,
    set_threads,
)
from reasoning_llama.cli.run_settings import run_settings
from reasoning_llama.errors import ConfigError


def train(
    out: Annotated[Path, typer.Option(help="The run directory (checkpoints, metrics, best model).")],
    preset: Annotated[str | None, typer.Option(help="Model preset, e.g. tiny or small-100m.")] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            help="A YAML recipe: a file, or a packaged one by name (quickstart, reasoning-base-20k)."
        ),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config value, e.g. --set train.lr=3e-4 (repeatable)."),
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue the run in --out from its latest checkpoint.")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option(help="Delete the training run already in --out and start it over.")
    ] = False,
    init_from: Annotated[
        Path | None,
        typer.Option(
            help="Start from this model's weights: a checkpoint, or a run directory (its best model, "
            "else its latest checkpoint)."
        ),
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    threads: Threads = None,
    stop_at_step: Annotated[
        int | None,
        typer.Option(
            help="Save and stop after this step, as Ctrl-C would; the schedule still plans the whole run."
        ),
    ] = None,
) -> None:
    """Train a model (--preset P or --config F, with --set key=value overrides) into --out RUN."""
    from reasoning_llama.config import RunConfig, setting
    from reasoning_llama.training import train as run_training

    with said_once_per_machine():  # under torchrun, every process of a machine would say it
        if preset is not None and config is not None:
            raise ConfigError("give --preset or --config, not both")
        if preset is not None and init_from is not None:
            raise ConfigError(
                "give --preset (a new model) or --init-from (the model of a checkpoint), not both"
            )
        if resume and init_from is not None:  # a resumed run is its own model
            raise ConfigError(
                "--resume continues the run's own model; --init-from starts a new run from a checkpoint: "
                "give one of them (a new run needs another --out)"
            )
        if stop_at_step is not None and stop_at_step < 1:
            raise ConfigError(f"--stop-at-step must be >= 1, got {stop_at_step}")
        if not resume and config is None and preset is None and init_from is None:
            # (with --init-from alone the model is the checkpoint's, the rest the defaults)
            raise ConfigError(
                "give --preset P, --config FILE or --init-from MODEL (or --resume to continue the run in --out)"
            )
        overrides = []  # the flags' settings, then --set's, which win (as in rl)
        if preset is not None:
            overrides.append(setting("train.preset", preset))
        if init_from is not None:
            overrides.append(setting("train.init_from", resolve_model_dir(init_from)))
        overrides += set_ or []
        run_config = run_settings(
            RunConfig,
            out,
            config,
            overrides,
            resume=resume,
            overwrite=overwrite,
            command="train",
            how_to_start="--preset P or --config FILE",
        )
        if resume and preset is not None and config is None:
            from reasoning_llama.config import load_run_config
            from reasoning_llama.training.run_dir import RUN_CONFIG

            started = load_run_config(out / RUN_CONFIG).train.preset
            if started != preset:
                raise ConfigError(
                    f"--preset {preset}: the run in {out} was started with --preset {started}; "
                    "resume it without --preset"
                )
        set_threads(threads)
    with said_once_per_machine((ConfigError,)):  # every process checks the same settings alike
        result = run_training(
            run_config, out, resume=resume, overwrite=overwrite, progress=progress, stop_at_step=stop_at_step
        )
    if result.rank != 0:  # under torchrun, rank 0 reports for every process
        return
    if result.stop_reason in ("interrupted", "stop_at_step"):
        echo_err(result.stopped_note())
        if result.stop_reason == "interrupted":
            raise typer.Exit(INTERRUPTED_EXIT)
        return
    best = (
        f"; best validation loss {result.best_val_loss:.4f} at step {result.best_step}"
        if result.best_val_loss is not None
        else ""
    )
    echo_err(f"{result.stop_reason} at step {result.step} of {result.total_steps}{best}")
    echo_err(
        f"checkpoint: {result.checkpoint}\nbest model: {out / 'best'}\nplot it:    reasoning-llama plot {shlex.quote(str(out))}"
    )


def register(app: typer.Typer) -> None:
    app.command()(train)
