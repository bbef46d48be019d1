"""The quickstart recipe and its whole path, end to end in its --fast form."""

from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path

import pytest

from cli_helpers import run_cli
from reasoning_llama.config import RECIPES, load_run_config, recipe_names
from reasoning_llama.errors import ConfigError
from reasoning_llama.quickstart import quickstart_config


def test_the_quickstart_recipe_is_the_packaged_yaml_that_train_config_names():
    from_name = load_run_config("quickstart")
    assert dataclasses.asdict(from_name) == dataclasses.asdict(quickstart_config())
    assert (RECIPES / "quickstart.yaml").is_file() and recipe_names() == ["quickstart", "reasoning-base-20k"]
    with pytest.raises(ConfigError, match="packaged recipe: quickstart, reasoning-base-20k"):
        load_run_config("quickstrat")


def test_reasoning_base_recipe_is_the_seed_run_with_early_stopping():
    config = load_run_config("reasoning-base-20k")
    t, d = config.train, config.data
    assert (t.preset, d.seq_len, d.source, d.path) == (
        "small-100m",
        1280,
        "hub",
        "KingNish/reasoning-base-20k",
    )
    assert (t.beta1, t.beta2, t.lr, t.weight_decay) == (0.9, 0.95, 8e-4, 0.1)
    assert t.warmup_steps > 0 and t.min_lr_ratio < 1  # warmup, then cosine to a floor
    assert t.epochs is not None and t.epochs <= 10 and t.early_stopping_patience > 0


@pytest.mark.slow
def test_quickstart_fast_runs_end_to_end(tmp_path):
    out = tmp_path / "qs"
    result = run_cli("quickstart", "--fast", "--out", str(out), "--json", one_thread=True)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    families = set(quickstart_config().data.families)
    assert len(families) == 3
    for when in ("before", "after"):
        assert set(report[when]["families"]) == families
        assert report[when]["overall"]["n"] == 3 * 4  # four held-out problems per family with --fast
    assert report["steps"] == report["planned_steps"] == 12 and report["stop_reason"] == "finished"
    assert Path(report["checkpoint"]) == out / "best" and (out / "best/model.safetensors").is_file()
    assert Path(report["plot"]).read_bytes().startswith(b"\x89PNG")
    assert {"user", "reasoning", "answer", "reference"} <= set(report["sample"])
    # The human summary goes to stderr: the table, a sample, and where things are.
    for text in ("before", "after", "sample conversation", f"checkpoint: {out / 'best'}", "plot:"):
        assert text in result.stderr

    # Run again, it keeps the run and names the flag that replaces it, also as make takes it.
    again = run_cli("quickstart", "--fast", "--out", str(out), one_thread=True)
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert f"{out} already holds a run; pass --overwrite to replace it" in again.stderr
    assert "make quickstart QUICKSTART_ARGS=--overwrite" in again.stderr
    assert (out / "best/model.safetensors").is_file()


@pytest.mark.slow
def test_a_quickstart_stopped_before_its_first_validation_says_how_to_resume(tmp_path):
    """Stopped (as by Ctrl-C) before any best model exists: no evaluation, the resume command, and
    that command finishes the run."""
    out = tmp_path / "qs"
    stopped = run_cli("quickstart", "--fast", "--out", out, "--stop-at-step", "3", "--json", one_thread=True)
    assert stopped.returncode == 0, stopped.stderr
    assert json.loads(stopped.stdout)["stop_reason"] == "stop_at_step"  # --json still gives one object
    assert (
        "stopped at step 3 of 12; saved" in stopped.stderr and "evaluating the trained" not in stopped.stderr
    )
    resume = stopped.stderr.split("resume with: ")[1].strip()
    assert resume == f"reasoning-llama train --out {shlex.quote(str(out))} --resume"
    resumed = run_cli(*shlex.split(resume)[1:], "--no-progress", one_thread=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "finished at step 12 of 12" in resumed.stderr and (out / "best/model.safetensors").is_file()


def test_an_out_directory_holding_other_files_is_refused_without_suggesting_overwrite(tmp_path):
    """--overwrite replaces runs only: a directory of other files is told to choose another --out."""
    (tmp_path / "notes.txt").write_text("mine")
    result = run_cli("quickstart", "--fast", "--out", tmp_path, one_thread=True)
    assert result.returncode == 2 and "holds no run; choose another --out" in result.stderr
    assert "--overwrite" not in result.stderr and (tmp_path / "notes.txt").read_text() == "mine"


def test_the_summary_leaves_out_empty_reasoning_lines_and_cuts_a_long_one():
    from reasoning_llama.quickstart import SAMPLE_LINES, QuickstartReport, format_report

    scores = {"families": {"max_digit": {"exact_match": 0.0, "format_adherence": 0.0}}}
    overall = {"exact_match": 0.0, "format_adherence": 0.0, "n": 1}
    sample = {"family": "max_digit", "user": "q", "answer": "1", "reference": "2", "correct": False}
    report = QuickstartReport(
        run_dir="r", checkpoint="r/best", plot="r/plot.png", steps=1, planned_steps=1,
        stop_reason="finished", train_seconds=1.0, total_seconds=2.0,
        before={**scores, "overall": overall}, after={**scores, "overall": overall},
        sample={**sample, "reasoning": "\n\n\nstep one\n\n" + "\n".join(f"line {i}" for i in range(30))},
    )  # fmt: skip
    text = format_report(report)
    reasoning = text.split("reasoning: ")[1].split("\n  answer:")[0].splitlines()
    assert reasoning[0] == "step one" and len(reasoning) == SAMPLE_LINES + 1
    assert reasoning[-1].strip() == f"... ({31 - SAMPLE_LINES} more lines)"
    assert all(line.strip() for line in reasoning)
