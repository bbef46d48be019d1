"""Running the real `reasoning-llama` command line in a subprocess, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def run_cli(
    *args: str | Path, one_thread: bool = False, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m reasoning_llama ARGS`, offline; `one_thread` pins torch to one thread (tiny models);
    `env` adds to the environment."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    if one_thread:
        env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "reasoning_llama", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)


def run_clis(
    calls: Sequence[Sequence[str | Path]], **options: object
) -> list[subprocess.CompletedProcess[str]]:
    """Independent `run_cli` calls, two at a time (each is mostly Python starting up, one core
    each); results in the calls' order."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(lambda args: run_cli(*args, **options), calls))  # type: ignore[arg-type]
