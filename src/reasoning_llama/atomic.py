"""Files and directories written so that a crash never leaves a half-written one behind.

Everything goes into a temporary sibling, is fsynced, and is renamed over the target (a rename within
one directory is atomic): a reader sees the old version or the new one, never a mix. Every file the
project writes for later (checkpoints, pointers, caches, configs, logs rewritten in place) goes through
here.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_parent(path: Path) -> None:
    """The directory `path` goes in; a file in the way is named as such (not mkdir's "File exists")."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), path.parent)
        raise NotADirectoryError(
            errno.ENOTDIR, f"a file, not a directory: cannot write {path} under it", str(blocking)
        ) from None


def write_path(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Replace the file `path` with the file `write(tmp)` creates at `tmp`, for writers that want a path.

    `tmp` keeps the target's suffix: some writers insist on theirs (AOTInductor's `.pt2`)."""
    path = Path(path)
    _make_parent(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}{path.suffix}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_with(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Replace the file `path` with what `write(file)` writes (e.g. `np.savez`, `torch.save`)."""

    def fill(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            write(f)

    return write_path(path, fill)


def write_bytes(path: str | Path, data: bytes) -> Path:
    return write_with(path, lambda f: f.write(data))


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def temporary_sibling(target: str | Path) -> Path:
    """A new, empty directory next to `target` to fill before `commit_dir` swaps it in."""
    target = Path(target)
    _make_parent(target)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    return tmp


def commit_dir(tmp: Path, target: str | Path) -> Path:
    """fsync everything under `tmp`, then rename it to `target` (replacing an older one)."""
    target = Path(target)
    for path in sorted(tmp.rglob("*"), reverse=True):  # files before the directories holding them
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        else:
            _fsync_dir(path)
    _fsync_dir(tmp)
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, target)
    _fsync_dir(target.parent)
    return target


def write_dir(target: str | Path, fill: Callable[[Path], None]) -> Path:
    """Call `fill(tmp_dir)`, then swap the filled directory in as `target`."""
    tmp = temporary_sibling(target)
    try:
        fill(tmp)
        return commit_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
