"""Run directories: RNG capture, pruning, pointers, and real processes killed or interrupted mid-run."""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from reasoning_llama.loss import ModelWithLoss
from reasoning_llama.model import Transformer
from reasoning_llama.model_files import load_model
from reasoning_llama.training import run_checkpoints as ckpt
from reasoning_llama.training import train
from reasoning_llama.training.metrics import read_metrics
from test_training_loop import tiny_run

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save({"rng": ckpt.capture_rng()}, tmp_path / "state.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.restore_rng(torch.load(tmp_path / "state.pt", weights_only=True)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_keep_last_and_latest_pointer(tmp_path, tiny_config):
    loss_model = ModelWithLoss(Transformer(tiny_config))
    optimizer = torch.optim.AdamW(loss_model.parameters())
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(tmp_path, step, loss_model, optimizer, {"step": step}, keep_last=2)
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step-000003", "step-000004"]
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "checkpoints/step-000004"
    assert ckpt.load_trainer_state(ckpt.latest_checkpoint(tmp_path)) == {"step": 4, "format": 2}
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000003", "step-000004"]
    # A pointer to a vanished directory falls back to the newest complete checkpoint.
    (tmp_path / "latest").write_text("checkpoints/step-000009\n")
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "checkpoints/step-000004"


def test_what_a_killed_process_left_half_done_is_cleared(tmp_path, tiny_config):
    """A checkpoint half-written, half-deleted (renamed away first, or by an older version in place,
    its trainer state gone) and RUN/best between its two renames: the complete checkpoints remain,
    and the last committed best is put back."""
    loss_model = ModelWithLoss(Transformer(tiny_config))
    optimizer = torch.optim.AdamW(loss_model.parameters())
    saved = ckpt.save_checkpoint(tmp_path, 1, loss_model, optimizer, {}, keep_last=1)
    root = tmp_path / "checkpoints"
    for leftover in (".step-000002.tmp-1a2b3c4d", ".step-000000.old-1a2b3c4d", "step-000000/distributed"):
        (root / leftover).mkdir(parents=True)
    (root / "step-000005").mkdir()  # newer than every complete one: not ours to judge, left alone
    for name, files in (
        (".best.old-1a2b3c4d", ("best.json", "model.safetensors", "config.json")),
        (".best.old-00000000", ("best.json",)),
    ):
        (tmp_path / name).mkdir()  # the second one half-deleted by an earlier kill: never put back
        for file in files:
            (tmp_path / name / file).write_text("{}")
    (tmp_path / ".best.tmp-5e6f7a8b").mkdir()
    ckpt.remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == [saved.name, "step-000005"]
    assert sorted(p.name for p in (tmp_path / "best").iterdir()) == [
        "best.json",
        "config.json",
        "model.safetensors",
    ]
    assert not list(tmp_path.glob(".best*"))


def test_a_failed_write_is_one_line_and_a_failed_prune_only_a_warning(
    tmp_path, tiny_config, monkeypatch, caplog
):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from reasoning_llama.errors import CheckpointError

    loss_model = ModelWithLoss(Transformer(tiny_config))
    optimizer = torch.optim.AdamW(loss_model.parameters())
    for step in (1, 2):
        ckpt.save_checkpoint(tmp_path, step, loss_model, optimizer, {}, keep_last=5)
    monkeypatch.setattr(ckpt.os, "rename", lambda *_: (_ for _ in ()).throw(PermissionError("locked")))
    ckpt.prune_checkpoints(tmp_path, keep_last=1)  # the checkpoint saved stands: no error
    assert (
        len(ckpt.complete_checkpoints(tmp_path)) == 2 and "could not delete the old checkpoint" in caplog.text
    )
    monkeypatch.undo()

    def full_disk(*_, **__):
        raise CheckpointException("failed", {0: (OSError(28, "No space left on device"), None)})

    monkeypatch.setattr(dcp, "save", full_disk)
    with pytest.raises(
        CheckpointError, match=r"cannot write .*distributed: \[Errno 28\] No space left on device"
    ):
        ckpt.save_checkpoint(tmp_path, 3, loss_model, optimizer, {}, keep_last=5)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000001", "step-000002"]


def test_model_and_optimizer_round_trip_through_the_sharded_checkpoint(tmp_path, tiny_config):
    """distributed/ holds model and optimizer by parameter name; model.safetensors the same weights."""
    source = ModelWithLoss(Transformer(tiny_config))
    optimizer = torch.optim.AdamW(source.parameters(), lr=1e-2)
    source(*tiny_batch(tiny_config)).backward()
    optimizer.step()
    saved = ckpt.save_checkpoint(tmp_path, 1, source, optimizer, {"step": 1}, keep_last=1)
    assert (saved / ckpt.DISTRIBUTED).is_dir()

    torch.manual_seed(1)
    target = ModelWithLoss(Transformer(tiny_config))
    target_optimizer = torch.optim.AdamW(target.parameters(), lr=1e-2)
    assert ckpt.restore_checkpoint(saved, target, target_optimizer)["step"] == 1
    for (name, a), b in zip(source.named_parameters(), target.parameters(), strict=True):
        assert torch.equal(a, b), name
        state_a, state_b = optimizer.state[a], target_optimizer.state[b]
        assert torch.equal(state_a["exp_avg"], state_b["exp_avg"]) and state_a["step"] == state_b["step"]
    plain = load_model(saved).state_dict()
    assert all(torch.equal(plain[k], v) for k, v in source.model.state_dict().items())


def tiny_batch(config):
    ids = torch.randint(0, config.vocab_size, (2, 16))
    loss_mask = torch.ones(2, 16, dtype=torch.bool)
    positions = torch.arange(16).expand(2, 16)
    return ids, ids.roll(-1, 1), loss_mask, positions, torch.zeros(2, 16, dtype=torch.long)


def test_a_damaged_or_mismatched_shard_is_a_checkpoint_error(tmp_path, tiny_config):
    """torch's CheckpointException is a BaseException: it must still become a one-line error."""
    from reasoning_llama.errors import CheckpointError

    source = ModelWithLoss(Transformer(tiny_config))
    saved = ckpt.save_checkpoint(tmp_path, 1, source, torch.optim.AdamW(source.parameters()), {}, keep_last=1)
    wider = ModelWithLoss(Transformer(dataclasses.replace(tiny_config, dim=tiny_config.dim * 2)))
    with pytest.raises(CheckpointError, match=r"cannot read .*distributed: Size mismatch") as info:
        ckpt.restore_checkpoint(saved, wider, torch.optim.AdamW(wider.parameters()))
    assert "\n" not in str(info.value)
    shard = next((saved / ckpt.DISTRIBUTED).glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:1000])
    same = ModelWithLoss(Transformer(tiny_config))
    with pytest.raises(CheckpointError, match=r"cannot read .*distributed") as info:
        ckpt.restore_checkpoint(saved, same, torch.optim.AdamW(same.parameters()))
    assert "\n" not in str(info.value)


def test_unreadable_trainer_state_is_a_checkpoint_error(tmp_path):
    from reasoning_llama.errors import CheckpointError

    with pytest.raises(CheckpointError, match="not a resumable training checkpoint"):
        ckpt.load_trainer_state(tmp_path)
    (tmp_path / ckpt.TRAINER_STATE).write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="cannot read"):
        ckpt.load_trainer_state(tmp_path)


def test_a_resumed_run_logs_each_step_once_in_tensorboard_too(tmp_path, monkeypatch):
    """A run that logged steps 3 and 4 and then failed to save step 4 resumes from step 2: its JSONL
    and its TensorBoard curves show each step once, the second attempt's."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from reasoning_llama.errors import CheckpointError

    run, save = tmp_path / "run", ckpt.save_checkpoint

    def full_disk_at_step_4(directory, step, *args, **kwargs):
        if step == 4:
            raise CheckpointError("No space left on device")
        return save(directory, step, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_checkpoint", full_disk_at_step_4)
    with pytest.raises(CheckpointError):
        train(tiny_run(tmp_path), run, progress=False)
    monkeypatch.undo()
    train(tiny_run(tmp_path), run, resume=True, progress=False)

    logged = {r["step"]: r["train_loss"] for r in read_metrics(run) if "train_loss" in r}
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    curve = [(e.step, e.value) for e in events.Scalars("train_loss")]
    assert [step for step, _ in curve] == list(logged) == [1, 2, 3, 4, 5, 6]
    assert [value for _, value in curve] == pytest.approx(list(logged.values()))


# --- real processes ------------------------------------------------------------------------


# `reasoning-llama train` with every checkpoint write slowed down inside its temporary directory, so a
# test can kill the process mid-save.
SLOW_SAVES = """
import sys, time
from reasoning_llama.training import run_checkpoints
write = run_checkpoints.write_model_files
def slow_write(*args, **kwargs):
    write(*args, **kwargs)
    time.sleep(SECONDS)
run_checkpoints.write_model_files = slow_write
from reasoning_llama.cli import main
main(sys.argv[1:])
"""


def start_training(
    tmp_path: Path, run: Path, *overrides: str, slow_saves: float | None = None
) -> subprocess.Popen:
    """`reasoning-llama train --config F --out RUN` in its own process."""
    config = tmp_path / "config.yaml"
    OmegaConf.save(OmegaConf.structured(tiny_run(tmp_path, *overrides)), config)
    entry = ["-m", "reasoning_llama"]
    if slow_saves is not None:
        entry = ["-c", SLOW_SAVES.replace("SECONDS", str(slow_saves))]
    return subprocess.Popen(
        [sys.executable, *entry, "train", "--config", str(config), "--out", str(run), "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def wait_for(condition, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"training exited early ({process.returncode}): {process.stderr.read()}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("timed out waiting for the training process")
        time.sleep(0.05)


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_leaves_the_previous_one_loadable(tmp_path):
    run = tmp_path / "run"
    # Every save sleeps inside the atomic write, so the second one is caught half-written.
    process = start_training(tmp_path, run, slow_saves=1.5)
    wait_for(lambda: (run / "latest").is_file(), process)
    wait_for(lambda: any(p.name.startswith(".step-000004") for p in (run / "checkpoints").iterdir()), process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)

    latest = ckpt.latest_checkpoint(run)
    assert latest == run / "checkpoints/step-000002"
    assert ckpt.load_trainer_state(latest)["progress"]["step"] == 2
    load_model(latest)  # weights, config and tokenizer all intact
    assert any(p.name.startswith(".step-") for p in (run / "checkpoints").iterdir())  # the torn write

    result = train(tiny_run(tmp_path), run, resume=True, progress=False)
    assert result.step == 6 and result.stop_reason == "finished"
    assert not any(p.name.startswith(".") for p in (run / "checkpoints").iterdir())  # temporaries cleaned
    assert [r["step"] for r in read_metrics(run) if "train_loss" in r] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stop", "said"), [(signal.SIGINT, "interrupted: "), (signal.SIGTERM, "terminated: ")]
)
def test_ctrl_c_or_sigterm_saves_a_resumable_checkpoint_and_exits_130(tmp_path, stop, said):
    """SIGTERM is what `docker stop`, a scheduler's preemption or `kill` send before they kill."""
    run = tmp_path / "run"
    process = start_training(
        tmp_path, run, "train.max_steps=100000", "train.save_every=0", "train.eval_every=0"
    )
    wait_for(lambda: len(read_metrics(run)) >= 2, process)
    process.send_signal(stop)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and said + "finishing this step, then saving" in stderr
    assert f"({'Ctrl-C' if stop == signal.SIGINT else 'SIGTERM'} again to abort)" in stderr
    assert f"reasoning-llama train --out {run} --resume" in stderr

    latest = ckpt.latest_checkpoint(run)
    stopped_at = ckpt.load_trainer_state(latest)["progress"]["step"]
    assert latest.name == f"step-{stopped_at:06d}" and stopped_at >= 2
    result = train(tiny_run(tmp_path, f"train.max_steps={stopped_at + 2}"), run, resume=True, progress=False)
    assert result.step == stopped_at + 2
