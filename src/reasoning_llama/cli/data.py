"""`data stats`: load, validate and tokenize the training data and describe it, without training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from reasoning_llama.config import load_run_config

data_app = typer.Typer(help="Look at training data before training on it.", no_args_is_help=True)


@data_app.command("stats")
def stats(
    source: Annotated[str | None, typer.Option(help="synthetic, hub, local or text.")] = None,
    path: Annotated[str | None, typer.Option(help="Hub dataset name, or a file, directory or glob.")] = None,
    seq_len: Annotated[int | None, typer.Option(help="Context length rows are fitted to.")] = None,
    config: Annotated[
        Path | None, typer.Option(help="A YAML run config whose `data` section to use.")
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="A config override, e.g. data.overlong=drop (repeatable)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Print row counts, skipped rows, token lengths, over-long examples and packing efficiency."""
    from reasoning_llama.data.prepare import prepare_data
    from reasoning_llama.tokenizer import get_tokenizer

    # A bare key is data's (`overlong=drop`); a dotted one names its own section (a typo in it is told as such).
    dotlist = [item if "." in item.split("=")[0] else f"data.{item}" for item in overrides or []]
    cfg = load_run_config(config, dotlist).data
    if source is not None:
        cfg.source = source
    if path is not None:
        cfg.path = path
    if seq_len is not None:
        cfg.seq_len = seq_len
    prepared = prepare_data(cfg, get_tokenizer(), progress=not as_json)
    if as_json:
        print(json.dumps(prepared.stats))
    else:
        _print_report(prepared.stats)


def _print_report(stats: dict[str, Any]) -> None:
    echo = typer.echo
    echo(f"source: {stats['source']}")
    echo(f"rows: {stats['validation']['summary']}")
    cache = stats["cache"]
    echo(f"cache: {'hit' if cache['hit'] else 'written'} {cache['path']}" if cache["path"] else "cache: none")
    echo(f"seq_len {stats['seq_len']}: examples may have up to {stats['max_example_tokens']} tokens")
    for name in ("train", "val"):
        s, length = stats[name], stats[name]["length"]
        echo(
            f"{name}: {s['rows']:,} rows -> {s['examples']:,} examples, {s['tokens']:,} tokens, {s['loss_tokens']:,} in the loss"
        )
        if length["min"] is not None:
            echo(
                f"  tokens per example: min {length['min']}, median {length['median']:g}, "
                f"p95 {length['p95']:g}, max {length['max']}"
            )
        echo(
            f"  over seq_len: {s['over_seq_len']} (truncated {s['truncated']}, dropped {s['dropped_overlong']}, "
            f"dropped with no target left {s['dropped_no_target']}, documents split {s['chunked_documents']})"
        )
    for mode, p in stats["packing"].items():
        echo(
            f"{mode}: {p['rows']:,} rows of {stats['seq_len']}, {p['loss_token_fraction']:.1%} of computed "
            f"tokens in the loss, {p['padding_fraction']:.1%} padding"
        )


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
