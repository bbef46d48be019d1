"""`reasoning-llama data stats` as a real subprocess: JSON reports, human output and one-line errors."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures" / "data"


def data_stats(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")} | (env or {})
    command = [
        sys.executable,
        "-m",
        "reasoning_llama",
        "data",
        "stats",
        *args,
        "--set",
        f"data.cache_dir={tmp_path}",
    ]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def test_json_report_on_a_local_file(tmp_path):
    result = data_stats(
        tmp_path, "--source", "local", "--path", str(FIXTURES / "bad_rows.jsonl"), "--seq-len", "24", "--json"
    )
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["validation"]["rows_read"] == 12 and stats["validation"]["rows_kept"] == 3
    assert stats["validation"]["skipped"]["non-string field 'user'"] == 2
    assert stats["validation"]["first_offending"][0].endswith("bad_rows.jsonl:2: missing field 'user'")
    assert stats["seq_len"] == 24 and stats["max_example_tokens"] == 25
    assert (stats["train"]["rows"], stats["val"]["rows"]) == (2, 1)
    # Every row renders to more than 25 tokens and keeps a target after truncation.
    assert stats["train"]["truncated"] + stats["val"]["truncated"] == 3
    assert set(stats["packing"]) == {"packed", "unpacked"}
    assert "skipped 9" in result.stderr  # the warning names what was dropped


@pytest.mark.slow
def test_synthetic_report_then_cache_hit_and_human_output(tmp_path):
    sizes = ["--set", "data.synthetic_train_size=30", "--set", "synthetic_val_size=6"]
    first = data_stats(tmp_path, *sizes, "--json")
    assert first.returncode == 0, first.stderr
    stats = json.loads(first.stdout)
    assert stats["source"].startswith("synthetic")
    assert (stats["train"]["examples"], stats["val"]["examples"]) == (30, 6)
    assert not stats["cache"]["hit"]
    assert json.loads(data_stats(tmp_path, *sizes, "--json").stdout)["cache"]["hit"]

    human = data_stats(tmp_path, *sizes, "--seq-len", "64")
    assert human.returncode == 0, human.stderr
    assert "train: 30 rows -> 30 examples" in human.stdout
    assert "tokens per example: min" in human.stdout and "packed:" in human.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--source", "local", "--path", "missing.jsonl"], "error: data path missing.jsonl does not exist"),
        (["--source", "local", "--path", str(FIXTURES / "broken.jsonl")], "broken.jsonl:3: malformed JSON"),
        (["--source", "hub"], "error: cannot reach the Hugging Face hub for KingNish/reasoning-base-20k"),
        (["--set", "trian.lr=1"], "Key 'trian' not in 'RunConfig'"),  # a typo'd section, not data's key
        (["--set", "synthetic_train_size=0"], "data.synthetic_train_size must be >= 1"),
        (["--source", "local", "--path", "PARQUET"], "not-parquet.parquet: cannot read it as parquet"),
    ],
)
def test_bad_input_is_one_line_on_stderr(tmp_path, args, message):
    (tmp_path / "not-parquet.parquet").write_bytes(b"PAR1 not really parquet")
    args = [str(tmp_path / "not-parquet.parquet") if a == "PARQUET" else a for a in args]
    result = data_stats(tmp_path, *args, "--json")
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr


def test_an_unreachable_hub_is_one_line_without_retries(tmp_path):
    """Without HF_HUB_OFFLINE, `datasets` alone retries a dead hub for ~25 s and prints every retry;
    one request first finds it unreachable and the rest runs offline: one line, no retries."""
    with socket.socket() as s:  # a port nobody listens on: connections are refused at once
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    result = data_stats(tmp_path, "--source", "hub", env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": dead})
    assert result.returncode == 2
    assert result.stderr.splitlines() == [result.stderr.strip()], result.stderr
    assert result.stderr.startswith(
        "error: cannot reach the Hugging Face hub for KingNish/reasoning-base-20k"
    )


def test_a_library_that_prints_its_own_warnings_is_not_printed_twice():
    """huggingface_hub has a handler of its own (its retries offline): the command line's root
    handler leaves its records to it, and still prints everyone else's."""
    import io
    import logging

    from huggingface_hub.utils import logging as hub_logging

    from reasoning_llama.cli import NotHandledElsewhere

    hub = hub_logging.get_logger("huggingface_hub.utils._http")
    ours = logging.getLogger("reasoning_llama.data.sources")
    quiet = logging.getLogger("a_library_that_prints_nothing_itself.connectionpool")
    logging.getLogger("a_library_that_prints_nothing_itself").addHandler(logging.NullHandler())
    assert logging.getLogger("huggingface_hub").handlers  # the library's own
    printed = io.StringIO()
    handler = logging.StreamHandler(printed)
    handler.addFilter(NotHandledElsewhere())
    for logger in (hub, ours, quiet):
        record = logger.makeRecord(logger.name, logging.WARNING, __file__, 1, "retrying", None, None)
        if handler.filter(record):
            handler.emit(record)
    assert printed.getvalue() == "retrying\n" * 2  # ours and the quiet one's; the hub's left to its own
