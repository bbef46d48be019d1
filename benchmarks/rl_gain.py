"""The RL gain on this machine: a supervised start, then `rl` for M minutes, against controls that
spend the same minutes continuing supervised training from the same start. One JSON object.

1. start: the quickstart recipe (chain_sum, sort_digits and max_digit at difficulty 4) for
   --start-steps steps, or --start CKPT (e.g. `make quickstart`'s);
2. rl: a packaged RL recipe from that checkpoint for --minutes: `rl-max-digit` (the default: the
   largest of six digits, with the other two families practised at their trained difficulty) or
   `rl-chain-sum` (chain_sum at the trained difficulty, alone);
3. control: the quickstart recipe from the same checkpoint, same data, for the same minutes;
4. control_with_traces: the same, on the RL recipe's own train problems with their reasoning traces
   (which RL never sees): supervision with the answers' reasoning against rewards alone;
5. without_reasoning: `rl --data` from the same start on a file of longer sums (chain_sum at
   difficulty 6, which the start never saw) whose rows hold the question and the answer only, scored
   numerically, for --minutes-without-reasoning: can rewards alone stretch a learned procedure?
Arms 1-4 are scored on the same held-out problems (the test split) at the RL recipe's difficulties:
greedy exact match (`acc`) and pass@G of G samples at the RL temperature, per family; and, in
`learned`, greedy exact match on what the start was trained on (each family at difficulty 4), so a
drop there counts against RL. Arm 5 on the file's held-out rows.

    python benchmarks/rl_gain.py [--recipe rl-max-digit] [--start CKPT | --start-steps 1300] [--minutes 10]
                                 [--quick] [--out DIR]
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

from reasoning_llama.cli.model_dir import model_dir_argument
from reasoning_llama.config import RLConfig, load_config, load_run_config
from reasoning_llama.evaluation import evaluate_generations, synthetic_test_rows
from reasoning_llama.generation import Engine
from reasoning_llama.model_files import load_model
from reasoning_llama.rl.loop import EVAL_SEED, held_out_report, load_task_rows, run_rl, sampling_params
from reasoning_llama.rl.rewards import make_checker
from reasoning_llama.tasks import generate_examples
from reasoning_llama.tokenizer import get_tokenizer
from reasoning_llama.training import run_checkpoints as ckpt
from reasoning_llama.training import train

TARGETS = {"rl-max-digit": "max_digit", "rl-chain-sum": "chain_sum"}  # recipe -> the family it improves
LONGER_FAMILY = "chain_sum"
LONGER = {LONGER_FAMILY: 6}  # the no-reasoning arm's problems: sums of up to 6 digits, not 4


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", choices=sorted(TARGETS), default="rl-max-digit", help="The RL recipe.")
    parser.add_argument("--start-steps", type=int, default=1300, help="Supervised steps of the start.")
    parser.add_argument(
        "--start",
        type=model_dir_argument,  # a checkpoint or a run directory, as every command takes it
        default=None,
        help="Reuse this start checkpoint (or a run's best) instead.",
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="RL and control training minutes each.")
    parser.add_argument(
        "--minutes-without-reasoning", type=float, default=3.0, help="RL minutes of the no-reasoning arm."
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's).")
    parser.add_argument("--quick", action="store_true", help="Seconds, not minutes: checks that it runs.")
    parser.add_argument("--out", type=Path, default=None, help="Keep the runs here (default: a temp dir).")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="RL config overrides.")
    return parser.parse_args()


def supervised(
    out: Path,
    steps: int | None,
    minutes: float | None,
    init_from: Path | None = None,
    data: Path | None = None,
) -> Path:
    """The quickstart recipe (on `data`'s rows if given) for `steps` steps, or for `minutes` of
    training; its last checkpoint."""
    overrides = ["train.device=cpu", "train.task_eval_size=0"]
    overrides += [f"train.max_steps={steps or 100000}", "train.save_every=100000", "train.eval_every=100000"]
    if init_from is not None:
        overrides.append(f"train.init_from={init_from}")
    if data is not None:
        overrides += ["data.source=local", f"data.path={data}"]
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
    _, held_out = load_task_rows(config)
    return held_out_report(
        engine,
        held_out,
        make_checker(config.checker),
        sampling_params(config),
        config.samples_per_prompt,
        seed=config.seed + 1,
    )


def learned(checkpoint: Path, rows: list[dict[str, str]]) -> dict[str, float]:
    """Greedy exact match per family on `rows`: what the start was trained on."""
    engine = Engine(load_model(checkpoint), get_tokenizer(), max_batch_size=len(rows))
    report = evaluate_generations(engine, rows, max_new_tokens=64)
    return {f"acc/{family}": score.exact_match for family, score in sorted(report.families.items())}


def write_traces(path: Path, config: RLConfig) -> Path:
    """The RL recipe's train problems with their reasoning, as a local dataset for supervision."""
    rows, _ = load_task_rows(config)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps({k: row[k] for k in ("user", "reasoning", "assistant")}) + "\n")
    return path


def write_question_answer_rows(path: Path, count: int) -> Path:
    """Longer sums as a user's file would hold them: the question and the answer, no reasoning."""
    examples = generate_examples([LONGER_FAMILY], count, split="train", seed=11, difficulty=LONGER)
    with path.open("w") as f:
        for example in examples:
            row = example.as_row()
            f.write(json.dumps({"user": row["user"], "assistant": row["assistant"]}) + "\n")
    return path


def without_reasoning(root: Path, start: Path, minutes: float, rows: int, extra: list[str]) -> dict:
    data = write_question_answer_rows(root / "longer_sums.jsonl", rows)
    overrides = [f"init_from={start}", f"data={data}", "checker=numeric", f"max_minutes={minutes}"]
    overrides += ["families=[]", "eval_families=[]", *extra]
    config = load_config(RLConfig, "rl-chain-sum", overrides)
    result = run_rl(config, root / "rl_without_reasoning", progress=False, echo=_echo)
    first, last = result.evaluations[0], result.evaluations[result.step]
    return {
        "problems": f"{LONGER_FAMILY} at difficulty {LONGER[LONGER_FAMILY]} (the start saw 4), question and answer only",
        "steps": result.step,
        "minutes": minutes,
        "start": first,
        "after": last,
        "gain_points": round(100 * (last["acc/data"] - first["acc/data"]), 1),
    }


def _echo(message: str) -> None:
    print(message, file=sys.stderr)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = args.out or Path(tempfile.mkdtemp(prefix="rl_gain-"))
    root.mkdir(parents=True, exist_ok=True)
    start_steps, minutes = (10, 0.04) if args.quick else (args.start_steps, args.minutes)
    minutes_plain = 0.04 if args.quick else args.minutes_without_reasoning
    extra = ["eval_size=4", "prompts_per_step=4", "samples_per_prompt=4"] if args.quick else []
    started = time.perf_counter()
    start = args.start or supervised(root / "start", start_steps, None)
    config = load_config(
        RLConfig, args.recipe, [f"init_from={start}", f"max_minutes={minutes}", *extra, *args.overrides]
    )
    rl = run_rl(config, root / "rl", progress=False, echo=_echo)
    assert rl.checkpoint is not None
    control = supervised(root / "control", None, minutes, init_from=start)
    traces = write_traces(root / "traces.jsonl", config)
    control_traces = supervised(root / "control_with_traces", None, minutes, init_from=start, data=traces)
    checkpoints = {
        "start": start,
        "rl": rl.checkpoint,
        "control": control,
        "control_with_traces": control_traces,
    }
    learned_data = load_run_config("quickstart", []).data  # the start's families and difficulty
    learned_rows = synthetic_test_rows(
        learned_data.families, 4 if args.quick else 100, seed=EVAL_SEED, difficulty=learned_data.difficulty
    )
    report = {
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "recipe": args.recipe,
        "start_steps": None if args.start else start_steps,
        "start_checkpoint": str(start),
        "minutes": minutes,
        "rl_steps": rl.step,
        "control_steps": ckpt.load_trainer_state(control)["progress"]["step"],
        "control_with_traces_steps": ckpt.load_trainer_state(control_traces)["progress"]["step"],
        "start": rl.evaluations[0],
        "rl": rl.evaluations[rl.step],
        "control": scores(control, config),
        "control_with_traces": scores(control_traces, config),
        "learned": {arm: learned(path, learned_rows) for arm, path in checkpoints.items()},
    }
    family = TARGETS[args.recipe]
    target = f"acc/{family}"
    before, after, learned_before, learned_after = (
        report["start"],
        report["rl"],
        report["learned"]["start"],
        report["learned"]["rl"],
    )
    report["rl_gain_points"] = round(100 * (after[target] - before[target]), 1)
    for arm in ("control", "control_with_traces"):
        report[f"{arm}_gain_points"] = round(100 * (report[arm][target] - before[target]), 1)
        report[f"rl_beats_{arm}"] = after[target] > report[arm][target]
    # Elsewhere: the other families, at the recipe's difficulty and at what the start learned; and the
    # target family itself at the learned difficulty when RL practised another.
    drops = [before[k] - after[k] for k in before if k.startswith("acc/") and k != target]
    target_elsewhere = config.difficulty.get(family) != learned_data.difficulty
    drops += [learned_before[k] - learned_after[k] for k in learned_before if k != target or target_elsewhere]
    report["rl_worst_drop_elsewhere_points"] = round(100 * max(drops), 1)
    rows = 600 if args.quick else 3000
    report["without_reasoning"] = without_reasoning(
        root, start, minutes_plain, rows, [*extra, *args.overrides]
    )
    report["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report))
    if args.out is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
