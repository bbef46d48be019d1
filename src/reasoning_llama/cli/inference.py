"""`generate` and `chat`: talk to a checkpoint through the engine from the terminal.

Human output of `generate`: the reasoning streams to stderr (dim, under a "Thinking" label) and
the answer to stdout, so `generate ... > answer.txt` keeps only the answer. `--json` prints one
JSON object on stdout instead.
"""

from __future__ import annotations

import dataclasses
import json
import queue
import signal
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated

import typer

from reasoning_llama.cli.model_dir import ModelDir, resolve_model_dir
from reasoning_llama.errors import RequestError

if TYPE_CHECKING:
    from rich.console import Console

    from reasoning_llama.generation import Delta, Engine, GenerationResult
    from reasoning_llama.sampling import SamplingParams

DEFAULT_MAX_NEW_TOKENS = 512  # when not given: this many, or what fits in the context

# Options shared by both commands.
System = Annotated[str | None, typer.Option(help="A system message, prepended to the first user turn.")]
MaxNewTokens = Annotated[
    int | None,
    typer.Option(
        help=f"Most tokens to generate, reasoning and answer together [default: {DEFAULT_MAX_NEW_TOKENS} or what fits]."
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


def _sampling_params(options: dict[str, object]) -> SamplingParams:
    """SamplingParams from a command's options of the same names, checked before the model loads."""
    from reasoning_llama.sampling import SamplingParams

    names = {f.name for f in dataclasses.fields(SamplingParams)}
    values = {name: value for name, value in options.items() if name in names}
    values["max_new_tokens"] = values.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS
    values["stop"] = tuple(values.get("stop") or ())  # type: ignore[arg-type]
    params = SamplingParams(**values)  # type: ignore[arg-type]
    params.validate()
    return params


def generate(
    checkpoint: ModelDir,
    prompt: Annotated[str, typer.Option(help="The user message.")],
    system: System = None,
    max_new_tokens: MaxNewTokens = None,
    temperature: Temperature = 0.0,
    top_k: TopK = 0,
    top_p: TopP = 1.0,
    min_p: MinP = 0.0,
    repetition_penalty: RepetitionPenalty = 1.0,
    seed: Seed = None,
    reasoning_budget: ReasoningBudget = None,
    stop: Stop = None,
    hide_reasoning: HideReasoning = False,
    device: Device = "auto",
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object instead of streaming.")
    ] = False,
) -> None:
    """Answer one prompt: stream the reasoning (stderr, dim) and the answer (stdout)."""
    from rich.console import Console

    from reasoning_llama.generation import Engine

    params = _sampling_params(locals())  # the options named like SamplingParams fields
    if not prompt.strip():
        raise RequestError("--prompt is empty; give the text to answer")
    engine = Engine.from_checkpoint(resolve_model_dir(checkpoint), device=device, max_batch_size=1)
    prompt_ids = engine.tokenizer.render_prompt([{"role": "user", "content": prompt}], system=system)
    if max_new_tokens is None:  # the default shrinks to fit; an explicit value must fit
        room = max(1, engine.max_context - len(prompt_ids))
        params = dataclasses.replace(params, max_new_tokens=min(params.max_new_tokens, room))
    engine.check_request(prompt_ids, params)

    if as_json:
        result = run_cancellable(engine, prompt_ids, params, lambda delta: None)
        print(json.dumps(result_json(result)))
        return
    err = Console(stderr=True, highlight=False)
    view = _StreamView(err, _StdoutConsole(), hide_reasoning)
    result = run_cancellable(engine, prompt_ids, params, view.show)
    view.end(result)
    if result.finish_reason == "cancelled":
        raise typer.Exit(130)


def result_json(result: GenerationResult) -> dict:
    """The `--json` object: texts, finish reason, OpenAI-style usage and timings."""
    return {
        "reasoning": result.reasoning,
        "answer": result.answer,
        "finish_reason": result.finish_reason,
        "usage": {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens,
            "reasoning_tokens": result.reasoning_tokens,
        },
        "timings": result.timings,
    }


def run_cancellable(
    engine: Engine, prompt_ids: list[int], params: SamplingParams, on_delta: Callable[[Delta], None]
) -> GenerationResult:
    """Stream in a worker thread so Ctrl-C only cancels the generation and the engine stays consistent."""
    from reasoning_llama.generation import GenerationResult

    cancel = threading.Event()
    items: queue.Queue = queue.Queue()

    def work() -> None:
        try:
            for item in engine.stream(prompt_ids, params, cancel=cancel):
                items.put(item)
        except BaseException as e:  # handed to the main thread, which raises it
            items.put(e)

    worker = threading.Thread(target=work, name="generate", daemon=True)
    worker.start()
    while True:
        try:
            item = items.get(timeout=0.1)
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, GenerationResult):
                worker.join()
                return item
            on_delta(item)
        except queue.Empty:
            continue
        except KeyboardInterrupt:
            cancel.set()  # the engine finishes the request as "cancelled" at its next step


class _StdoutConsole:
    """Plain, unstyled stdout for the answer, so it stays clean when redirected."""

    def out(self, text: str, **_: object) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()


class _StreamView:
    """Shows streamed deltas: the reasoning dim under a "Thinking" label, then the answer."""

    def __init__(
        self, reasoning_console: Console, answer_console: Console | _StdoutConsole, hide_reasoning: bool
    ):
        self.reasoning_console = reasoning_console
        self.answer_console = answer_console
        self.hide_reasoning = hide_reasoning
        self.kind: str | None = None

    def show(self, delta: Delta) -> None:
        if delta.kind == "reasoning":
            if self.hide_reasoning:
                return
            if self.kind is None:
                self.reasoning_console.print("Thinking", style="dim italic")
            self.reasoning_console.out(delta.text, style="dim", end="")
        else:
            if self.kind == "reasoning" and not self.hide_reasoning:
                self.reasoning_console.out("\n", end="")
            self.answer_console.out(delta.text, end="")
        self.kind = delta.kind

    def end(self, result: GenerationResult) -> None:
        """Close the last line and print a dim summary (finish reason, tokens, speed)."""
        if self.kind == "answer":
            self.answer_console.out("\n", end="")
        elif self.kind == "reasoning" and not self.hide_reasoning:
            self.reasoning_console.out("\n", end="")
        reason = {"stop": "done", "length": "length limit", "cancelled": "stopped"}[result.finish_reason]
        self.reasoning_console.print(
            f"[{reason} · {result.completion_tokens} tokens ({result.reasoning_tokens} reasoning) · "
            f"{result.timings.get('decode_tokens_per_s', 0.0):.1f} tok/s]",
            style="dim",
            markup=False,
        )


# -- chat ------------------------------------------------------------------------------------

CHAT_HELP = """\
Enter sends; Esc then Enter (or Alt-Enter) starts a new line. Ctrl-C stops an answer; Ctrl-D quits.
  /set KEY VALUE   change a sampling setting, e.g. /set temperature 0.7  (/set seed none)
  /show            the current settings
  /history         the conversation so far
  /reset           forget the conversation
  /quit            leave (also /exit, Ctrl-D)"""

_OPTIONAL_INTS = ("seed", "reasoning_budget")


def apply_setting(params: SamplingParams, key: str, raw: str) -> SamplingParams:
    """`/set KEY VALUE` -> new validated params; RequestError with a one-line reason otherwise."""
    fields = {f.name: f for f in dataclasses.fields(params)}
    name = key.replace("-", "_")
    if name not in fields:
        raise RequestError(f"unknown setting {key!r}; choose one of: {', '.join(fields)}")
    raw = raw.strip()
    if not raw:
        raise RequestError(f"/set {name} needs a value")
    try:
        if name == "stop":
            value: object = () if raw.lower() == "none" else (raw,)
        elif name in _OPTIONAL_INTS:
            value = None if raw.lower() in ("none", "off") else int(raw)
        elif name in ("max_new_tokens", "top_k"):
            value = int(raw)
        else:
            value = float(raw)
    except ValueError:
        kind = "an integer" if name in (*_OPTIONAL_INTS, "max_new_tokens", "top_k") else "a number"
        raise RequestError(f"{name} needs {kind}, got {raw!r}") from None
    updated = dataclasses.replace(params, **{name: value})
    updated.validate()
    return updated


class ChatSession:
    """A multi-turn conversation with one engine; earlier reasoning is dropped from the history."""

    def __init__(
        self,
        engine: Engine,
        params: SamplingParams,
        console: Console,
        *,
        system: str | None = None,
        hide_reasoning: bool = False,
    ) -> None:
        self.engine = engine
        self.params = params
        self.console = console
        self.system = system
        self.hide_reasoning = hide_reasoning
        self.messages: list[dict[str, str]] = []

    def handle(self, line: str) -> bool:
        """Act on one input (a message or a /command); False means quit."""
        text = line.strip()
        if not text:
            return True
        if text.startswith("/"):
            return self.command(text)
        self.turn(line)
        return True

    def command(self, text: str) -> bool:
        name, _, rest = text.partition(" ")
        say = self.console.print
        if name in ("/quit", "/exit"):
            return False
        if name == "/reset":
            self.messages.clear()
            say("history cleared", style="dim")
        elif name == "/set":
            key, _, value = rest.strip().partition(" ")
            try:
                self.params = apply_setting(self.params, key, value)
                say(f"{key.replace('-', '_')} = {getattr(self.params, key.replace('-', '_'))!r}", style="dim")
            except RequestError as e:
                say(f"error: {e}", style="red", markup=False)
        elif name == "/show":
            say(
                ", ".join(
                    f"{f.name}={getattr(self.params, f.name)!r}" for f in dataclasses.fields(self.params)
                ),
                style="dim",
                markup=False,
            )
        elif name == "/history":
            for message in self.messages:
                say(f"{message['role']}: {message['content']}", markup=False)
        elif name == "/help":
            say(CHAT_HELP, markup=False)
        else:
            say(f"unknown command {name}; /help lists them", style="red", markup=False)
        return True

    def turn(self, user_text: str) -> None:
        """Answer one user message, streaming; Ctrl-C stops the answer but keeps the chat."""
        fitted = self._fit([*self.messages, {"role": "user", "content": user_text}])
        if fitted is None:
            return
        messages, prompt_ids, params = fitted
        view = _StreamView(self.console, self.console, self.hide_reasoning)
        result = run_cancellable(self.engine, prompt_ids, params, view.show)
        view.end(result)
        self.messages = [*messages, {"role": "assistant", "content": result.answer}]

    def _fit(
        self, messages: list[dict[str, str]]
    ) -> tuple[list[dict[str, str]], list[int], SamplingParams] | None:
        """Drop the oldest exchanges until the prompt leaves room to answer; cap max_new_tokens to the room."""
        tokenizer, context = self.engine.tokenizer, self.engine.max_context
        wanted = min(self.params.max_new_tokens, context // 2)
        prompt_ids = tokenizer.render_prompt(messages, system=self.system)
        while len(prompt_ids) + wanted > context and len(messages) > 1:
            messages = messages[2:]  # the oldest user + assistant exchange
            prompt_ids = tokenizer.render_prompt(messages, system=self.system)
        room = context - len(prompt_ids)
        if room < 1:
            self.console.print(
                f"error: the message is {len(prompt_ids)} tokens, the model's context is {context}; "
                "send a shorter one",
                style="red",
                markup=False,
            )
            return None
        return (
            messages,
            prompt_ids,
            dataclasses.replace(self.params, max_new_tokens=min(self.params.max_new_tokens, room)),
        )


def _line_reader() -> Callable[[], str]:
    """prompt_toolkit on a terminal (Esc-Enter for a new line); plain lines from a pipe."""
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
    system: System = None,
    max_new_tokens: MaxNewTokens = None,
    temperature: Temperature = 0.0,
    top_k: TopK = 0,
    top_p: TopP = 1.0,
    min_p: MinP = 0.0,
    repetition_penalty: RepetitionPenalty = 1.0,
    seed: Seed = None,
    reasoning_budget: ReasoningBudget = None,
    stop: Stop = None,
    hide_reasoning: HideReasoning = False,
    device: Device = "auto",
) -> None:
    """Chat in the terminal: streamed answers with their reasoning dimmed; /help lists the commands."""
    from rich.console import Console

    from reasoning_llama.generation import Engine

    params = _sampling_params(locals())  # the options named like SamplingParams fields
    # Ctrl-C is how a chat stops an answer, so it must raise KeyboardInterrupt even when a parent
    # (a background job, a script) started us with SIGINT ignored, which Python would keep.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    engine = Engine.from_checkpoint(resolve_model_dir(checkpoint), device=device, max_batch_size=1)
    console = Console(highlight=False)
    session = ChatSession(engine, params, console, system=system, hide_reasoning=hide_reasoning)
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
    app.command()(generate)
    app.command()(chat)
