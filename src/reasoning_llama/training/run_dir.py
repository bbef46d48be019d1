"""A run's directory: what a run writes there, whether one is there, and how a new run, a resume or
an --overwrite treat it. Shared by `train`, `rl` and the quickstart; nothing in it changes before a
run has begun (`begin_run`), so a start that fails leaves the directory as it was."""

from __future__ import annotations

import os
import re
import shlex
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from reasoning_llama import atomic
from reasoning_llama.config import config_yaml
from reasoning_llama.errors import ConfigError
from reasoning_llama.training import run_checkpoints as ckpt
from reasoning_llama.training.metrics import METRICS_FILE, TENSORBOARD_DIR, truncate_after
from reasoning_llama.training.plot import PLOT_FILE

RUN_CONFIG = "run_config.yaml"


def has_begun(run_dir: Path, config: Any) -> bool:
    """Whether RUN holds this very run (its settings saved by `begin_run`): a torchrun restart of an
    --overwrite run whose first attempt died before it began still has the old run to replace."""
    saved = run_dir / RUN_CONFIG
    return saved.is_file() and saved.read_text() == config_yaml(config)


def begin_run(run_dir: Path, config: Any, *, overwrite: bool) -> None:
    """The run has started (its data, model and checkpoint are ready): replace the run it overwrites,
    and save its settings."""
    if overwrite:
        start_over(run_dir)
    make_run_dir(run_dir)
    save_run_config(run_dir, config)


def make_run_dir(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {run_dir}: cannot create the directory ({e.strerror or e})") from None


def save_run_config(run_dir: Path, config: Any) -> None:
    """RUN/run_config.yaml: the settings of a run (a config dataclass), which `--resume` reads."""
    atomic.write_text(run_dir / RUN_CONFIG, config_yaml(config))


def holds_run(run_dir: Path) -> bool:
    """Whether `run_dir` holds a training run (its config, metrics or step checkpoints), even one that
    saved nothing; a bare `checkpoints/` folder of one's own, holding runs, is none."""
    return (
        (run_dir / RUN_CONFIG).is_file()
        or (run_dir / METRICS_FILE).is_file()
        or any((run_dir / ckpt.CHECKPOINTS).glob("step-*"))
    )


# What a run writes in its directory; nothing else there is the run's.
RUN_ENTRIES = (
    RUN_CONFIG,
    METRICS_FILE,
    TENSORBOARD_DIR,
    ckpt.CHECKPOINTS,
    ckpt.LATEST,
    ckpt.BEST,
    PLOT_FILE,
)


def run_command(run_dir: Path) -> str | None:
    """Which command a run directory's settings belong to: `train`, `rl`, or None (none readable)."""
    import yaml

    try:
        settings = yaml.safe_load((run_dir / RUN_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return None
    if not isinstance(settings, dict):
        return None
    return "train" if "train" in settings else "rl" if "samples_per_prompt" in settings else None


def check_run_command(run_dir: Path, command: str) -> None:
    """On --resume: refuse a run another command wrote, naming the command that resumes it."""
    other = run_command(run_dir)
    if other is not None and other != command:
        raise ConfigError(
            f"{run_dir} holds a run of `{other}`, not `{command}`; resume it with: "
            f"reasoning-llama {other} --out {shlex.quote(str(run_dir))} --resume"
        )


def check_replaceable(run_dir: Path, reads: Sequence[str | Path | None] = ()) -> None:
    """Refuse to replace a directory that holds no run, or a run this one reads from (`reads`: the
    paths it loads, such as `init_from`), which it would delete before using."""
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return
    if not holds_run(run_dir):
        raise ConfigError(
            f"{run_dir} does not look like a training run (no {RUN_CONFIG}); refusing to delete it"
        )
    owned = [(run_dir / name).resolve() for name in RUN_ENTRIES]
    for path in reads:
        if path and any(Path(path).resolve().is_relative_to(entry) for entry in owned):
            raise ConfigError(
                f"{path} is part of the run in {run_dir}, which --overwrite deletes; copy it elsewhere first"
            )


def start_over(run_dir: Path) -> None:
    """Delete the training run in `run_dir`: its own files (and their atomic writes' temporaries),
    never anything else the directory holds."""
    check_replaceable(run_dir)
    if not run_dir.is_dir():
        return
    for entry in run_dir.iterdir():
        temporary = re.fullmatch(r"\.(.+)\.(?:tmp|old)-[0-9a-f]+.*", entry.name)  # atomic writes' siblings
        if (temporary.group(1) if temporary else entry.name) in RUN_ENTRIES:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()


def prepare_run_dir(
    run_dir: Path,
    resume: bool,
    restarted: bool = False,
    overwrite: bool = False,
    reads: Sequence[str | Path | None] = (),
) -> Path | None:
    """Create or check RUN/; the checkpoint to resume from (None: a fresh start). Nothing in RUN
    changes before the run has started (`begin_run`), so a start that fails leaves it as it was.

    resume: continue from the latest checkpoint, or start over if the run stopped before saving one.
    restarted: torchrun brought the group back after a failure, once this run had begun (the same).
    overwrite: the run already in RUN/ is to be replaced (`begin_run` deletes it); `reads` (the paths
    the new run loads) must lie outside it.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir} is a file; a run needs a directory of its own")
    where = Path(os.path.abspath(run_dir))
    for run in where.parents:  # in another run's best/ or checkpoints/, which that run replaces and prunes
        if holds_run(run) and where.relative_to(run).parts[0] in RUN_ENTRIES:
            raise ConfigError(
                f"--out {run_dir} lies inside the run in {run}, which replaces what is there; give a "
                "directory of its own"
            )
    if overwrite and not restarted:
        check_replaceable(run_dir, reads)
    if resume or restarted:
        latest = ckpt.latest_checkpoint(run_dir)
        if latest is None and not restarted and not holds_run(run_dir):
            raise ConfigError(f"--resume: {run_dir} holds no run; start one without --resume")
        ckpt.remove_stale_temporaries(run_dir)
        if latest is None:  # the run stopped before its first checkpoint: start it over, logs included
            truncate_after(run_dir, -1)
    else:
        latest = None
        if holds_run(run_dir) and not overwrite:
            command = run_command(run_dir)
            resume = (
                f"continue it with: reasoning-llama {command} --out {shlex.quote(str(run_dir))} --resume"
                if command
                else "pass --resume to continue it"
            )
            raise ConfigError(
                f"{run_dir} already holds a run; {resume}, --overwrite to start it over, or choose another --out"
            )
    # Made when the run begins; here only whether it can be, so that a bad --out fails first.
    existing = next(p for p in (run_dir.absolute(), *run_dir.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        make_run_dir(run_dir)  # fails, saying why
    return latest
