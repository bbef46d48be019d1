"""A run directory's checkpoints (DESIGN.md §4): resumable step directories, latest/best, pruning.

RUN/
  run_config.yaml            the resolved config
  metrics.jsonl              see metrics.py
  checkpoints/step-000123/   model.safetensors, config.json, tokenizer.json: the model, for users
                             trainer_state.pt: progress, schedule, data position, RNG (no tensors of the model)
                             distributed/: model and optimizer through torch.distributed.checkpoint,
                               one shard per rank, readable at any other world size
  latest                     text pointer to the newest complete step directory (replaced atomically)
  best/                      model files of the lowest validation loss so far, plus best.json

Every directory is filled in a temporary sibling, fsynced and renamed (`atomic.commit_dir`), so a
process killed mid-save leaves the previous checkpoint intact and `latest` still pointing at it.
Under torchrun every rank writes its shard into the same temporary directory (the run directory
must be on a file system all nodes see); rank 0 writes the rest and renames it once all are done.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from reasoning_llama import atomic
from reasoning_llama.errors import CheckpointError
from reasoning_llama.loss import ModelWithLoss
from reasoning_llama.model_files import CONFIG, WEIGHTS, write_model_files
from reasoning_llama.training.distributed import SINGLE, World, barrier, on_main

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LATEST = "latest"
BEST = "best"
BEST_INFO = "best.json"
TRAINER_STATE = "trainer_state.pt"
DISTRIBUTED = "distributed"
TRAINER_STATE_FORMAT = 2  # 1: the optimizer inside trainer_state.pt, no distributed/ (still read)

_STEP_DIR = re.compile(r"step-(\d+)")


def step_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{step:06d}"


# --- random number generators --------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    """Python, numpy, torch and CUDA generator states, in types `torch.load(weights_only=True)` accepts."""
    name, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --- writing ----------------------------------------------------------------------------


def _model_and_optimizer(loss_model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Their state dicts keyed by parameter name, sharded as they are: what DCP saves and loads."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {
        "model": get_model_state_dict(loss_model),
        "optimizer": get_optimizer_state_dict(loss_model, optimizer),
    }


@contextmanager
def _single_process_is_fine() -> Iterator[None]:
    """DCP warns each time it runs without a process group; for a one-process run that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="torch.distributed is disabled, unavailable or uninitialized"
        )
        yield


def full_model_state(loss_model: ModelWithLoss, world: World) -> dict[str, torch.Tensor] | None:
    """The whole model's weights on rank 0 (gathered from shards under FSDP), None on other ranks."""
    if world.mode != "fsdp":
        return loss_model.model.state_dict() if world.is_main else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(loss_model, options=options)  # collective: every rank calls it
    prefix = "model."
    return {k.removeprefix(prefix): v for k, v in state.items()} if world.is_main else None


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    loss_model: ModelWithLoss,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    keep_last: int,
    world: World = SINGLE,
) -> Path:
    """Write RUN/checkpoints/step-N atomically, point RUN/latest at it, keep only the last `keep_last`.

    Every rank calls it; rank 0's `trainer_state` is the one saved.
    """
    import torch.distributed.checkpoint as dcp

    run_dir = Path(run_dir)
    target = step_dir(run_dir, step)
    tmp = on_main(world, lambda: atomic.temporary_sibling(target))
    assert tmp is not None
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        try:
            with _single_process_is_fine():
                dcp.save(_model_and_optimizer(loss_model, optimizer), checkpoint_id=tmp / DISTRIBUTED)
        except CheckpointException as e:  # a full disk, say: one line, not every rank's traceback
            raise CheckpointError(f"cannot write {tmp / DISTRIBUTED}: {_dcp_reason(e)}") from None
        weights = full_model_state(loss_model, world)
        if world.is_main:
            write_model_files(tmp, loss_model.model, weights)
            torch.save({**trainer_state, "format": TRAINER_STATE_FORMAT}, tmp / TRAINER_STATE)
        barrier(world)

        def publish() -> None:
            atomic.commit_dir(tmp, target)
            atomic.write_text(run_dir / LATEST, f"{CHECKPOINTS}/{target.name}\n")
            prune_checkpoints(run_dir, keep_last)

        on_main(world, publish)
    except BaseException:
        if world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def restore_checkpoint(
    directory: Path, loss_model: ModelWithLoss, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Load model and optimizer state from a step directory (at any world size); return the trainer state."""
    trainer_state = load_trainer_state(directory)
    if trainer_state.get("format", 1) == 1:  # written before checkpoints went through DCP
        from reasoning_llama.model_files import load_model

        loss_model.model.load_state_dict(load_model(directory).state_dict())
        optimizer.load_state_dict(trainer_state["optimizer"])
        return trainer_state
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = _model_and_optimizer(loss_model, optimizer)
    try:
        with _single_process_is_fine():
            dcp.load(state, checkpoint_id=directory / DISTRIBUTED)
    # A missing or truncated shard, or another model's: say where. DCP wraps each rank's failure in
    # a CheckpointException, a BaseException whose message is their tracebacks.
    except (Exception, CheckpointException) as e:
        raise CheckpointError(f"cannot read {directory / DISTRIBUTED}: {_dcp_reason(e)}") from None
    set_model_state_dict(loss_model, state["model"])
    set_optimizer_state_dict(loss_model, optimizer, state["optimizer"])
    return trainer_state


def _dcp_reason(error: BaseException) -> str:
    """The first line of what went wrong, from the ranks' failures DCP wraps in a CheckpointException."""
    causes = [cause for cause, _ in getattr(error, "failures", {}).values()] or [error]
    for cause in causes:
        if str(cause).strip():
            return str(cause).strip().splitlines()[0]
    return type(causes[0]).__name__


def save_best(
    run_dir: str | Path,
    loss_model: ModelWithLoss,
    info: dict[str, Any],
    world: World = SINGLE,
) -> Path:
    """Write RUN/best (model files + best.json with the step and validation loss) atomically; every rank calls it."""
    weights = full_model_state(loss_model, world)

    def fill(tmp: Path) -> None:
        write_model_files(tmp, loss_model.model, weights)
        (tmp / BEST_INFO).write_text(json.dumps(info, indent=2) + "\n")

    on_main(world, lambda: atomic.write_dir(Path(run_dir) / BEST, fill))
    return Path(run_dir) / BEST


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Step directories holding a trainer state, oldest first (temporary siblings are ignored)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.fullmatch(p.name) and (p / TRAINER_STATE).is_file()]
    return sorted(found, key=_step_number)


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints, best-effort (the new one is already saved).
    Each is first renamed out of sight, so a kill mid-delete leaves a temporary that
    `remove_stale_temporaries` clears, never half a checkpoint."""
    for old in complete_checkpoints(run_dir)[: -max(1, keep_last)]:
        doomed = old.with_name(f".{old.name}.old-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(old, doomed)
        except OSError as e:
            log.warning("could not delete the old checkpoint %s (%s); leaving it", old, e)
            continue
        shutil.rmtree(doomed, ignore_errors=True)


def remove_stale_temporaries(run_dir: str | Path) -> None:
    """Clear what a killed process left half-done: hidden `.step-*` directories (half-written or
    being deleted), step directories older than the newest complete one that lack their trainer
    state (half-deleted by a version that deleted in place), and RUN/best's swap: a kill between its
    two renames leaves no `best`, and the old copy (whole, as every committed one) is put back."""
    run_dir = Path(run_dir)
    root = run_dir / CHECKPOINTS
    complete = complete_checkpoints(run_dir)
    newest = _step_number(complete[-1]) if complete else -1
    if root.is_dir():
        for p in root.iterdir():
            half_deleted = _STEP_DIR.fullmatch(p.name) and _step_number(p) < newest and p not in complete
            if p.name.startswith(".step-") or half_deleted:
                shutil.rmtree(p, ignore_errors=True)
    best = run_dir / BEST
    whole = (BEST_INFO, WEIGHTS, CONFIG)  # a copy half-deleted by an earlier kill misses some
    replaced = [p for p in run_dir.glob(f".{BEST}.old-*") if all((p / name).is_file() for name in whole)]
    if not best.exists() and replaced:
        os.rename(max(replaced, key=lambda p: p.stat().st_mtime), best)
    for p in [*run_dir.glob(f".{BEST}.old-*"), *run_dir.glob(f".{BEST}.tmp-*")]:
        shutil.rmtree(p, ignore_errors=True)


def _step_number(path: Path) -> int:
    return int(_STEP_DIR.fullmatch(path.name).group(1))  # type: ignore[union-attr]


# --- reading ----------------------------------------------------------------------------


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The directory RUN/latest points to, or the newest complete step directory if the pointer is bad."""
    run_dir = Path(run_dir)
    pointer = run_dir / LATEST
    if pointer.is_file():
        target = run_dir / pointer.read_text(encoding="utf-8").strip()
        if (target / TRAINER_STATE).is_file():
            return target
        log.warning(
            "%s points to %s, which is incomplete; using the newest complete checkpoint", pointer, target
        )
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def load_trainer_state(directory: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(directory) / TRAINER_STATE
    if not path.is_file():
        raise CheckpointError(
            f"{directory} has no {TRAINER_STATE}; it is not a resumable training checkpoint"
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which one
        raise CheckpointError(f"cannot read {path}: {e}") from None
