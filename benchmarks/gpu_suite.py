"""Every GPU figure of the scale-out work in one run, one JSON report (`gpu_suite.sh` runs this).

Steps, each in its own process with a time limit, each reported whatever the others did:
1. environment: torch, CUDA, the device;
2. throughput: `train_throughput.py` (tokens/s and MFU of ours compiled, ours uncompiled and
   transformers, small-100m at T 1280);
3. decode: `decode.py` (tokens/s of our engine with CUDA graphs, without, and transformers, at
   batch 1, 8 and 64, small-100m in bf16);
4. tests: `tests/test_gpu.py` (training: no host sync inside a step, FlexAttention and compiled
   layers against the dense path, gradients included; decoding: CUDA graphs against eager, no host
   sync, no recompilation);
5. data parallel: DDP and FSDP2 smoke runs under torchrun on every GPU present;
6. a short real training run (synthetic tasks) whose validation loss must fall.

    python benchmarks/gpu_suite.py --out DIR [--device cuda] [--quick]

--quick uses tiny shapes so the whole suite can be checked on a CPU in a minute.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="Directory for report.json and logs.")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="Tiny shapes: checks the suite itself.")
    return parser.parse_args()


def run(name: str, command: list[str], out: Path, timeout: float) -> dict[str, Any]:
    """Run one step; keep its output in OUT/NAME.log and report its status, time and last line."""
    start = time.monotonic()
    log = out / f"{name}.log"
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        status = "ok" if done.returncode == 0 else f"failed ({done.returncode})"
        stdout, stderr = done.stdout, done.stderr
    except subprocess.TimeoutExpired as e:
        status, stdout, stderr = f"timed out after {timeout:.0f} s", str(e.stdout or ""), str(e.stderr or "")
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


def main() -> None:
    args = parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    report: dict[str, Any] = {
        "suite": "gpu_suite",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "quick": args.quick,
    }
    report["environment"] = env = environment(args.device)
    started = time.monotonic()

    throughput = [python, "benchmarks/train_throughput.py", "--device", args.device]
    throughput += ["--quick"] if args.quick else ["--steps", "10", "--repeats", "3"]
    step = run("throughput", throughput, out, timeout=240)
    with contextlib.suppress(json.JSONDecodeError):
        step["result"] = json.loads(step["last_line"])
    report["throughput"] = step

    decode = [python, "benchmarks/decode.py", "--device", args.device]
    decode += (
        ["--quick", "--preset", "tiny", "--batch", "2"]
        if args.quick
        else ["--repeats", "3", "--batch", "8,64"]
    )
    step = run("decode", decode, out, timeout=420)
    with contextlib.suppress(json.JSONDecodeError):
        step["result"] = json.loads(step["last_line"])
    report["decode"] = step

    pytest = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py"]
    step = run("gpu_tests", pytest, out, timeout=240)
    summary = re.search(r"(\d+ (passed|failed|skipped).*) in ", step["last_line"])
    step["summary"] = summary.group(1) if summary else step["last_line"]
    report["gpu_tests"] = step

    gpus = max(1, env.get("gpus", 0))
    rows, seq_len = (2, 128) if args.quick else (8, 256)
    tiny = {
        "train": {
            "preset": "tiny",
            "device": args.device,
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
            "cache_dir": str(out / "cache"),
        },
    }
    report["data_parallel"] = {}
    for mode in ("ddp", "fsdp"):
        tiny["train"]["distributed"] = mode
        config = write_config(out, f"dp_{mode}", tiny)
        run_dir = out / f"run_{mode}"
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}"]
        command = [python, *launcher, *train_args(config, run_dir)]
        step = run(f"dp_{mode}", command, out, timeout=180)
        if step["status"] == "ok":
            step |= final_losses(run_dir)
        report["data_parallel"][mode] = step

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
            "cache_dir": str(out / "cache"),
        },
    }
    config = write_config(out, "short_run", real)
    run_dir = out / "run_short"
    command = [python, *train_args(config, run_dir)]
    step = run("short_run", command, out, timeout=240)
    if step["status"] == "ok":
        step |= final_losses(run_dir)
        val = step["val_losses"]
        step["loss_fell"] = len(val) >= 2 and val[-1] < val[0]
    report["short_run"] = step

    report["total_seconds"] = round(time.monotonic() - started, 1)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
