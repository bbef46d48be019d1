"""`train`, `eval`, `plot` and `quickstart`: make a model, measure it, look at a run."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from reasoning_llama.cli.model_dir import ModelDir, resolve_model_dir
from reasoning_llama.errors import ConfigError

INTERRUPTED_EXIT = 130


def _err(message: str) -> None:
    typer.echo(message, err=True)


def train(
    out: Annotated[Path, typer.Option(help="The run directory (checkpoints, metrics, best model).")],
    preset: Annotated[str | None, typer.Option(help="Model preset, e.g. tiny or small-100m.")] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            help="A YAML recipe: a file, or a packaged one by name (quickstart, reasoning-base-20k)."
        ),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config value, e.g. --set train.lr=3e-4 (repeatable)."),
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue the run in --out from its latest checkpoint.")
    ] = False,
    init_from: Annotated[Path | None, typer.Option(help="Start from this checkpoint's weights.")] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    threads: Annotated[
        int | None,
        typer.Option(help="CPU threads (default: torch's choice; on a busy machine 1 is often fastest)."),
    ] = None,
    stop_at_step: Annotated[
        int | None,
        typer.Option(
            help="Save and stop after this step, as Ctrl-C would; the schedule still plans the whole run."
        ),
    ] = None,
) -> None:
    """Train a model (--preset P or --config F, with --set key=value overrides) into --out RUN."""
    from reasoning_llama.config import load_run_config
    from reasoning_llama.training import train as run_training
    from reasoning_llama.training.loop import RUN_CONFIG

    if preset is not None and config is not None:
        raise ConfigError("give --preset or --config, not both")
    overrides = list(set_ or [])
    if preset is not None:
        overrides.insert(0, f"train.preset={preset}")
    if init_from is not None:
        overrides.append(f"train.init_from={init_from}")
    if config is None and preset is None:
        if not resume:
            raise ConfigError("give --preset P or --config FILE (or --resume to continue the run in --out)")
        config = out / RUN_CONFIG  # resume with the run's own recipe
    run_config = load_run_config(config, overrides)
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {threads}")
        import torch

        torch.set_num_threads(threads)
    result = run_training(run_config, out, resume=resume, progress=progress, stop_at_step=stop_at_step)
    if result.rank != 0:  # under torchrun, rank 0 reports for every process
        return
    if result.stop_reason in ("interrupted", "stop_at_step"):
        what = "interrupted" if result.stop_reason == "interrupted" else "stopped"
        _err(
            f"{what} at step {result.step} of {result.total_steps}; saved {result.checkpoint}\n"
            f"resume with: reasoning-llama train --out {out} --resume"
        )
        if result.stop_reason == "interrupted":
            raise typer.Exit(INTERRUPTED_EXIT)
        return
    best = (
        f"; best validation loss {result.best_val_loss:.4f} at step {result.best_step}"
        if result.best_val_loss is not None
        else ""
    )
    _err(f"{result.stop_reason} at step {result.step} of {result.total_steps}{best}")
    _err(
        f"checkpoint: {result.checkpoint}\nbest model: {out / 'best'}\nplot it:    reasoning-llama plot {out}"
    )


def eval_command(
    checkpoint: ModelDir,
    task: Annotated[
        str | None,
        typer.Option(help="synthetic or synthetic:FAMILY,...: held-out problems of the TEST split."),
    ] = None,
    data: Annotated[
        Path | None, typer.Option(help="A .json/.jsonl/.parquet file with user/reasoning/assistant.")
    ] = None,
    limit: Annotated[
        int | None, typer.Option(help="Problems per family (--task; default 100) or rows (--data).")
    ] = None,
    generate: Annotated[
        bool, typer.Option(help="With --data: also generate answers and score them (slower).")
    ] = False,
    max_new_tokens: Annotated[
        int | None, typer.Option(help="Generation budget (default: 2x the longest reference).")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Sequences decoded together.")] = 32,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic problems drawn.")] = 0,
    difficulty: Annotated[
        int | None, typer.Option(help="Difficulty of the synthetic problems (default: each family's).")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """Exact match, format adherence and reasoning length per family; loss and perplexity."""
    from reasoning_llama import evaluation
    from reasoning_llama.generation import Engine

    if (task is None) == (data is None):
        raise ConfigError("give exactly one of --task synthetic[:family,...] or --data FILE")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {limit}")
    directory = resolve_model_dir(checkpoint)
    if task is not None:
        families = evaluation.parse_task_spec(task)
        rows = evaluation.synthetic_test_rows(families, limit or 100, seed=seed, difficulty=difficulty)
        level = "" if difficulty is None else f" at difficulty {difficulty}"
        source = f"synthetic test split{level}: {', '.join(families)}"
        generate = True
    else:
        rows = _read_rows(data)  # type: ignore[arg-type]
        rows = rows[:limit] if limit else rows
        source = str(data)
    engine = Engine.from_checkpoint(directory, device=device, max_batch_size=batch_size)
    progress = not as_json and sys.stderr.isatty()
    report: dict = {"checkpoint": str(directory), "source": source, "rows": len(rows)}
    if generate:
        scores = evaluation.evaluate_generations(
            engine, rows, max_new_tokens=max_new_tokens, progress=progress
        )
        report |= scores.to_dict()
    loss = evaluation.loss_on_rows(engine.model, engine.tokenizer, rows)
    report |= {"loss": loss.loss, "perplexity": loss.perplexity, "loss_tokens": loss.loss_tokens}
    if as_json:
        print(json.dumps(report))
    else:
        _print_eval(report)


def _read_rows(path: Path) -> list[dict[str, str]]:
    from reasoning_llama.config import DataConfig
    from reasoning_llama.data.sources import load_rows

    loaded = load_rows(DataConfig(source="local", path=str(path)))
    if loaded.report.rows_skipped:
        _err(f"warning: {loaded.report.summary()}")
    return loaded.train + (loaded.val or [])


def _print_eval(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
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
    console.print(
        f"loss {report['loss']:.4f} nats/token, perplexity {report['perplexity']:.3f} ({report['loss_tokens']} tokens)"
    )


def plot(
    run: Annotated[Path, typer.Argument(help="A run directory (with metrics.jsonl).")],
    out: Annotated[Path | None, typer.Option(help="The PNG to write (default RUN/plot.png).")] = None,
) -> None:
    """Plot a run's train/validation loss, learning rate and task accuracy to a PNG."""
    from reasoning_llama.training.plot import plot_run

    typer.echo(str(plot_run(run, out)))


def quickstart(
    out: Annotated[Path, typer.Option(help="The run directory.")] = Path("runs/quickstart"),
    minutes: Annotated[float, typer.Option(help="Training time budget in minutes.")] = 8.0,
    fast: Annotated[bool, typer.Option(help="A smoke run of the whole path in well under a minute.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier run in --out.")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object on stdout at the end.")
    ] = False,
) -> None:
    """Train a tiny model on synthetic reasoning tasks, then show accuracy before/after and a sample."""
    from reasoning_llama.quickstart import format_report, run_quickstart

    if minutes <= 0:
        raise ConfigError(f"--minutes must be positive, got {minutes}")
    report = run_quickstart(
        out, minutes=minutes, fast=fast, overwrite=overwrite, progress=not as_json, say=_err
    )
    _err(format_report(report))
    if report.stop_reason == "interrupted":
        _err(f"interrupted; the run is resumable: reasoning-llama train --out {out} --resume")
        raise typer.Exit(INTERRUPTED_EXIT)
    if as_json:
        print(json.dumps(report.to_dict()))


def register(app: typer.Typer) -> None:
    app.command()(train)
    app.command("eval")(eval_command)
    app.command()(plot)
    app.command()(quickstart)
