"""`eval`: score a checkpoint on held-out synthetic problems or a data file."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from reasoning_llama import atomic
from reasoning_llama.cli import options
from reasoning_llama.cli.model_dir import ModelDir, resolve_model_dir
from reasoning_llama.cli.options import echo_err
from reasoning_llama.errors import ConfigError, DataError


def eval_command(
    checkpoint: ModelDir,
    task: Annotated[
        str | None,
        typer.Option(help="synthetic or synthetic:FAMILY,...: held-out problems of the TEST split."),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            help="A .json/.jsonl/.parquet file with user/reasoning/assistant (or user/assistant only, as "
            "`rl --data` takes: then the answers are scored, no loss)."
        ),
    ] = None,
    limit: Annotated[
        int | None, typer.Option(help="Problems per family (--task; default 100) or rows (--data).")
    ] = None,
    generate: Annotated[
        bool, typer.Option(help="With --data: also generate answers and score them (slower).")
    ] = False,
    checker: Annotated[
        str | None,
        typer.Option(
            help="With --data: how an answer is scored, as in `rl`: exact (default), numeric, "
            "package.module:function or file.py:function; full credit counts as correct."
        ),
    ] = None,
    max_new_tokens: Annotated[
        int | None,
        typer.Option(
            help="Generation budget (default: 2x the longest reference; at least 128 without reasoning)."
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Sequences decoded together.")] = 32,
    seed: Annotated[
        int | None, typer.Option(help="Seed the synthetic problems are drawn with (default: 0).")
    ] = None,
    difficulty: Annotated[
        int | None, typer.Option(help="Difficulty of the synthetic problems (default: each family's).")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "auto",
    examples: Annotated[
        Path | None,
        typer.Option(
            help="Also write one JSON line per problem (family, user, reference, reasoning, answer, "
            "correct ...) to this file, replacing it if it exists."
        ),
    ] = None,
    quantize: options.Quantize = None,
    compile_step: options.Compile = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """Exact match, format adherence and reasoning length per family; loss and perplexity."""
    from reasoning_llama import evaluation
    from reasoning_llama.generation import Engine

    if (task is None) == (data is None):
        raise ConfigError("give exactly one of --task synthetic[:family,...] or --data FILE")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {limit}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if data is not None and (seed is not None or difficulty is not None):
        raise ConfigError(
            "--seed and --difficulty choose synthetic problems: use them with --task, not --data"
        )
    if checker is not None and data is None:
        raise ConfigError("--checker scores the answers of --data rows; synthetic tasks have their own")
    if examples is not None:
        _check_output(examples, data)
    directory = resolve_model_dir(checkpoint)
    if task is not None:
        families = evaluation.parse_task_spec(task)
        note = _trained_tasks_note(directory, families, difficulty)
        if note:
            echo_err(note)
        rows = evaluation.synthetic_test_rows(families, limit or 100, seed=seed or 0, difficulty=difficulty)
        level = "" if difficulty is None else f" at difficulty {difficulty}"
        source = f"synthetic test split{level}: {', '.join(families)}"
        generate, validation = True, None
    else:
        rows, validation = _read_rows(data)  # type: ignore[arg-type]
        rows = rows[:limit] if limit else rows
        source = str(data)
    answers_only = not all("reasoning" in row for row in rows)  # nothing to measure a loss on
    if answers_only:
        if not generate:
            echo_err(f"note: {data} has no reasoning to measure a loss on: scoring its answers instead")
        generate = True
    if examples is not None and not generate:
        raise ConfigError("--examples lists generations: use it with --task, or with --data and --generate")
    if checker is not None and not generate:
        raise ConfigError("--checker scores generated answers: add --generate")
    correct = None
    if checker is not None:
        from reasoning_llama.rl.rewards import make_checker

        reward = make_checker(checker)
        correct = lambda row, answer: reward(row, answer) == 1.0  # noqa: E731
    engine = Engine.from_checkpoint(
        directory, device=device, max_batch_size=batch_size, quantize=quantize, compile=compile_step
    )
    progress = not as_json and sys.stderr.isatty()
    report: dict = {"checkpoint": str(directory), "source": source, "rows": len(rows)}
    if validation is not None:
        report["validation"] = validation
    if generate:
        scores = evaluation.evaluate_generations(
            engine, rows, max_new_tokens=max_new_tokens, progress=progress, correct=correct
        )
        report |= scores.to_dict()
        if examples is not None:
            lines = "".join(json.dumps(example) + "\n" for example in scores.examples)
            atomic.write_text(examples.expanduser(), lines)
    if answers_only:
        report |= {"loss": None, "perplexity": None, "loss_tokens": 0, "rows_cut_to_context": 0}
    else:
        loss = evaluation.loss_on_rows(engine.model, engine.tokenizer, rows)
        report |= {"loss": loss.loss, "perplexity": loss.perplexity, "loss_tokens": loss.loss_tokens}
        report["rows_cut_to_context"] = loss.cut_rows
    if as_json:
        print(json.dumps(report))
    else:
        _print_eval(report)


def _trained_tasks_note(checkpoint: Path, families: list[str], difficulty: int | None) -> str | None:
    """When --task asks for synthetic families, or a difficulty, that the checkpoint's training run did
    not learn, the flags that score what it learned: untrained families read as a bad model."""
    from reasoning_llama.config import load_run_config
    from reasoning_llama.errors import ReasoningLlamaError
    from reasoning_llama.tasks import families_or_default
    from reasoning_llama.training import run_checkpoints as ckpt
    from reasoning_llama.training.run_dir import RUN_CONFIG, run_command

    if checkpoint.name == ckpt.BEST:
        owner = checkpoint.parent
    elif checkpoint.parent.name == ckpt.CHECKPOINTS:
        owner = checkpoint.parent.parent
    else:
        return None  # a checkpoint of its own, no run around it
    if run_command(owner) != "train":
        return None
    try:
        data = load_run_config(owner / RUN_CONFIG).data
    except ReasoningLlamaError:
        return None
    trained = families_or_default(data.families)
    if data.source != "synthetic" or (set(families) <= set(trained) and difficulty == data.difficulty):
        return None
    level = "" if data.difficulty is None else f" at difficulty {data.difficulty}"
    flags = f"--task synthetic:{','.join(trained)}" + (
        "" if data.difficulty is None else f" --difficulty {data.difficulty}"
    )
    return (
        f"note: the run in {owner} trained on {', '.join(trained)}{level}; to score what it learned: {flags}"
    )


def _check_output(path: Path, data: Path | None) -> None:
    """Before any work: --examples must name a file that can be written, and never the data read."""
    target = path.expanduser()
    if target.is_dir():
        raise ConfigError(f"--examples {path} is a directory; give a file name, e.g. {path}/examples.jsonl")
    if not target.parent.is_dir():
        raise ConfigError(f"--examples {path}: the directory {target.parent} does not exist")
    if data is not None and target.exists() and target.resolve() == data.expanduser().resolve():
        raise ConfigError(f"--examples {path} is the --data file; give another file")


def _read_rows(path: Path) -> tuple[list[dict[str, str]], dict]:
    """The rows of a --data file, and its validation report (rows read, skipped and where): with
    reasoning, or else (no row has any, or no such column) answers only, as `rl --data` takes them."""
    from reasoning_llama.data.sources import ANSWER_FIELDS, read_rows
    from reasoning_llama.data.validation import CHAT_FIELDS, ValidationReport

    if not any(c in str(path) for c in "*?[") and not path.expanduser().exists():  # a glob is the source's
        raise ConfigError(f"--data {path} does not exist; give a .jsonl, .json or .parquet file of rows")
    report = ValidationReport()
    try:
        rows = read_rows(str(path), CHAT_FIELDS, report)
    except DataError:
        rows = []
    if not rows:
        if report.rows_skipped and set(report.skipped) != {"missing field 'reasoning'"}:
            echo_err(f"warning: no row has a usable reasoning: {report.summary()}")
        report = ValidationReport()
        rows = read_rows(str(path), ANSWER_FIELDS, report)  # its errors are the ones to show
    if not rows:
        raise DataError(f"no usable rows in --data {path}: {report.summary()}")
    if report.rows_skipped:
        echo_err(f"warning: {report.summary()}")
    return rows, report.to_dict()


def _print_eval(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()  # the command's output (stdout); messages go to stderr
    console.print(f"[bold]{report['checkpoint']}[/bold] on {report['source']} ({report['rows']} rows)")
    if "families" in report:
        table = Table("family", "n", "exact match", "format", "finished", "reasoning tokens")
        for name, s in [*report["families"].items(), ("all", report["overall"])]:
            table.add_row(
                name,
                str(s["n"]),
                f"{s['exact_match']:.1%}",
                f"{s['format_adherence']:.1%}",
                f"{s['finished']:.1%}",
                f"{s['mean_reasoning_tokens']:.1f}",
            )
        console.print(table)
    if report["loss"] is not None:
        console.print(
            f"loss {report['loss']:.4f} nats/token, perplexity {report['perplexity']:.3f} "
            f"({report['loss_tokens']} tokens)"
        )
    not_fitting = report.get("overall", {}).get("prompts_not_fitting")
    if not_fitting:
        console.print(
            f"note: {not_fitting} prompts fill the model's context, leaving no room for an answer: they "
            "count as wrong (reasoning tokens average the others)"
        )
    if report["rows_cut_to_context"]:
        console.print(
            f"note: {report['rows_cut_to_context']} rows are longer than the model's context: the loss counts "
            "what fits of them"
        )


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
