"""The settings of a run that `train` or `rl` starts, or resumes, in its --out directory."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

from reasoning_llama.errors import CheckpointError, ConfigError

T = TypeVar("T")


def run_settings(
    schema: type[T],
    out: Path,
    recipe: Path | None,
    overrides: list[str],
    *,
    resume: bool,
    overwrite: bool,
    command: str,
    how_to_start: str,
) -> T:
    """A recipe (or the defaults) with `overrides`; on --resume without a recipe, the run's own saved
    settings. Local paths are made absolute (a new run's, and those given with --resume), so the run
    resumes from any directory."""
    from reasoning_llama.config import load_config, pin_paths
    from reasoning_llama.training.run_dir import RUN_CONFIG, check_run_command, holds_run

    if resume and overwrite:
        raise ConfigError(
            "give --resume (continue the run in --out) or --overwrite (start it over), not both"
        )
    if resume:
        if recipe is None:
            recipe = out / RUN_CONFIG
            if not recipe.is_file() and holds_run(out):  # its checkpoints, without the settings they need
                raise ConfigError(
                    f"--resume: {out} holds a run without its {RUN_CONFIG}; give its settings again with "
                    "--config FILE --resume"
                )
            if not recipe.is_file():
                raise ConfigError(
                    f"--resume: {out} holds no run of `{command}` to resume; start one with {how_to_start}"
                )
        check_run_command(out, command)
    settings = load_config(schema, recipe, overrides)
    _name_the_checkpoint(settings, resume=resume)
    pin_paths(settings)  # type: ignore[arg-type]
    return settings


def _name_the_checkpoint(settings: object, *, resume: bool) -> None:
    """init_from as every command takes a model: a checkpoint, or a run directory (its best, or latest).

    A resumed run's may be gone (a resumed train run needs it no more; RL says so when it does)."""
    from reasoning_llama.cli.model_dir import resolve_model_dir

    holder = getattr(settings, "train", settings)  # RunConfig keeps it in train, RLConfig at the top
    init_from = getattr(holder, "init_from", None)
    if not init_from:
        return
    try:
        holder.init_from = str(resolve_model_dir(Path(init_from)))
    except CheckpointError:
        if not resume:
            raise
