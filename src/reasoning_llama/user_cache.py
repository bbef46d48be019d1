"""Where the project keeps files it can rebuild: $REASONING_LLAMA_CACHE, else ~/.cache/reasoning-llama."""

from __future__ import annotations

import os
from pathlib import Path


def user_cache_dir(name: str) -> Path:
    """The cache's subdirectory `name` (not created)."""
    root = os.environ.get("REASONING_LLAMA_CACHE") or Path.home() / ".cache" / "reasoning-llama"
    return Path(root) / name
