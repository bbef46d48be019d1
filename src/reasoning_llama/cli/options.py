"""Options and conventions shared by several commands: the sampling flags of `generate` and `chat`,
and the exit code of an interrupted command."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated

import typer

from reasoning_llama.errors import ConfigError, ReasoningLlamaError, RequestError

if TYPE_CHECKING:
    from reasoning_llama.sampling import SamplingParams

INTERRUPTED_EXIT = 130  # what a shell reports for Ctrl-C


def echo_err(message: str) -> None:
    """A message for the person at the terminal (stderr, so stdout stays the command's output)."""
    typer.echo(message, err=True)


DEFAULT_MAX_NEW_TOKENS = 512  # when not given: this many, or what fits in the context

# Options shared by both commands.
System = Annotated[str | None, typer.Option(help="A system message, prepended to the first user turn.")]
MaxNewTokens = Annotated[
    int | None,
    typer.Option(
        help=f"Most tokens to generate, reasoning and answer together (default: {DEFAULT_MAX_NEW_TOKENS}, or what fits)."
    ),
]
Temperature = Annotated[float, typer.Option(help="0 = greedy.")]
TopK = Annotated[int, typer.Option(help="Sample among the k most likely tokens (0 = off).")]
TopP = Annotated[
    float, typer.Option(help="Nucleus sampling: the smallest set holding this much probability.")
]
MinP = Annotated[float, typer.Option(help="Drop tokens below this fraction of the best token's probability.")]
RepetitionPenalty = Annotated[
    float, typer.Option(help="Penalise tokens already in the prompt or output (1 = off).")
]
Seed = Annotated[int | None, typer.Option(help="Seed for reproducible sampling.")]
ReasoningBudget = Annotated[
    int | None, typer.Option(help="Most reasoning tokens before the answer is forced.")
]
Stop = Annotated[list[str] | None, typer.Option("--stop", help="Stop the answer at this text (repeatable).")]
HideReasoning = Annotated[bool, typer.Option("--hide-reasoning", help="Do not show the reasoning.")]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")]
Compile = Annotated[
    bool | None,
    typer.Option(
        "--compile/--no-compile",
        help="Compile the decode step (CPU: AOTInductor, cached on disk; CUDA: torch.compile + CUDA graphs): faster tokens after seconds of compiling (default: on CUDA only).",
    ),
]
Quantize = Annotated[
    str | None,
    typer.Option(
        help="int8: int8 weights on a CPU, for faster decoding at a small accuracy cost (docs/BENCHMARKS.md)."
    ),
]


def sampling_params(options: dict[str, object]) -> SamplingParams:
    """SamplingParams from a command's options of the same names, checked before the model loads."""
    from reasoning_llama.sampling import SamplingParams

    names = {f.name for f in dataclasses.fields(SamplingParams)}
    values = {name: value for name, value in options.items() if name in names}
    if values.get("max_new_tokens") is None:  # not given (0 is given, and refused below)
        values["max_new_tokens"] = DEFAULT_MAX_NEW_TOKENS
    values["stop"] = tuple(values.get("stop") or ())  # type: ignore[arg-type]
    params = SamplingParams(**values)  # type: ignore[arg-type]
    with in_flag_terms():
        params.validate()
    return params


@contextmanager
def said_once_per_machine(
    kinds: tuple[type[ReasoningLlamaError], ...] = (ReasoningLlamaError,),
) -> Iterator[None]:
    """Errors of `kinds` are the same in every process torchrun starts on one machine (those in a
    command's arguments and files, or in its settings): the machine's first process says them."""
    try:
        yield
    except kinds as e:
        # (an error the processes shared has its printer chosen already: see distributed.on_every)
        if int(os.environ.get("LOCAL_RANK", "0")) != 0 and not hasattr(e, "told_by_main"):
            e.told_by_main = True  # type: ignore[attr-defined]  (see cli.main)
        raise


@contextmanager
def in_flag_terms() -> Iterator[None]:
    """A RequestError naming a sampling value by its API name (`max_new_tokens`) names the command's
    flag instead (`--max-new-tokens`)."""
    try:
        yield
    except RequestError as e:
        if e.param is None:
            raise
        flag = f"--{e.param.replace('_', '-')}"
        message = re.sub(rf"(?<![\w-]){re.escape(e.param)}\b", flag, str(e))
        raise RequestError(message, param=e.param, code=e.code) from None


Threads = Annotated[
    int | None,
    typer.Option(help="CPU threads (default: torch's choice; on a busy machine 1 is often fastest)."),
]


def set_threads(threads: int | None) -> None:
    """`--threads N`: torch's CPU thread count for this process."""
    if threads is None:
        return
    if threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {threads}")
    import torch

    torch.set_num_threads(threads)
