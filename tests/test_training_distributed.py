"""Data-parallel training with real `torchrun` processes on gloo: DDP and FSDP2 give the one-process
run, a killed rank comes back from its checkpoint, and a run moves between world sizes."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from cli_helpers import run_cli
from reasoning_llama.config import RunConfig
from reasoning_llama.training import run_checkpoints as ckpt
from reasoning_llama.training import train
from reasoning_llama.training.metrics import read_metrics
from test_training_loop import tiny_run

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

TOLERANCE = 1e-5  # relative, per step loss and per weight tensor


def run_config(tmp_path: Path, *overrides: str) -> RunConfig:
    # 4 rows of 128 a micro-batch, 1024 tokens a step: 2 micro-batches in one process, 1 in each of two.
    # 100 problems pack into fewer rows than 6 steps take: the runs cross an epoch's partial last step.
    # Validation: 3 micro-batches of rows, which two processes do not divide.
    return tiny_run(
        tmp_path,
        "train.task_eval_size=0",
        "data.synthetic_train_size=100",
        "data.synthetic_val_size=40",
        "train.eval_batches=3",
        *overrides,
    )


def torchrun(
    tmp_path: Path,
    run: Path,
    config: RunConfig,
    *args: str,
    nproc: int = 2,
    restarts: int = 0,
    launcher: tuple[str, ...] = ("--standalone",),
    cwd: Path | None = None,
) -> subprocess.Popen:
    """`torchrun --standalone --nproc_per_node N -m reasoning_llama train --config F --out RUN ...`
    (`launcher` replaces `--standalone`: a multi-node rendezvous; `cwd`: where it runs)."""
    path = tmp_path / f"config-{time.monotonic_ns()}.yaml"
    OmegaConf.save(OmegaConf.structured(config), path)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *launcher,
        f"--nproc_per_node={nproc}",
        f"--max-restarts={restarts}",
        "-m",
        "reasoning_llama",
        "train",
        "--config",
        str(path),
        "--out",
        str(run),
        "--no-progress",
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
        cwd=cwd,
    )


def wait(process: subprocess.Popen, timeout: float = 180) -> str:
    """torchrun's stderr once it and its workers exit; on a hang, kill them all and fail."""
    try:
        return process.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise AssertionError(
            f"torchrun did not finish in {timeout} s: {process.communicate()[1][-4000:]}"
        ) from None


def finish(process: subprocess.Popen) -> str:
    stderr = wait(process)
    assert process.returncode == 0, stderr[-4000:]
    return stderr


def losses(run: Path) -> list[float]:
    return [r["train_loss"] for r in read_metrics(run) if "train_loss" in r]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(ckpt.latest_checkpoint(run) / "model.safetensors")


def assert_same_run(run: Path, reference: Path) -> None:
    got, expected = losses(run), losses(reference)
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert abs(a - b) <= TOLERANCE * abs(b), (got, expected)
    a, b = final_weights(run), final_weights(reference)
    assert a.keys() == b.keys()
    for name in b:
        error = (a[name] - b[name]).abs().max() / b[name].abs().max()
        assert error <= TOLERANCE, f"{name}: relative difference {error:.2e}"
    assert expected[-1] < expected[0]  # the reference learned: these are not two untouched inits


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The one-process run every distributed run is compared with."""
    tmp_path = tmp_path_factory.mktemp("reference")
    torch.set_num_threads(1)
    train(run_config(tmp_path), tmp_path / "run", progress=False)
    return tmp_path / "run"


def test_the_mode_fits_how_the_processes_were_started(monkeypatch):
    """ddp/fsdp need torchrun's processes; none under torchrun would make every process rank 0."""
    from reasoning_llama.errors import ConfigError
    from reasoning_llama.training.distributed import resolve_mode

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert (resolve_mode("auto"), resolve_mode("none")) == ("none", "none")
    with pytest.raises(ConfigError, match="needs the processes torchrun starts"):
        resolve_mode("fsdp")
    (
        monkeypatch.setenv("RANK", "0"),
        monkeypatch.setenv("WORLD_SIZE", "2"),
        monkeypatch.setenv("LOCAL_RANK", "0"),
    )
    assert (resolve_mode("auto"), resolve_mode("fsdp")) == ("ddp", "fsdp")
    with pytest.raises(
        ConfigError,
        match=r"train.distributed=none with 2 torchrun processes; pass --set train.distributed=auto",
    ):
        resolve_mode("none")


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_give_the_one_process_run(tmp_path, reference, mode):
    run = tmp_path / "run"
    stderr = finish(torchrun(tmp_path, run, run_config(tmp_path, f"train.distributed={mode}")))
    assert f"{mode} over 2 processes" in stderr
    assert stderr.count("finished at step 6 of 6") == 1  # rank 0 alone reports
    assert_same_run(run, reference)
    validation = [r["val_loss"] for r in read_metrics(run) if "val_loss" in r]
    expected = [r["val_loss"] for r in read_metrics(reference) if "val_loss" in r]
    assert validation == pytest.approx(expected, rel=TOLERANCE)
    assert (run / "best/model.safetensors").is_file()


def test_two_machines_meet_through_c10d_rendezvous_and_give_the_one_process_run(tmp_path, reference):
    """The README's multi-node command: one launcher per machine (here two on loopback, one process
    each), the same command on both, meeting at a c10d rendezvous endpoint, one run directory. Stopped,
    it prints the multi-node command that resumes it, which (with the endpoint filled in) does."""
    run = tmp_path / "run"
    config = run_config(tmp_path, "train.distributed=ddp")
    launcher = two_machines()
    machines = [
        torchrun(tmp_path, run, config, "--stop-at-step", "3", nproc=1, launcher=launcher) for _ in range(2)
    ]
    stderr = [finish(machine) for machine in machines]
    assert sum("ddp over 2 processes" in e for e in stderr) == 1  # rank 0 alone reports
    hints = [e.split("resume with: ")[1].splitlines()[0] for e in stderr if "resume with: " in e]
    assert len(hints) == 1, stderr
    prefix = "torchrun --nnodes 2 --nproc_per_node 1 --rdzv-backend c10d --rdzv-endpoint HOST:PORT -m "
    assert hints[0].startswith(prefix) and " on each of the 2 machines" in hints[0], hints[0]
    endpoint = next(flag for flag in two_machines() if flag.startswith("--rdzv-endpoint")).split("=")[1]
    args = shlex.split(hints[0].split(" on each of")[0].replace("HOST:PORT", endpoint))[1:]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    machines = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", *args, "--no-progress"],
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,
        )
        for _ in range(2)
    ]
    stderr = [finish(machine) for machine in machines]
    assert sum(e.count("finished at step 6 of 6") for e in stderr) == 1
    assert_same_run(run, reference)


def two_machines() -> tuple[str, ...]:
    """The launcher flags of one of two machines meeting at a c10d rendezvous on loopback."""
    with socket.socket() as probe:  # a free port for the rendezvous store
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return ("--nnodes=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=two-nodes")


@pytest.mark.parametrize("first, then", [(2, 1), (1, 2)])
def test_a_run_resumes_at_another_world_size(tmp_path, reference, first, then):
    """k steps at one world size, the rest at another: the run of one process throughout (FSDP shards).
    2 -> 1 resumes with the one-process command the stopped run printed, run as printed."""
    run = tmp_path / "run"
    if first == 2:
        config = run_config(tmp_path, "train.distributed=fsdp")
        stderr = finish(torchrun(tmp_path, run, config, "--stop-at-step", "3"))
        hint = stderr.split("resume with: ")[1].splitlines()[0]
        assert hint.startswith(f"torchrun --nproc_per_node 2 -m reasoning_llama train --out {run} --resume")
        one_process = shlex.split(hint.split("(or in one process: ")[1].removesuffix(")"))
        resumed = run_cli(*one_process[1:], "--no-progress", one_thread=True)
        assert resumed.returncode == 0, resumed.stderr
    else:
        train(run_config(tmp_path, "train.distributed=none"), run, progress=False, stop_at_step=3)
        finish(torchrun(tmp_path, run, run_config(tmp_path, "train.distributed=fsdp"), "--resume"))
    assert ckpt.load_trainer_state(ckpt.latest_checkpoint(run))["world_size"] == then
    assert_same_run(run, reference)


def test_a_killed_rank_brings_the_group_back_from_the_last_checkpoint(tmp_path, reference):
    """SIGKILL one of two ranks mid-run under --max-restarts 1: the run finishes as if never hit."""
    run = tmp_path / "run"
    config = run_config(tmp_path, "train.distributed=ddp", "train.max_steps=6", "train.save_every=2")
    process = torchrun(tmp_path, run, config, restarts=1)
    deadline = time.monotonic() + 120
    while ckpt.latest_checkpoint(run) is None:
        assert process.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    os.kill(worker_pid(process.pid, rank=1), signal.SIGKILL)
    stderr = finish(process)
    assert "resuming from" in stderr, stderr[-3000:]
    assert_same_run(run, reference)


def test_ctrl_c_under_torchrun_saves_at_the_next_step_and_names_the_resume(tmp_path):
    """A terminal's Ctrl-C reaches torchrun and its workers (and torchrun forwards it again): the ranks
    agree to stop within a step, long before torchrun's 30 s, save, and say so once."""
    run = tmp_path / "run"
    rare = ("train.log_every=1000", "train.eval_every=0", "train.save_every=0")  # no other sync point
    process = torchrun(tmp_path, run, run_config(tmp_path, "train.max_steps=100000", *rare))
    deadline = time.monotonic() + 120
    while not losses(run):  # step 1 is logged
        assert process.poll() is None and time.monotonic() < deadline, "no step was logged"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)  # the whole foreground group, as a terminal does
    stderr = wait(process, timeout=60)
    assert stderr.count("interrupted: finishing this step") == 1 and stderr.count("interrupted at step") == 1
    stopped = ckpt.latest_checkpoint(run)
    assert stopped is not None, stderr[-3000:]
    assert "resume with: torchrun --nproc_per_node 2 -m reasoning_llama train --out" in stderr
    step = ckpt.load_trainer_state(stopped)["progress"]["step"]
    resumed = train(
        run_config(tmp_path, f"train.max_steps={step + 2}", *rare), run, resume=True, progress=False
    )
    assert resumed.step == step + 2  # the printed one-process form of the resume


def worker_pid(agent_pid: int, rank: int) -> int:
    """The pid of the torchrun worker with RANK=rank (a child of the agent)."""
    children = Path(f"/proc/{agent_pid}/task/{agent_pid}/children").read_text().split()
    for child in children:
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(child)
    raise AssertionError(f"no worker with RANK={rank} among {children}")


def test_an_error_on_one_rank_stops_every_rank_with_its_message(tmp_path):
    config = run_config(
        tmp_path, "train.distributed=ddp", "data.source=local", f"data.path={tmp_path / 'missing.jsonl'}"
    )
    process = torchrun(tmp_path, tmp_path / "run", config)
    stderr = wait(process)
    assert process.returncode != 0
    assert "error:" in stderr and "missing.jsonl" in stderr
    said = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(said) == 1 and "missing.jsonl does not exist" in said[0]  # rank 0's error, said by rank 0


def test_a_bad_argument_is_said_once_per_machine_not_once_per_process(tmp_path):
    """Before the processes form a group, each meets the same error in the same arguments."""
    process = torchrun(tmp_path, tmp_path / "run", run_config(tmp_path), "--set", "train.lr=fast")
    stderr = wait(process)
    assert process.returncode != 0
    said = "error: bad config: train.lr: Value 'fast' of type 'str' could not be converted to Float"
    assert stderr.splitlines().count(said) == 1  # a line of its own, once
    # torchrun's own summary of the failure names it too, not a link to its docs.
    root_cause = stderr.split("Root Cause (first observed failure):")[1]
    assert "traceback : error: bad config: train.lr: Value 'fast'" in root_cause
    # Settings every process checks alike (here the global batch against 2 x 3 rows) are said once too.
    process = torchrun(tmp_path, tmp_path / "run", run_config(tmp_path, "train.micro_batch_size=3"))
    stderr = wait(process)
    assert process.returncode != 0
    said = [
        line for line in stderr.splitlines() if line.startswith("error: train.global_batch_tokens (1024)")
    ]
    assert len(said) == 1 and "is no whole" in said[0]


def test_data_missing_on_one_machine_stops_both_with_its_message(tmp_path):
    """Each machine reads its own files: a rank that cannot shares its error, and rank 0 says it
    (naming the rank) instead of failing in the next collective with a traceback."""
    rows = [{"user": f"What is {i}?", "reasoning": "It is given.", "assistant": str(i)} for i in range(60)]
    machine_a, machine_b = tmp_path / "a", tmp_path / "b"
    machine_a.mkdir(), machine_b.mkdir()
    (machine_a / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = run_config(tmp_path, "train.distributed=ddp", "data.source=local", "data.path=data.jsonl")
    launcher = two_machines()
    a, b = (
        torchrun(tmp_path, tmp_path / "run", config, nproc=1, launcher=launcher, cwd=m)
        for m in (machine_a, machine_b)
    )
    stderr_a, stderr_b = wait(a), wait(b)
    assert a.returncode != 0 and b.returncode != 0
    # The rendezvous picks which machine is rank 0 (usually the first launched, here `a`).
    assert "error: data path data.jsonl does not exist" in stderr_b  # the machine that failed says it
    said_by_a = stderr_a.split("torch/distributed/elastic")[0]
    # `a` as rank 0 names the rank that failed; as rank 1 it leaves the saying to rank 0, `b`.
    assert "error: on rank 1: data path data.jsonl does not exist" in said_by_a or "error:" not in said_by_a
    for stderr in (stderr_a, stderr_b):
        workers = stderr.split("torch/distributed/elastic")[0]  # before torchrun's own failure report
        assert "Traceback" not in workers and "Connection closed" not in stderr
