"""Every command that reads a model takes a checkpoint directory or a run directory, the same way."""

from __future__ import annotations

import json

import pytest

from cli_helpers import run_cli, run_clis
from reasoning_llama.cli.model_dir import resolve_model_dir
from reasoning_llama.config import ModelConfig
from reasoning_llama.errors import CheckpointError
from reasoning_llama.model import Transformer
from reasoning_llama.model_files import save_model
from reasoning_llama.training import run_checkpoints as ckpt


@pytest.fixture
def run_dir(tmp_path):
    """A run directory as training leaves it: a best model and a latest step checkpoint."""
    config = ModelConfig(
        dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=64, final_block=False
    )
    run = tmp_path / "run"
    save_model(run / ckpt.BEST, Transformer(config))
    save_model(ckpt.step_dir(run, 3), Transformer(config))
    (ckpt.step_dir(run, 3) / ckpt.TRAINER_STATE).write_bytes(b"")
    return run


def test_a_run_directory_means_its_best_model_else_its_latest_checkpoint(run_dir, tmp_path):
    assert resolve_model_dir(run_dir) == run_dir / ckpt.BEST
    assert resolve_model_dir(run_dir / ckpt.BEST) == run_dir / ckpt.BEST
    (run_dir / ckpt.LATEST).write_text(ckpt.step_dir(run_dir, 3).relative_to(run_dir).as_posix())
    assert resolve_model_dir(run_dir / ckpt.LATEST) == ckpt.step_dir(run_dir, 3)  # the pointer, followed
    import shutil

    shutil.rmtree(run_dir / ckpt.BEST)
    assert resolve_model_dir(run_dir) == ckpt.step_dir(run_dir, 3)
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_model_dir(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither a checkpoint"):
        resolve_model_dir(tmp_path / "empty")


@pytest.mark.slow
def test_generate_info_and_export_take_a_run_directory(run_dir, tmp_path):
    done = run_cli(
        "generate",
        "--checkpoint",
        run_dir,
        "--prompt",
        "Hi",
        "--max-new-tokens",
        "3",
        "--json",
        one_thread=True,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["usage"]["completion_tokens"] <= 3
    done = run_cli("info", "--checkpoint", run_dir, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["config"]["dim"] == 32
    assert json.loads(done.stdout)["source"] == str(run_dir / ckpt.BEST)  # the model read, not the run
    done = run_cli("export", tmp_path / "hf", "--checkpoint", run_dir)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "hf" / "config.json").is_file()
    done = run_cli("chat", "--checkpoint", tmp_path / "nowhere")
    assert done.returncode == 2 and "does not exist" in done.stderr


@pytest.mark.slow
def test_train_starts_from_a_run_directorys_best_model(run_dir, tmp_path):
    from omegaconf import OmegaConf

    from reasoning_llama.training.run_dir import RUN_CONFIG

    out = tmp_path / "from-run"
    done = run_cli(
        "train", "--init-from", run_dir, "--out", out, "--no-progress",  # no preset or recipe needed
        "--set", "data.seq_len=64", "--set", f"data.cache_dir={tmp_path / 'cache'}",
        "--set", "data.synthetic_train_size=40", "--set", "data.synthetic_val_size=4",
        "--set", "train.max_steps=1", "--set", "train.micro_batch_size=2", "--set", "train.global_batch_tokens=128",
        "--set", "train.task_eval_size=0",
        one_thread=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert OmegaConf.load(out / RUN_CONFIG).train.init_from == str(run_dir / ckpt.BEST)


@pytest.mark.slow
def test_eval_of_a_run_names_the_tasks_it_trained_on(run_dir):
    """`--task synthetic` means the default families at their own difficulty; a run trained on others
    (the quickstart's, at difficulty 4) is told the flags that score what it learned."""
    from reasoning_llama.config import load_run_config
    from reasoning_llama.training.run_dir import save_run_config

    save_run_config(run_dir, load_run_config("quickstart"))
    asked, trained = run_clis(
        [
            ["eval", "--checkpoint", run_dir, "--task", "synthetic", "--limit", "1", "--json"],
            [
                "eval",
                "--checkpoint",
                run_dir,
                "--task",
                "synthetic:max_digit",
                "--difficulty",
                "4",
                "--limit",
                "1",
            ],
        ],
        one_thread=True,
    )
    flags = "--task synthetic:chain_sum,sort_digits,max_digit --difficulty 4"
    assert (
        asked.returncode == 0
        and f"trained on chain_sum, sort_digits, max_digit at difficulty 4; to score what it learned: {flags}"
        in asked.stderr
    )
    assert trained.returncode == 0 and "note:" not in trained.stderr  # one of its families, at its level
