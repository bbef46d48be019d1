"""A run directory's checkpoints (DESIGN.md §4): resumable step directories, latest/best, pruning.

RUN/
  run_config.yaml            the resolved config
  metrics.jsonl              see metrics.py
  checkpoints/step-000123/   model.safetensors, config.json, tokenizer.json, trainer_state.pt
  latest                     text pointer to the newest complete step directory (replaced atomically)
  best/                      model files of the lowest validation loss so far, plus best.json

Every directory is written with `checkpoint.write_atomic_dir`, so a process killed mid-save leaves
the previous checkpoint intact and `latest` still pointing at it.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reasoning_llama.checkpoint import write_atomic_dir, write_model_files
from reasoning_llama.errors import CheckpointError
from reasoning_llama.model import Transformer

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LATEST = "latest"
BEST = "best"
BEST_INFO = "best.json"
TRAINER_STATE = "trainer_state.pt"
# Test hook: seconds to sleep inside a checkpoint write, so a test can kill the process mid-save.
SAVE_SLEEP_ENV = "REASONING_LLAMA_TEST_SAVE_SLEEP"

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


def _write_pointer(path: Path, target: str) -> None:
    """Replace the text file `path` atomically with `target`."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(target + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(
    run_dir: str | Path, step: int, model: Transformer, trainer_state: dict[str, Any], keep_last: int
) -> Path:
    """Write RUN/checkpoints/step-N atomically, point RUN/latest at it, keep only the last `keep_last`."""
    run_dir = Path(run_dir)
    target = step_dir(run_dir, step)

    def fill(tmp: Path) -> None:
        write_model_files(tmp, model)
        torch.save(trainer_state, tmp / TRAINER_STATE)
        if os.environ.get(SAVE_SLEEP_ENV):
            time.sleep(float(os.environ[SAVE_SLEEP_ENV]))

    write_atomic_dir(target, fill)
    _write_pointer(run_dir / LATEST, f"{CHECKPOINTS}/{target.name}")
    prune_checkpoints(run_dir, keep_last)
    return target


def save_best(run_dir: str | Path, model: Transformer, info: dict[str, Any]) -> Path:
    """Write RUN/best (model files + best.json with the step and validation loss) atomically."""

    def fill(tmp: Path) -> None:
        write_model_files(tmp, model)
        (tmp / BEST_INFO).write_text(json.dumps(info, indent=2) + "\n")

    return write_atomic_dir(Path(run_dir) / BEST, fill)


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Step directories holding a trainer state, oldest first (temporary siblings are ignored)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.fullmatch(p.name) and (p / TRAINER_STATE).is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.fullmatch(p.name).group(1)))  # type: ignore[union-attr]


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> None:
    for old in complete_checkpoints(run_dir)[: -max(1, keep_last)]:
        shutil.rmtree(old, ignore_errors=True)


def remove_stale_temporaries(run_dir: str | Path) -> None:
    """Delete half-written `.step-*.tmp-*` directories left by a killed process."""
    root = Path(run_dir) / CHECKPOINTS
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".step-"):
                shutil.rmtree(p, ignore_errors=True)


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
