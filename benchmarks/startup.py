"""How long a command takes to start, against the floor of importing torch: one JSON object.

Each command runs in a fresh interpreter, as a user starts it; the runs are interleaved (one of each,
then again) so that the machine's noise falls on all alike, and each figure is the median. The
floor is `python -c "import torch"`, which no command can beat; `compiler` is what importing torch's
compiler (`torch._dynamo`) on top of it costs, the second that commands which never compile do not
pay. `generate` loads a checkpoint (a random `tiny` one unless --checkpoint names another) and
writes one token. `--baseline-src DIR` also times the commands with another copy of the package's
`src/` (an earlier commit's: `git worktree add /tmp/old REV`, then `--baseline-src /tmp/old/src`),
interleaved with ours, for a before/after measured side by side.

    python benchmarks/startup.py [--repeats 7] [--warmup 1] [--checkpoint DIR] [--baseline-src DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from reasoning_llama.cli.model_dir import model_dir_argument


def tiny_checkpoint(directory: Path) -> Path:
    from reasoning_llama.config import get_preset
    from reasoning_llama.model import Transformer
    from reasoning_llama.model_files import save_model

    return save_model(directory / "tiny", Transformer(get_preset("tiny")))


def wall_seconds(command: list[str], source: Path | None = None) -> float:
    """Seconds `command` takes to run; with `source`, the package imported from there."""
    env = None if source is None else {**os.environ, "PYTHONPATH": str(source)}
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"error: {' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="Runs of each command (median reported).")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed runs of each first (the file cache).")
    parser.add_argument(
        "--checkpoint", type=model_dir_argument, default=None, help="The model `generate` loads."
    )
    parser.add_argument(
        "--baseline-src", type=Path, default=None, help="Also time the commands with this src/ directory."
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="startup-") as scratch:
        checkpoint = args.checkpoint or tiny_checkpoint(Path(scratch))
        python, cli = [sys.executable], [sys.executable, "-m", "reasoning_llama"]
        commands = {
            "import_torch": [*python, "-c", "import torch"],
            "import_torch_and_compiler": [*python, "-c", "import torch, torch._dynamo"],
            "help": [*cli, "--help"],
            "generate": [
                *cli,
                "generate",
                "--checkpoint",
                str(checkpoint),
                "--prompt",
                "hi",
                "--max-new-tokens",
                "1",
            ],
        }
        runs = {name: (command, None) for name, command in commands.items()}
        if args.baseline_src is not None:
            for name in ("help", "generate"):
                runs[f"{name}_baseline"] = (commands[name], args.baseline_src.resolve())
        samples: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.warmup):
            for command, source in runs.values():
                wall_seconds(command, source)
        for _ in range(args.repeats):
            for name, (command, source) in runs.items():
                samples[name].append(wall_seconds(command, source))
    median = {name: round(statistics.median(values), 3) for name, values in samples.items()}
    floor = median["import_torch"]
    report = {
        "benchmark": "startup",
        "machine": platform.machine(),
        "python": platform.python_version(),
        "repeats": args.repeats,
        "checkpoint": str(args.checkpoint) if args.checkpoint else "random tiny",
        "median_s": median,
        "above_import_torch_s": {name: round(median[name] - floor, 3) for name in runs},
        "over_import_torch": {name: round(median[name] / floor, 2) for name in runs},
    }
    if args.baseline_src is not None:
        report["baseline_src"] = str(args.baseline_src)
        report["baseline_over_ours"] = {
            name: round(median[f"{name}_baseline"] / median[name], 2) for name in ("help", "generate")
        }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
