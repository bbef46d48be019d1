"""Every GPU figure of the scale-out work in one run, one JSON report (`gpu_suite.sh` runs this).

Steps, each in its own process with a time limit, each reported whatever the others did, the report
rewritten after every step (a suite stopped from outside still leaves what it measured); a step
the suite's time budget no longer holds is skipped and says so. The steps that time something
(throughput, decode, profile) run alone; the checks between them (tests, data parallel, the short
run: pass or fail, no timing figure) run at the same time, since most of each is compiling on the
host while the GPU idles (the short run's tokens/s is then the GPU shared, not a benchmark figure):
1. environment: torch, CUDA, the device;
2. throughput: `train_throughput.py` (tokens/s and MFU of ours compiled, ours uncompiled and
   transformers, small-100m at T 1280);
3. decode: `decode.py` (tokens/s of our engine with CUDA graphs, without, and transformers, at
   batch 1, 8 and 64, small-100m in bf16);
4. tests: `tests/test_gpu.py` (training: no host sync inside a step, FlexAttention and compiled
   layers against the dense path, gradients included; decoding: CUDA graphs against eager, no host
   sync, no recompilation);
5. data parallel (`ddp`, `fsdp`): DDP and FSDP2 smoke runs under torchrun on every GPU present;
6. `short_run`: a short real training run (synthetic tasks) whose validation loss must fall;
7. `profile`: `gpu_profile.py` (where the training step's and the decode step's time goes).

    python benchmarks/gpu_suite.py --out DIR [--device cuda] [--budget SECONDS] [--steps a,b] [--quick]

--quick uses tiny shapes so the whole suite can be checked on a CPU in a minute. DIR receives
report.json and one log per step, nothing else (a GPU lease returns a few files); runs, configs
and caches go to a scratch directory, removed at the end (the report names it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# Steps whose result is pass or fail: consecutive ones run at the same time.
CHECKS = frozenset({"gpu_tests", "ddp", "fsdp", "short_run"})


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="Directory for report.json and logs.")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="Tiny shapes: checks the suite itself.")
    parser.add_argument(
        "--budget", type=float, default=480, help="Seconds for all steps; later steps get what is left."
    )
    parser.add_argument("--tests", default=None, help="pytest -k expression for the gpu_tests step [all].")
    parser.add_argument("--profile-parts", default=None, help="gpu_profile.py --parts [all].")
    parser.add_argument(
        "--steps", default=None, help="Comma-separated steps to run, in that order [all, in the order above]."
    )
    return parser.parse_args()


class Suite:
    """The report being written, and the time left for the steps still to run."""

    def __init__(self, out: Path, budget: float, report: dict[str, Any]) -> None:
        self.out = out
        self.started = time.monotonic()
        self.deadline = self.started + budget
        self.report = report
        self.lock = threading.Lock()  # checks at the same time record their results

    def run(self, name: str, command: list[str], limit: float) -> dict[str, Any]:
        """One step within its own limit and the suite's remaining budget."""
        now = time.monotonic()
        left = self.deadline - now
        if left < 15:
            return {"status": f"skipped: {max(left, 0):.0f} s of the suite's budget left"}
        return {"started_s": round(now - self.started, 1), **run(name, command, self.out, min(limit, left))}

    def record(self, *keys: str, result: dict[str, Any]) -> None:
        """Put a step's result at report[keys[0]][keys[1]]... and rewrite the report."""
        with self.lock:
            place = self.report
            for key in keys[:-1]:
                place = place.setdefault(key, {})
            place[keys[-1]] = result
        self.save()

    def save(self) -> None:
        with self.lock:
            text = json.dumps(self.report, indent=2) + "\n"
            (self.out / "report.json").write_text(text)


def run(name: str, command: list[str], out: Path, timeout: float) -> dict[str, Any]:
    """Run one step; keep its output in OUT/NAME.log and report its status, time and last line.

    The step runs in its own process group, killed whole at its time limit: torchrun's workers
    would otherwise outlive it and keep its output pipes open."""
    start = time.monotonic()
    log = out / f"{name}.log"
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
            status = "ok" if process.returncode == 0 else f"failed ({process.returncode})"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            status = f"timed out after {timeout:.0f} s"
    log.write_text(f"$ {' '.join(command)}\n--- stdout\n{stdout}\n--- stderr\n{stderr}")
    lines = stdout.strip().splitlines()
    return {
        "status": status,
        "seconds": round(time.monotonic() - start, 1),
        "last_line": lines[-1] if lines else "",
        "log": log.name,
    }


def environment(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "python": sys.version.split()[0]}
    if device == "cuda" and torch.cuda.is_available():
        info |= {
            "device": torch.cuda.get_device_name(0),
            "gpus": torch.cuda.device_count(),
            "cuda": torch.version.cuda,
            "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
        }
    else:
        info |= {"device": "cpu", "gpus": 0}
    return info


def write_config(out: Path, name: str, overrides: dict[str, Any]) -> Path:
    from omegaconf import OmegaConf

    path = out / f"{name}.yaml"
    OmegaConf.save(OmegaConf.create(overrides), path)
    return path


def train_args(config: Path, run_dir: Path) -> list[str]:
    return ["-m", "reasoning_llama", "train", "--config", str(config), "--out", str(run_dir), "--no-progress"]


def final_losses(run_dir: Path) -> dict[str, Any]:
    records = [
        json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()
    ]
    train = [r["train_loss"] for r in records if "train_loss" in r]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    speed = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    return {
        "first_train_loss": train[0] if train else None,
        "last_train_loss": train[-1] if train else None,
        "val_losses": val,
        "tokens_per_s_last": speed[-1] if speed else None,
    }


def json_result(step: dict[str, Any]) -> dict[str, Any]:
    """A benchmark step's figures: the JSON object its last line prints."""
    with contextlib.suppress(json.JSONDecodeError, KeyError):
        step["result"] = json.loads(step["last_line"])
    return step


def step_groups(chosen: list[str]) -> list[list[str]]:
    """The chosen steps in order, consecutive checks grouped to run at the same time."""
    groups: list[list[str]] = []
    for name in chosen:
        if groups and name in CHECKS and groups[-1][0] in CHECKS:
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups


def main() -> None:
    args = parse_args()
    # The runs' checkpoints take ~2 GB even with tiny shapes: removed at the end, whatever happens.
    with tempfile.TemporaryDirectory(prefix="gpu_suite_") as scratch:
        run_suite(args, Path(scratch))


def run_suite(args: argparse.Namespace, work: Path) -> None:
    """Run the chosen steps, runs and caches in `work`, the report and logs in `args.out`."""
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    quick = ["--quick"] if args.quick else []
    report: dict[str, Any] = {
        "suite": "gpu_suite",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "quick": args.quick,
    }
    report["environment"] = env = environment(args.device)
    report["scratch"] = str(work)
    suite = Suite(out, args.budget, report)
    gpus = max(1, env.get("gpus", 0))

    def throughput() -> None:
        command = [python, "benchmarks/train_throughput.py", "--device", args.device]
        command += quick or ["--steps", "10", "--repeats", "3"]
        suite.record("throughput", result=json_result(suite.run("throughput", command, limit=180)))

    def decode() -> None:
        command = [python, "benchmarks/decode.py", "--device", args.device]
        command += (
            ["--quick", "--preset", "tiny", "--batch", "2"]
            if args.quick
            else ["--repeats", "3", "--batch", "8,64"]
        )
        # (compiling and capturing two engines took ~45 s of 139 on the H200; it prints its figures as
        # it goes, so a step cut at its limit keeps those measured)
        suite.record("decode", result=json_result(suite.run("decode", command, limit=300)))

    def gpu_tests() -> None:
        command = [
            python,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--durations=0",
            "tests/test_gpu.py",
        ]
        command += ["-k", args.tests] if args.tests else []
        step = suite.run("gpu_tests", command, limit=240)
        summary = re.search(r"(\d+ (passed|failed|skipped).*) in ", step.get("last_line", ""))
        step["summary"] = summary.group(1) if summary else step.get("last_line", "")
        suite.record("gpu_tests", result=step)

    def data_parallel(mode: str) -> None:
        rows, seq_len = (2, 128) if args.quick else (8, 256)
        tiny = {
            "train": {
                "preset": "tiny",
                "device": args.device,
                "distributed": mode,
                "max_steps": 6 if args.quick else 20,
                "micro_batch_size": rows,
                "global_batch_tokens": rows * seq_len * gpus,
                "eval_every": 3 if args.quick else 10,
                "eval_batches": 2,
                "save_every": 3 if args.quick else 10,
                "task_eval_size": 0,
                "log_every": 1 if args.quick else 5,
            },
            "data": {
                "seq_len": seq_len,
                "synthetic_train_size": 500 if args.quick else 2000,
                "synthetic_val_size": 20 if args.quick else 50,
                "cache_dir": str(work / f"cache_{mode}"),  # steps at the same time prepare apart
            },
        }
        config = write_config(work, f"dp_{mode}", tiny)
        run_dir = work / f"run_{mode}"
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}"]
        step = suite.run(f"dp_{mode}", [python, *launcher, *train_args(config, run_dir)], limit=90)
        if step["status"] == "ok":
            step |= final_losses(run_dir)
        suite.record("data_parallel", mode, result=step)

    def short_run() -> None:
        real = {
            "train": {
                "preset": "tiny" if args.quick else "small-100m",
                "model_overrides": {"final_block": False},
                "device": args.device,
                "max_steps": 12 if args.quick else 300,
                "micro_batch_size": 2 if args.quick else 32,
                "global_batch_tokens": (2 if args.quick else 32) * 512,
                "lr": 1e-3,
                "warmup_steps": 5 if args.quick else 30,
                "eval_every": 6 if args.quick else 100,
                "eval_batches": 4,
                "save_every": 0,
                "task_eval_size": 6 if args.quick else 30,
                "log_every": 5 if args.quick else 20,
            },
            "data": {
                "families": ["chain_sum", "sort_digits", "max_digit"],
                "difficulty": 4,
                "seq_len": 512,
                "synthetic_train_size": 500 if args.quick else 12000,
                "synthetic_val_size": 20 if args.quick else 150,
                "cache_dir": str(work / "cache_short_run"),
            },
        }
        config = write_config(work, "short_run", real)
        run_dir = work / "run_short"
        step = suite.run("short_run", [python, *train_args(config, run_dir)], limit=150)
        if step["status"] == "ok":
            step |= final_losses(run_dir)
            val = step["val_losses"]
            step["loss_fell"] = len(val) >= 2 and val[-1] < val[0]
        suite.record("short_run", result=step)

    def profile() -> None:
        command = [python, "benchmarks/gpu_profile.py", "--device", args.device, *quick]
        command += ["--parts", args.profile_parts] if args.profile_parts else []
        suite.record("profile", result=json_result(suite.run("profile", command, limit=150)))

    steps: dict[str, Callable[[], None]] = {
        "throughput": throughput,
        "decode": decode,
        "gpu_tests": gpu_tests,
        "ddp": lambda: data_parallel("ddp"),
        "fsdp": lambda: data_parallel("fsdp"),
        "short_run": short_run,
        "profile": profile,
    }
    chosen = args.steps.split(",") if args.steps else list(steps)
    unknown = sorted(set(chosen) - set(steps))
    if unknown:
        raise SystemExit(f"unknown steps {unknown}; choose from {', '.join(steps)}")
    report["steps"] = chosen
    for group in step_groups(chosen):
        with ThreadPoolExecutor(len(group)) as pool:
            for future in [pool.submit(steps[name]) for name in group]:
                future.result()  # each step records its result (and saves the report) as it ends

    report["total_seconds"] = round(time.monotonic() - suite.started, 1)
    suite.save()
    print(json.dumps(report))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
