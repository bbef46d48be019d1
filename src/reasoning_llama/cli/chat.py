"""`chat`: a conversation with a checkpoint in the terminal (the logic lives in `reasoning_llama.chat`)."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable

import typer

from reasoning_llama.cli import options
from reasoning_llama.cli.model_dir import ModelDir, resolve_model_dir
from reasoning_llama.cli.options import sampling_params
from reasoning_llama.errors import ConfigError


def _line_reader() -> Callable[[], str]:
    """prompt_toolkit on a terminal (Esc-Enter for a new line); plain lines from a pipe."""
    if sys.stdin is None:  # started with stdin closed (`<&-`)
        raise ConfigError(
            "chat reads your messages from stdin, which is closed; give it a terminal or a pipe"
        )
    if not sys.stdin.isatty():
        return lambda: input("you> ")
    from prompt_toolkit import PromptSession
    from prompt_toolkit.key_binding import KeyBindings

    bindings = KeyBindings()

    @bindings.add("escape", "enter")
    def _newline(event) -> None:
        event.current_buffer.insert_text("\n")

    session: PromptSession[str] = PromptSession(key_bindings=bindings, prompt_continuation="...  ")
    return lambda: session.prompt("you> ")


def chat(
    checkpoint: ModelDir,
    system: options.System = None,
    max_new_tokens: options.MaxNewTokens = None,
    temperature: options.Temperature = 0.0,
    top_k: options.TopK = 0,
    top_p: options.TopP = 1.0,
    min_p: options.MinP = 0.0,
    repetition_penalty: options.RepetitionPenalty = 1.0,
    seed: options.Seed = None,
    reasoning_budget: options.ReasoningBudget = None,
    stop: options.Stop = None,
    hide_reasoning: options.HideReasoning = False,
    device: options.Device = "auto",
    quantize: options.Quantize = None,
    compile_step: options.Compile = None,
) -> None:
    """Chat in the terminal: streamed answers with their reasoning dimmed; /help lists the commands."""
    from rich.console import Console

    from reasoning_llama.chat import ChatSession
    from reasoning_llama.generation import Engine

    params = sampling_params(locals())  # the options named like SamplingParams fields
    # Ctrl-C is how a chat stops an answer, so it must raise KeyboardInterrupt even when a parent
    # (a background job, a script) started us with SIGINT ignored, which Python would keep.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    engine = Engine.from_checkpoint(
        resolve_model_dir(checkpoint),
        device=device,
        max_batch_size=1,
        quantize=quantize,
        compile=compile_step,
    )
    console = Console(highlight=False)
    session = ChatSession(
        engine,
        params,
        console,
        system=system,
        hide_reasoning=hide_reasoning,
        asked_max_new_tokens=max_new_tokens is not None,
    )
    console.print(
        f"chatting with {checkpoint} · /help for commands · Ctrl-D to quit", style="dim", markup=False
    )
    read = _line_reader()
    while True:
        try:
            line = read()
        except EOFError:
            break
        except KeyboardInterrupt:  # at the prompt: drop the line, like a shell
            continue
        if not session.handle(line):
            break


def register(app: typer.Typer) -> None:
    app.command()(chat)
