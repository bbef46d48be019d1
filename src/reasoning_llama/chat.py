"""A conversation in the terminal: streaming the engine's output (reasoning dimmed, answer plain),
Ctrl-C that stops an answer but not the program, and the chat REPL's turns, settings and history.

`reasoning-llama generate` and `reasoning-llama chat` (in `cli/`) are thin commands over this.
"""

from __future__ import annotations

import dataclasses
import queue
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from reasoning_llama.errors import RequestError
from reasoning_llama.generation import Delta, Engine, GenerationResult
from reasoning_llama.sampling import SamplingParams

if TYPE_CHECKING:
    from rich.console import Console


def run_cancellable(
    engine: Engine, prompt_ids: list[int], params: SamplingParams, on_delta: Callable[[Delta], None]
) -> GenerationResult:
    """Stream in a worker thread so Ctrl-C only cancels the generation and the engine stays consistent."""
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
    try:
        while True:
            try:
                item = items.get(timeout=0.1)
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, GenerationResult):
                    return item
                on_delta(item)
            except queue.Empty:
                continue
            except KeyboardInterrupt:
                cancel.set()  # the engine finishes the request as "cancelled" at its next step
    finally:
        # Also when showing a delta failed (stdout a closed pipe): the process must not exit while
        # the worker is inside torch, which aborts it; another Ctrl-C does not cut the wait short.
        cancel.set()
        while worker.is_alive():
            try:
                worker.join()
            except KeyboardInterrupt:
                continue


class StdoutConsole:
    """Plain, unstyled stdout for the answer, so it stays clean when redirected."""

    def out(self, text: str, **_: object) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()


class StreamView:
    """Shows streamed deltas: the reasoning dim under a "Thinking" label, then the answer."""

    def __init__(
        self, reasoning_console: Console, answer_console: Console | StdoutConsole, hide_reasoning: bool
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


CHAT_HELP = """\
Enter sends; Esc then Enter (or Alt-Enter) starts a new line. Ctrl-C stops an answer; Ctrl-D quits.
  /set KEY VALUE   change a sampling setting, e.g. /set temperature 0.7  (/set seed none)
  /show            the current settings
  /history         the conversation so far
  /reset           forget the conversation
  /quit            leave (also /exit, Ctrl-D)"""

_OPTIONAL_INTS = ("seed", "reasoning_budget")
# What a chat turn can change: raw text (no turns) and log-probabilities (not shown) are for the API.
_NOT_FOR_CHAT = ("raw", "logprobs")


def chat_settings(params: SamplingParams) -> list[str]:
    """The settings `/set` changes and `/show` lists, in the dataclass's order."""
    return [f.name for f in dataclasses.fields(params) if f.name not in _NOT_FOR_CHAT]


def apply_setting(params: SamplingParams, key: str, raw: str) -> SamplingParams:
    """`/set KEY VALUE` -> new validated params; RequestError with a one-line reason otherwise."""
    settings = chat_settings(params)
    name = key.replace("-", "_")
    if name not in settings:
        raise RequestError(f"unknown setting {key!r}; choose one of: {', '.join(settings)}")
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


def shown(value: object) -> str:
    """A setting as `/show` prints it: stop strings as a list, "none" for nothing."""
    if isinstance(value, tuple):
        return repr(list(value)) if value else "none"
    return "none" if value is None else repr(value)


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
        asked_max_new_tokens: bool = False,
    ) -> None:
        self.engine = engine
        self.params = params
        self.console = console
        self.system = system
        self.hide_reasoning = hide_reasoning
        # A max_new_tokens asked for (flag or /set) keeps that much room; the default at most half the context.
        self.asked_max_new_tokens = asked_max_new_tokens
        self.messages: list[dict[str, str]] = []

    def say(self, text: str, **style: Any) -> None:
        """A line of the user's or the model's text, printed as it is (no markup, no emoji codes, no wrapping)."""
        self.console.print(text, markup=False, emoji=False, soft_wrap=True, **style)

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
        say = self.say
        if name in ("/quit", "/exit"):
            return False
        if name == "/reset":
            self.messages.clear()
            say("history cleared", style="dim")
        elif name == "/set":
            key, _, value = rest.strip().partition(" ")
            try:
                self.params = apply_setting(self.params, key, value)
                name = key.replace("-", "_")
                self.asked_max_new_tokens |= name == "max_new_tokens"
                say(f"{name} = {shown(getattr(self.params, name))}", style="dim")
            except RequestError as e:
                say(f"error: {e}", style="red")
        elif name == "/show":
            say(
                ", ".join(
                    f"{name}={shown(getattr(self.params, name))}" for name in chat_settings(self.params)
                ),
                style="dim",
            )
        elif name == "/history":
            for message in self.messages:
                say(f"{message['role']}: {message['content']}")
            if not self.messages:
                say("(no messages yet)", style="dim")
        elif name == "/help":
            say(CHAT_HELP)
        else:
            say(f"unknown command {name}; /help lists them", style="red")
        return True

    def turn(self, user_text: str) -> None:
        """Answer one user message, streaming; Ctrl-C stops the answer but keeps the chat."""
        fitted = self._fit([*self.messages, {"role": "user", "content": user_text}])
        if fitted is None:
            return
        messages, prompt_ids, params = fitted
        view = StreamView(self.console, self.console, self.hide_reasoning)
        result = run_cancellable(self.engine, prompt_ids, params, view.show)
        view.end(result)
        self.messages = [*messages, {"role": "assistant", "content": result.answer}]

    def _fit(
        self, messages: list[dict[str, str]]
    ) -> tuple[list[dict[str, str]], list[int], SamplingParams] | None:
        """Drop the oldest exchanges until the prompt leaves room to answer; cap max_new_tokens to the room."""
        tokenizer, context = self.engine.tokenizer, self.engine.max_context
        asked = self.params.max_new_tokens
        wanted = asked if self.asked_max_new_tokens else min(asked, context // 2)
        prompt_ids = tokenizer.render_prompt(messages, system=self.system)
        while len(prompt_ids) + wanted > context and len(messages) > 1:
            messages = messages[2:]  # the oldest user + assistant exchange
            prompt_ids = tokenizer.render_prompt(messages, system=self.system)
        try:
            room = self.engine.room_for_reply(len(prompt_ids))
        except RequestError as e:
            problem = str(e)
            alone = len(tokenizer.render_prompt([{"role": "user", "content": ""}], system=self.system))
            if self.system and alone >= context:  # no message could fit: say which part is too long
                problem = (
                    f"the system prompt ({alone} tokens with its framing) fills the model's context of "
                    f"{context}; start the chat with a shorter --system"
                )
            self.say(f"error: {problem}", style="red")
            return None
        return (
            messages,
            prompt_ids,
            dataclasses.replace(self.params, max_new_tokens=min(self.params.max_new_tokens, room)),
        )
