"""The RL gain on this machine: a supervised start, then `rl` for M minutes, against a control that
spends the same minutes continuing supervised training from the same start. One JSON object.

1. start: the quickstart recipe on chain_sum, sort_digits, max_digit and add, each at its family's
   default difficulty, for --start-steps steps (add lands in the middle; the others higher);
2. rl: the packaged `rl-add` recipe from that checkpoint for --minutes (RL on add alone);
3. control: the quickstart recipe from the same checkpoint, same families, for the same minutes.
All three are scored on the same held-out problems (the test split): greedy exact match (`acc`) and
pass@G of G samples at the RL temperature, per family.

    python benchmarks/rl_gain.py [--start-steps 1200] [--minutes 10] [--threads 2] [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from reasoning_llama.config import RLConfig, load_config, load_run_config
from reasoning_llama.generation import Engine
from reasoning_llama.model_files import load_model
from reasoning_llama.rl.loop import held_out_report, load_task_rows, run_rl
from reasoning_llama.rl.rewards import make_checker
from reasoning_llama.sampling import SamplingParams
from reasoning_llama.tokenizer import get_tokenizer
from reasoning_llama.training import run_checkpoints as ckpt
from reasoning_llama.training import train

FAMILIES = "[chain_sum,sort_digits,max_digit,add]"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--start-steps", type=int, default=1200, help="Supervised steps of the start.")
    parser.add_argument("--minutes", type=float, default=10.0, help="RL and control training minutes each.")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's).")
    parser.add_argument("--quick", action="store_true", help="Seconds, not minutes: checks that it runs.")
    parser.add_argument("--out", type=Path, default=None, help="Keep the runs here (default: a temp dir).")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="RL config overrides.")
    return parser.parse_args()


def supervised(out: Path, steps: int | None, minutes: float | None, init_from: Path | None = None) -> Path:
    overrides = [
        f"data.families={FAMILIES}",
        "data.difficulty=null",
        "train.device=cpu",
        "train.task_eval_size=0",
    ]
    overrides += [f"train.max_steps={steps or 100000}", "train.save_every=100000", "train.eval_every=100000"]
    if init_from is not None:
        overrides.append(f"train.init_from={init_from}")
    config = load_run_config("quickstart", overrides)
    budget = None if minutes is None else minutes * 60
    train(
        config,
        out,
        progress=False,
        time_budget=budget,
        deadline=None if budget is None else time.monotonic() + budget,
    )
    latest = ckpt.latest_checkpoint(out)
    assert latest is not None
    return latest


def scores(checkpoint: Path, config: RLConfig) -> dict[str, float]:
    model = load_model(checkpoint)
    engine = Engine(
        model, get_tokenizer(), max_batch_size=config.prompts_per_step * config.samples_per_prompt
    )
    params = SamplingParams(max_new_tokens=config.max_new_tokens, temperature=config.temperature)
    _, held_out = load_task_rows(config)
    return held_out_report(
        engine,
        held_out,
        make_checker(config.checker),
        params,
        config.samples_per_prompt,
        seed=config.seed + 1,
    )


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = args.out or Path(tempfile.mkdtemp(prefix="rl_gain-"))
    start_steps, minutes = (60, 0.3) if args.quick else (args.start_steps, args.minutes)
    extra = ["eval_size=8", "prompts_per_step=4", "samples_per_prompt=4"] if args.quick else []
    started = time.perf_counter()
    start = supervised(root / "start", start_steps, None)
    config = load_config(
        RLConfig, "rl-add", [f"init_from={start}", f"max_minutes={minutes}", *extra, *args.overrides]
    )
    rl = run_rl(config, root / "rl", progress=False, echo=lambda m: print(m, file=sys.stderr))
    control = supervised(root / "control", None, minutes, init_from=start)
    report = {
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "start_steps": start_steps,
        "minutes": minutes,
        "rl_steps": rl.step,
        "control_steps": ckpt.load_trainer_state(control)["progress"]["step"],
        "start": rl.evaluations[0],
        "rl": rl.evaluations[rl.step],
        "control": scores(control, config),
        "wall_s": time.perf_counter() - started,
    }
    target = "acc/add"
    others = [k for k in report["start"] if k.startswith("acc/") and k != target]
    report["rl_gain_points"] = 100 * (report["rl"][target] - report["start"][target])
    report["control_gain_points"] = 100 * (report["control"][target] - report["start"][target])
    report["rl_worst_drop_elsewhere_points"] = max(
        100 * (report["start"][k] - report["rl"][k]) for k in others
    )
    report["rl_beats_control"] = report["rl"][target] > report["control"][target]
    print(json.dumps(report, indent=2))
    if args.out is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
