"""`train` through the real command line: a run killed before its first checkpoint is never a dead end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from cli_helpers import run_cli, run_clis
from reasoning_llama.training import run_checkpoints as ckpt
from reasoning_llama.training.metrics import read_metrics

TINY = [
    "--preset",
    "tiny",
    "--set",
    "train.model_overrides={dim: 32, n_layers: 1, n_heads: 2, n_kv_heads: 1, ffn_dim: 64, max_seq_len: 128}",
    "--set",
    "data.seq_len=128",
    "--set",
    "data.synthetic_train_size=200",
    "--set",
    "data.synthetic_val_size=8",
    "--set",
    "train.micro_batch_size=4",
    "--set",
    "train.global_batch_tokens=512",
    "--set",
    "train.max_steps=100000",  # far more than the test runs: only a kill or --stop-at-step ends it
    "--set",
    "train.save_every=100000",
    "--set",
    "train.eval_every=100000",
    "--set",
    "train.task_eval_size=0",
    "--set",
    "train.log_every=1",
    "--no-progress",
]


def train_steps(run) -> list[int]:
    return [r["step"] for r in read_metrics(run) if "train_loss" in r]


def start_and_kill_before_the_first_checkpoint(run, cache) -> None:
    command = [sys.executable, "-m", "reasoning_llama", "train", "--out", str(run), *TINY]
    command += ["--set", f"data.cache_dir={cache}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not ((run / "metrics.jsonl").is_file() and train_steps(run)):
            assert process.poll() is None, "the run ended by itself"
            assert time.monotonic() < deadline, "the run logged no step in time"
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert ckpt.latest_checkpoint(run) is None


@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_resumes_or_starts_over(tmp_path):
    run, cache = tmp_path / "run", tmp_path / "cache"
    start_and_kill_before_the_first_checkpoint(run, cache)

    # Starting again without a flag names both ways forward ...
    again = run_cli("train", "--out", run, *TINY, "--set", f"data.cache_dir={cache}", one_thread=True)
    assert again.returncode == 2
    assert (
        f"already holds a run; continue it with: reasoning-llama train --out {run} --resume" in again.stderr
    )
    assert "--overwrite" in again.stderr

    # ... and --resume works: nothing was saved, so the run starts over from step 0 with its own config.
    resumed = run_cli(
        "train", "--out", run, "--resume", "--stop-at-step", "3", "--no-progress", one_thread=True
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "starting it over from step 0" in resumed.stderr
    assert train_steps(run) == [1, 2, 3]  # the killed attempt's records are gone
    assert ckpt.latest_checkpoint(run).name == "step-000003"

    # --overwrite is the other way: the earlier run is deleted and a new one starts.
    replaced = run_cli(
        "train",
        "--out",
        run,
        *TINY,
        "--set",
        f"data.cache_dir={cache}",
        "--overwrite",
        "--stop-at-step",
        "2",
        one_thread=True,
    )
    assert replaced.returncode == 0, replaced.stderr
    assert train_steps(run) == [1, 2]
    assert [p.name for p in ckpt.complete_checkpoints(run)] == ["step-000002"]

    # --resume reads the run's own settings even with the --preset it was started with (not the
    # preset's defaults, which lack the --set values above).
    resumed = run_cli(
        "train", "--out", run, "--resume", "--preset", "tiny", "--stop-at-step", "3", one_thread=True
    )
    assert resumed.returncode == 0, resumed.stderr
    assert train_steps(run) == [1, 2, 3]
    other = run_cli("train", "--out", run, "--resume", "--preset", "small-100m", one_thread=True)
    assert (
        other.returncode == 2 and "was started with --preset tiny; resume it without --preset" in other.stderr
    )


def test_resume_of_nothing_says_how_to_start(tmp_path):
    result = run_cli("train", "--out", tmp_path / "nothing", "--resume")
    assert result.returncode == 2
    assert "holds no run of `train` to resume; start one with --preset P or --config FILE" in result.stderr
    both, never, two_models, own_model = run_clis(
        [
            ("train", "--out", tmp_path / "x", "--preset", "tiny", "--resume", "--overwrite"),
            ("train", "--out", tmp_path / "y", "--preset", "tiny", "--stop-at-step", "0"),
            ("train", "--out", tmp_path / "z", "--preset", "tiny", "--init-from", tmp_path / "x"),
            ("train", "--out", tmp_path / "w", "--resume", "--init-from", tmp_path / "x"),
        ]
    )
    assert (
        own_model.returncode == 2
        and "--resume continues the run's own model; --init-from" in own_model.stderr
    )
    assert both.returncode == 2 and "not both" in both.stderr
    assert two_models.returncode == 2 and "--preset (a new model) or --init-from" in two_models.stderr
    assert never.returncode == 2 and "--stop-at-step must be >= 1, got 0" in never.stderr
