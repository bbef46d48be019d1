"""`rl`: improve a checkpoint by reinforcement learning against checkable answers (GRPO-style)."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

import typer

from reasoning_llama.cli.model_dir import resolve_model_dir
from reasoning_llama.cli.options import INTERRUPTED_EXIT, Threads, echo_err, set_threads
from reasoning_llama.cli.run_settings import run_settings
from reasoning_llama.errors import ConfigError


def rl(
    out: Annotated[Path, typer.Option(help="The run directory (checkpoints, metrics).")],
    init_from: Annotated[
        Path | None, typer.Option(help="The checkpoint (or run directory) to improve.")
    ] = None,
    task: Annotated[
        str | None,
        typer.Option(help="synthetic:FAMILY[,FAMILY...]: practise on those families' train split."),
    ] = None,
    data: Annotated[
        Path | None, typer.Option(help="Or a .json/.jsonl/.parquet file of rows with user and assistant.")
    ] = None,
    checker: Annotated[
        str | None,
        typer.Option(
            help="How --data answers are scored: exact, numeric, package.module:function or file.py:function."
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(help="A YAML recipe: a file, or a packaged one by name (e.g. rl-chain-sum)."),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config value, e.g. --set lr=1e-4 (repeatable)."),
    ] = None,
    minutes: Annotated[
        float | None,
        typer.Option(
            help="Save and stop after this many minutes of RL steps (evaluations and saves not counted)."
        ),
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue the run in --out from its latest checkpoint.")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option(help="Delete the run already in --out and start it over.")
    ] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    threads: Threads = None,
) -> None:
    """Sample answers, reward the correct ones, and train the model towards them (RL with verifiable rewards)."""
    from reasoning_llama.config import RLConfig, setting
    from reasoning_llama.evaluation import parse_task_spec
    from reasoning_llama.rl.loop import run_rl

    set_threads(threads)
    if task is not None and data is not None:
        raise ConfigError("rl practises one task: give --task or --data, not both")
    overrides = []  # the flags' settings, then --set's, which win (as an error's suggestion may need)
    if init_from is not None:
        overrides.append(setting("init_from", resolve_model_dir(init_from)))
    if task is not None:
        overrides.append(f"families=[{','.join(parse_task_spec(task))}]")
    if data is not None:
        overrides.append(setting("data", data))
    if checker is not None:
        overrides.append(setting("checker", checker))
    if minutes is not None:
        if minutes <= 0:
            raise ConfigError(f"--minutes must be positive, got {minutes}")
        overrides.append(f"max_minutes={minutes}")
    overrides += set_ or []
    run_config = run_settings(
        RLConfig,
        out,
        config,
        overrides,
        resume=resume,
        overwrite=overwrite,
        command="rl",
        how_to_start="--init-from and --task",
    )
    result = run_rl(run_config, out, resume=resume, overwrite=overwrite, progress=progress, echo=echo_err)
    first, last = min(result.evaluations, default=None), max(result.evaluations, default=None)
    if first is not None and last is not None and first != last:
        for key in sorted(result.evaluations[last]):
            before, after = result.evaluations[first][key], result.evaluations[last][key]
            echo_err(f"{key:>24}: {before:6.1%} at step {first} -> {after:6.1%} at step {last}")
    echo_err(f"{result.stop_reason} at step {result.step}; checkpoint: {result.checkpoint}")
    if result.stop_reason == "interrupted":
        echo_err(f"resume with: reasoning-llama rl --out {shlex.quote(str(out))} --resume")
        raise typer.Exit(INTERRUPTED_EXIT)


def register(app: typer.Typer) -> None:
    app.command()(rl)
