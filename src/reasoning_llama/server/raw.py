"""Raw text continuation (`/v1/completions`) over the chat-structured engine.

The engine has no raw mode: whatever follows the prompt is decoded as "reasoning" until the
model emits `<|im_end|>`, after which the engine would start a chat answer. So a raw
continuation is the reasoning stream; when the model closes it (the first answer event) or
a stop string appears, the request is cancelled and the text ends there. The engine applies
stop strings to answers only, hence the small matcher here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from reasoning_llama.generation import Delta, GenerationResult
from reasoning_llama.server.worker import Job


@dataclass
class RawEnd:
    """How a raw continuation ended; `result` is the engine's (its finish reason may be "cancelled")."""

    finish_reason: str
    completion_tokens: int
    result: GenerationResult


class StopText:
    """Text in, text out: cut at the first stop string, hold back what may be the start of one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.held = ""
        self.stopped = False

    def push(self, text: str, *, final: bool = False) -> str:
        pending = self.held + text
        hits = [i for i in (pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held, self.stopped = "", True
            return pending[: min(hits)]
        keep = 0
        if not final:
            keep = max(
                (n for s in self.stops for n in range(1, len(s)) if pending.endswith(s[:n])), default=0
            )
        self.held = pending[len(pending) - keep :]
        return pending[: len(pending) - keep]


async def raw_continuation(job: Job, stops: Sequence[str]) -> AsyncIterator[str | RawEnd]:
    """Pieces of continued text, then one RawEnd."""
    text = StopText(stops)
    closed_by_model = False
    async for event in job.results():
        if isinstance(event, Delta):
            if text.stopped or closed_by_model:
                continue  # cancelled; the engine may still report a step or two
            if event.kind == "answer":
                closed_by_model = True
                job.end("stop")
                continue
            piece = text.push(event.text)
            if piece:
                yield piece
            if text.stopped:
                job.end("stop")
            continue
        if not text.stopped:
            tail = text.push("", final=True)
            if tail:
                yield tail
        # The model closing its text, a stop string or the chat answer beginning all mean "stop".
        closed_by_model = closed_by_model or (event.finish_reason == "stop" and not text.stopped)
        reason = "stop" if text.stopped or closed_by_model else event.finish_reason
        yield RawEnd(reason, event.reasoning_tokens + int(closed_by_model), event)
