"""Run directories through the training loop: a new run, a resume, --overwrite, and what each must
leave alone."""

from __future__ import annotations

import pytest

from reasoning_llama.config import RunConfig
from reasoning_llama.errors import ConfigError, DataError
from reasoning_llama.training import run_checkpoints as ckpt
from reasoning_llama.training import train
from reasoning_llama.training.metrics import read_metrics
from test_training_loop import tiny_run

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_refuses_to_overwrite_a_run_or_resume_nothing(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match="holds no run; start one without --resume"):
        train(tiny_run(tmp_path), run, resume=True, progress=False)
    train(tiny_run(tmp_path, "train.max_steps=1"), run, progress=False)
    with pytest.raises(ConfigError, match=r"already holds a run; continue it with: .* --resume, --overwrite"):
        train(tiny_run(tmp_path), run, progress=False)
    (run / "notes.txt").write_text("kept")
    train(tiny_run(tmp_path, "train.max_steps=2"), run, overwrite=True, progress=False)
    assert (run / "notes.txt").read_text() == "kept"  # the run's own files go, nothing else
    assert [r["step"] for r in read_metrics(run) if "train_loss" in r] == [1, 2]
    assert [p.name for p in ckpt.complete_checkpoints(run)] == ["step-000002"]
    other = tmp_path / "not-a-run"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    with pytest.raises(ConfigError, match="does not look like a training run"):
        train(tiny_run(tmp_path), other, overwrite=True, progress=False)
    assert (other / "thesis.tex").read_text() == "precious"
    # A run written into that directory, then overwritten: the user's file stays.
    train(tiny_run(tmp_path, "train.max_steps=1"), other, progress=False)
    train(tiny_run(tmp_path, "train.max_steps=1"), other, overwrite=True, progress=False)
    assert (other / "thesis.tex").read_text() == "precious"
    with pytest.raises(ConfigError, match="is a file; a run needs a directory"):
        train(tiny_run(tmp_path), other / "thesis.tex", progress=False)


def test_overwrite_refuses_what_it_must_not_delete(tmp_path):
    """A directory of someone's files that holds no run (quickstart's --overwrite calls start_over too),
    and a run the new one starts from, which would be gone before it is read."""
    from reasoning_llama.training.run_dir import start_over

    other = tmp_path / "results"
    (other / "best").mkdir(parents=True)
    (other / "plot.png").write_bytes(b"mine")
    with pytest.raises(ConfigError, match="does not look like a training run"):
        start_over(other)
    assert (other / "plot.png").read_bytes() == b"mine" and (other / "best").is_dir()
    run = tmp_path / "run"
    train(tiny_run(tmp_path, "train.max_steps=2"), run, progress=False)
    start = f"train.init_from={run / 'checkpoints/step-000002'}"
    with pytest.raises(
        ConfigError, match=r"is part of the run in .*, which --overwrite deletes; copy it elsewhere"
    ):
        train(tiny_run(tmp_path, start, "train.model_overrides={}"), run, overwrite=True, progress=False)
    assert ckpt.latest_checkpoint(run) == run / "checkpoints/step-000002"


def test_a_torchrun_restart_of_an_overwrite_replaces_the_old_run_unless_it_had_begun(tmp_path, monkeypatch):
    """Under torchrun --max-restarts the command, --overwrite included, runs again after a failure: if
    the first attempt died before it began, the old run is still to be replaced, not resumed; if it
    had begun, the restart resumes it."""
    run = tmp_path / "run"
    train(tiny_run(tmp_path, "train.max_steps=4", "train.seed=7"), run, progress=False)  # the old run
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    config = tiny_run(tmp_path, "train.max_steps=2")
    result = train(config, run, overwrite=True, progress=False)  # attempt 0 died before it began
    assert result.step == 2 and [r["step"] for r in read_metrics(run) if "train_loss" in r] == [1, 2]
    assert [p.name for p in ckpt.complete_checkpoints(run)] == ["step-000002"]
    # Attempt 0 began and saved step 2 before it died; the restart resumes it (step 2 is not rewritten).
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    config = tiny_run(tmp_path, "train.max_steps=4")
    train(config, run, overwrite=True, progress=False, stop_at_step=2)
    saved = (run / "checkpoints/step-000002/trainer_state.pt").stat().st_ino
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert train(config, run, overwrite=True, progress=False).step == 4
    assert (run / "checkpoints/step-000002/trainer_state.pt").stat().st_ino == saved
    assert [r["step"] for r in read_metrics(run) if "train_loss" in r] == [1, 2, 3, 4]


def test_a_start_that_fails_changes_nothing_in_the_run_directory(tmp_path):
    """The settings are saved once the run has started: a failed fresh start can be retried as it
    was meant, and a failed resume with changed settings leaves the run resumable as it was."""
    run = tmp_path / "run"
    missing = ["data.source=local", f"data.path={tmp_path / 'nope.jsonl'}"]
    with pytest.raises(DataError):
        train(tiny_run(tmp_path, *missing), run / "deeper", progress=False)
    assert not run.exists()  # not even made
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ConfigError, match=r"--out .*: cannot create the directory"):
        train(tiny_run(tmp_path), tmp_path / "a_file" / "run", progress=False)
    run.mkdir()
    with pytest.raises(DataError):
        train(tiny_run(tmp_path, *missing), run, progress=False)
    train(tiny_run(tmp_path, "train.max_steps=2"), run, progress=False)  # not "already holds a run"
    saved = (run / "run_config.yaml").read_text()
    with pytest.raises(DataError):  # --overwrite replaces the run only once the new one has started
        train(tiny_run(tmp_path, *missing), run, overwrite=True, progress=False)
    assert (run / "run_config.yaml").read_text() == saved and ckpt.latest_checkpoint(run) is not None
    with pytest.raises(DataError, match="cannot resume the data position"):
        train(tiny_run(tmp_path, "train.max_steps=4", "data.seq_len=64"), run, resume=True, progress=False)
    assert (run / "run_config.yaml").read_text() == saved
    result = train(tiny_run(tmp_path, "train.max_steps=4"), run, resume=True, progress=False)
    assert result.step == 4


def test_a_run_that_lost_its_settings_resumes_with_them_given_again(tmp_path):
    from reasoning_llama.cli.run_settings import run_settings

    run = tmp_path / "run"
    train(tiny_run(tmp_path, "train.max_steps=2"), run, progress=False)
    (run / "run_config.yaml").rename(tmp_path / "settings.yaml")
    common = {"overwrite": False, "command": "train", "how_to_start": "--preset P or --config FILE"}
    with pytest.raises(
        ConfigError, match=r"without its run_config\.yaml; give its settings again with --config"
    ):
        run_settings(RunConfig, run, None, [], resume=True, **common)
    settings = run_settings(
        RunConfig, run, tmp_path / "settings.yaml", ["train.max_steps=3"], resume=True, **common
    )
    assert train(settings, run, resume=True, progress=False).step == 3


def test_a_run_inside_another_runs_checkpoints_is_refused(tmp_path):
    run = tmp_path / "run"
    train(tiny_run(tmp_path, "train.max_steps=2"), run, progress=False)
    for inside in (run / "best", run / "checkpoints" / "mine"):
        with pytest.raises(ConfigError, match=f"--out {inside} lies inside the run in {run}, which replaces"):
            train(tiny_run(tmp_path, "train.max_steps=2"), inside, progress=False)
    assert not (run / "checkpoints" / "mine").exists()
    # A checkpoints/ folder of one's own, holding runs, is no run: a run in it starts.
    (tmp_path / "mine" / "checkpoints").mkdir(parents=True)
    train(tiny_run(tmp_path, "train.max_steps=1"), tmp_path / "mine" / "checkpoints" / "run1", progress=False)
