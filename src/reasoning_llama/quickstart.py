"""`reasoning-llama quickstart`: train a small model on the synthetic tasks in minutes on a CPU and show
what it learned: exact match per family before and after training on held-out problems, one sample
conversation, and where the checkpoint and the plot are.

The recipe (`recipes/quickstart.yaml`, loaded by `quickstart_config`) is shaped for a 2-core CPU:
- tasks whose reasoning moves one digit per token (chain_sum, sort_digits, max_digit);
- a narrow trunk, because the untied 50,263-way embedding and head dominate the cost, and the head
  runs only at the positions that carry loss;
- the thread count is picked by timing the run's own steps, the run fits its planned steps to the
  time budget as it goes (so the cosine ends within it), and a deadline stops the run (saving,
  evaluating) if the machine slows down.
"""

from __future__ import annotations

import os
import shlex
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from reasoning_llama.config import RunConfig, load_run_config
from reasoning_llama.data.prepare import prepare_data
from reasoning_llama.errors import ConfigError
from reasoning_llama.evaluation import GenerationReport, evaluate_generations, synthetic_test_rows
from reasoning_llama.generation import Engine
from reasoning_llama.tokenizer import get_tokenizer
from reasoning_llama.training import run_checkpoints as ckpt
from reasoning_llama.training.loop import Trainer, TrainResult
from reasoning_llama.training.plot import plot_run
from reasoning_llama.training.run_dir import holds_run, start_over

RECIPE = "quickstart"  # src/reasoning_llama/recipes/quickstart.yaml, where its reasons are written
# --fast: a smoke run of the same path in well under a minute (it learns little).
FAST: list[str] = [
    "train.max_steps=12",
    "train.warmup_steps=3",
    "train.eval_every=6",
    "train.eval_batches=1",
    "train.save_every=6",
    "train.task_eval_every=0",
    "train.task_eval_size=12",
    "train.log_every=1",
    "data.synthetic_train_size=600",
    "data.synthetic_val_size=30",
]
EVAL_PER_FAMILY = 100
BUDGETED_MAX_STEPS = 100_000  # a bound the time budget always reaches first
FAST_EVAL_PER_FAMILY = 4
EVAL_SEED_OFFSET = 1  # held-out problems other than the validation ones that pick the best checkpoint


def quickstart_config(*, fast: bool = False, extra: list[str] | None = None) -> RunConfig:
    """The packaged recipe `recipes/quickstart.yaml` (what `--config quickstart` loads), plus overrides."""
    return load_run_config(RECIPE, [*(FAST if fast else []), *(extra or [])])


@dataclass
class QuickstartReport:
    run_dir: str
    checkpoint: str
    plot: str
    steps: int
    planned_steps: int
    stop_reason: str
    train_seconds: float
    total_seconds: float
    before: dict[str, Any]
    after: dict[str, Any]
    sample: dict[str, Any]
    difficulty: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def difficulty_flag(self) -> str:
        return "" if self.difficulty is None else f" --difficulty {self.difficulty}"


class QuickstartStopped(Exception):
    """Ctrl-C or `stop_at_step` stopped the training part before its end; its checkpoint is saved,
    and `result` says how to resume it."""

    def __init__(self, result: TrainResult) -> None:
        super().__init__(result.stopped_note())
        self.result = result


def bf16_matmul_is_faster() -> bool:
    """Whether this CPU multiplies in bf16 clearly faster than in fp32 (native bf16 instructions)."""
    a, b = torch.randn(256, 128), torch.randn(128, 8192)
    timings = {}
    for dtype in (torch.float32, torch.bfloat16):
        x, y = a.to(dtype), b.to(dtype)
        x @ y  # warm up
        start = time.perf_counter()
        for _ in range(5):
            x @ y
        timings[dtype] = time.perf_counter() - start
    return timings[torch.bfloat16] < 0.7 * timings[torch.float32]


def tune_threads(trainer: Trainer, say: Any) -> float:
    """Pick 1, 2 or 4 threads by timing the run's own steps; return the seconds per step.

    On a CPU shared with other work one thread often beats two, by far: threads spin waiting for
    each other while another process holds the core they need.
    """
    torch.set_num_threads(1)
    speed = {1: trainer.seconds_per_step()}
    for threads in (2, 4):
        if threads <= (os.cpu_count() or 1):
            torch.set_num_threads(threads)
            speed[threads] = trainer.seconds_per_step(give_up_after=min(speed.values()))
    threads = min(speed, key=speed.__getitem__)
    torch.set_num_threads(threads)
    say(f"speed probe: {speed[threads]:.2f} s per step with {threads} thread(s), {trainer.t.dtype} matmuls")
    return speed[threads]


def run_quickstart(
    out: str | Path = "runs/quickstart",
    *,
    minutes: float = 8.0,
    fast: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    say: Any = print,
    stop_at_step: int | None = None,
) -> QuickstartReport:
    """Train, evaluate before/after and plot; `minutes` bounds the training part."""
    started = time.monotonic()
    out = Path(out)
    _clear_previous(out, overwrite)
    # With a time budget the run plans its own steps; the recipe's max_steps is for runs by hand.
    config = quickstart_config(fast=fast, extra=None if fast else [f"train.max_steps={BUDGETED_MAX_STEPS}"])
    config.train.device = "cpu"  # small model, small batches: the CPU wins over a GPU's launch overhead
    tokenizer = get_tokenizer()
    say("preparing the synthetic tasks ...")
    data = prepare_data(config.data, tokenizer, progress=False)
    families = sorted({row["family"] for row in data.train.rows})
    per_family = FAST_EVAL_PER_FAMILY if fast else EVAL_PER_FAMILY
    test_rows = synthetic_test_rows(
        families, per_family, seed=config.data.seed + EVAL_SEED_OFFSET, difficulty=config.data.difficulty
    )

    budget = minutes * 60
    if not fast:
        torch.set_num_threads(1)
        config.train.dtype = "bfloat16" if bf16_matmul_is_faster() else "float32"
    trainer = Trainer(config, out, progress=progress, tokenizer=tokenizer, data=data, echo=say)
    try:
        probed = None if fast else tune_threads(trainer, say)
        say(f"evaluating the untrained model on {len(test_rows)} held-out problems ...")
        before = evaluate_generations(_engine(trainer.model), test_rows, progress=progress)
        trainer.model.train()
        say("training a few steps (--fast) ..." if fast else f"training for about {minutes:g} minutes ...")
        train_start = time.monotonic()
        # The run fits its planned steps (and so the cosine) to the budget as it goes.
        result: TrainResult = trainer.run(
            time_budget=None if fast else budget,
            seconds_per_step=probed,
            deadline=train_start + budget + 30,
            stop_at_step=stop_at_step,
        )
        train_seconds = time.monotonic() - train_start
    finally:
        trainer.close()
    if result.stop_reason in ("interrupted", "stop_at_step"):  # no evaluation: the user asked to stop
        raise QuickstartStopped(result)

    best = out / ckpt.BEST
    say(f"evaluating the trained model ({best}) on the same {len(test_rows)} problems ...")
    from reasoning_llama.model_files import load_model

    after = evaluate_generations(_engine(load_model(best)), test_rows, progress=progress)
    plot = plot_run(out)
    return QuickstartReport(
        run_dir=str(out),
        checkpoint=str(best),
        plot=str(plot),
        steps=result.step,
        planned_steps=result.total_steps,
        stop_reason=result.stop_reason,
        train_seconds=train_seconds,
        total_seconds=time.monotonic() - started,
        before=before.to_dict(),
        after=after.to_dict(),
        sample=_pick_sample(after),
        difficulty=config.data.difficulty,
    )


def _engine(model: torch.nn.Module) -> Engine:
    return Engine(model, get_tokenizer(), max_batch_size=64)  # type: ignore[arg-type]


def _clear_previous(out: Path, overwrite: bool) -> None:
    if not out.exists() or not any(out.iterdir()):
        return
    if not holds_run(out):  # --overwrite would not help: it deletes runs only
        raise ConfigError(f"{out} is not empty and holds no run; choose another --out")
    if not overwrite:
        raise ConfigError(
            f"{out} already holds a run; pass --overwrite to replace it (through make: make quickstart "
            "QUICKSTART_ARGS=--overwrite), or choose another --out"
        )
    start_over(out)


def _pick_sample(report: GenerationReport) -> dict[str, Any]:
    """One conversation to show, preferring sort_digits (its reasoning shows the method step by step):
    the first such correct answer, else the first correct one; with none correct, the first such problem."""
    examples = report.examples
    correct = [e for e in examples if e["correct"]]
    pool = correct or examples
    chosen = max(pool, key=lambda e: (e["family"] == "sort_digits", -examples.index(e)))
    return {k: chosen[k] for k in ("family", "user", "reasoning", "answer", "reference", "correct")}


SAMPLE_LINES = 12  # of the sample's reasoning shown


def format_report(report: QuickstartReport) -> str:
    """The human summary: accuracy before/after per family, a sample, where things are."""
    lines = [
        "",
        f"{'family':<16}{'before':>10}{'after':>10}{'format after':>16}",
    ]
    for family, after in report.after["families"].items():
        before = report.before["families"].get(family, {}).get("exact_match", 0.0)
        lines.append(
            f"{family:<16}{before:>10.0%}{after['exact_match']:>10.0%}{after['format_adherence']:>16.0%}"
        )
    overall_b, overall_a = report.before["overall"], report.after["overall"]
    lines.append(
        f"{'all':<16}{overall_b['exact_match']:>10.0%}{overall_a['exact_match']:>10.0%}"
        f"{overall_a['format_adherence']:>16.0%}   ({overall_a['n']} held-out problems)"
    )
    reaching = families_reaching(report)
    lines.append(f"families at >= 90% exact match: {', '.join(reaching) if reaching else 'none yet'}")
    sample = report.sample
    # An untrained model's reasoning is often mostly empty lines: those are left out, and a long one cut.
    reasoning = [line for line in sample["reasoning"].splitlines() if line.strip()]
    if len(reasoning) > SAMPLE_LINES:
        reasoning = [*reasoning[:SAMPLE_LINES], f"... ({len(reasoning) - SAMPLE_LINES} more lines)"]
    lines += [
        "",
        "sample conversation (held-out):",
        f"  user:      {sample['user']}",
        "  reasoning: " + "\n             ".join(reasoning or [""]),
        f"  answer:    {sample['answer']}   ({'correct' if sample['correct'] else 'expected ' + sample['reference']})",
        "",
        f"trained {report.steps} steps ({report.stop_reason}) in {report.train_seconds / 60:.1f} min; "
        f"total {report.total_seconds / 60:.1f} min",
        f"checkpoint: {report.checkpoint}",
        f"plot:       {report.plot}",
        f"next:       reasoning-llama chat --checkpoint {shlex.quote(str(report.checkpoint))}",
        f"            reasoning-llama eval --checkpoint {shlex.quote(str(report.checkpoint))} "
        f"--task synthetic:{','.join(report.after['families'])}{report.difficulty_flag}",
    ]
    return "\n".join(lines)


def families_reaching(report: QuickstartReport, threshold: float = 0.9) -> list[str]:
    """Families whose held-out exact match after training is at least `threshold`."""
    return [f for f, s in report.after["families"].items() if s["exact_match"] >= threshold]


__all__ = [
    "RECIPE",
    "QuickstartReport",
    "QuickstartStopped",
    "format_report",
    "quickstart_config",
    "run_quickstart",
]
