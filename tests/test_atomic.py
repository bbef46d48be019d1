"""Atomic writes: the old version stays whole when writing the new one fails midway."""

from __future__ import annotations

import pytest

from reasoning_llama import atomic


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = atomic.write_text(tmp_path / "sub" / "state.txt", "old\n")

    def half_then_crash(f):
        f.write(b"new and incom")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic.write_with(path, half_then_crash)
    assert path.read_text() == "old\n"
    assert [p.name for p in path.parent.iterdir()] == ["state.txt"]
    atomic.write_bytes(path, b"new\n")
    assert path.read_text() == "new\n"


def test_a_directory_is_swapped_in_whole(tmp_path):
    target = tmp_path / "ckpt"
    atomic.write_dir(target, lambda d: (d / "a").write_text("1"))

    def crash(d):
        (d / "a").write_text("2")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic.write_dir(target, crash)
    assert (target / "a").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    atomic.write_dir(target, lambda d: (d / "b").write_text("3"))
    assert sorted(p.name for p in target.iterdir()) == ["b"]


def test_a_writer_that_wants_a_path_gets_a_temporary_one(tmp_path):
    path = atomic.write_text(tmp_path / "model.gguf", "old")

    def crash(tmp):
        assert tmp.suffix == ".gguf" and tmp.parent == tmp_path  # writers may insist on their suffix
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic.write_path(path, crash)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["model.gguf"]
    atomic.write_path(path, lambda tmp: tmp.write_text("new"))
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["model.gguf"]
