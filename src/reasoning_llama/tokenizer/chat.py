"""GPT-2 BPE plus the chat ids; the one renderer and the one parser (`Turn`) of the chat format.

Special ids come only from structure, never from text: `encode` is tiktoken's
`encode_ordinary`, so a typed `<|im_end|>` or the word `user` stays plain BPE.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

from reasoning_llama.errors import TokenizerError
from reasoning_llama.tokenizer.gpt2_ranks import gpt2_encoding

EOT = 50256  # <|endoftext|>: end of a training sequence
IM_START = 50257
IM_END = 50258
USER = 50259
REASONING = 50260
ASSISTANT = 50261
PAD = 50262
N_VOCAB = PAD + 1  # the model's vocabulary: GPT-2's 50257 ids, then the chat ids
NEWLINE = 198  # GPT-2's id for "\n"
ASSISTANT_HEADER = (NEWLINE, IM_START, ASSISTANT, NEWLINE)  # follows the reasoning's <|im_end|>

SPECIAL_TOKENS: dict[str, int] = {
    "<|endoftext|>": EOT,
    "<|im_start|>": IM_START,
    "<|im_end|>": IM_END,
    "user": USER,
    "reasoning": REASONING,
    "assistant": ASSISTANT,
    "<|PAD|>": PAD,
}
SPECIAL_BY_ID: dict[int, str] = {i: s for s, i in SPECIAL_TOKENS.items()}
ROLE_IDS: dict[str, int] = {"user": USER, "reasoning": REASONING, "assistant": ASSISTANT}
CHAT_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class RenderedExample:
    """Token ids of one training sequence; `loss_mask[i]` says whether token i is a training target."""

    ids: list[int]
    loss_mask: list[bool]


@dataclass(frozen=True)
class ParsedOutput:
    """What a generation said, split by the chat structure."""

    reasoning: str
    answer: str
    finished: bool  # the answer was closed by <|im_end|> or <|endoftext|>
    well_formed: bool  # reasoning closed, full assistant header, answer closed, no stray special ids


Phase = Literal["reasoning", "header", "answer", "done"]


class Turn:
    """The grammar of one generated turn, fed one id at a time: reasoning, assistant header, answer.

    `feed` says which text an id belongs to; `forced` is the id that must come next (the rest of
    the assistant header, or the `<|im_end|>` that closes a spent reasoning budget), None when the
    model chooses. The engine drives one per request and `ChatTokenizer.parse` feeds it saved ids,
    so generation and parsing cannot disagree. Parsing tolerates what the engine never produces: a
    missing or partial header (the answer starts at the first id that breaks it), stray special
    ids (dropped), and `<|endoftext|>` inside the reasoning (the turn ends without an answer).
    A raw turn (plain text continuation) starts in the answer and has no header to match.
    """

    def __init__(self, *, raw: bool = False, reasoning_budget: int | None = None) -> None:
        self.raw = raw
        self.reasoning_budget = reasoning_budget
        self.phase: Phase = "answer" if raw else "reasoning"
        self.reasoning_tokens = 0  # text ids of the reasoning
        self.header_matched = 0  # ids of ASSISTANT_HEADER seen in order
        self.finished = False  # the answer was closed by <|im_end|> or <|endoftext|>
        self.stray = False  # a special id appeared where text belongs

    @property
    def forced(self) -> int | None:
        """The id that must be fed next, or None when any allowed id may follow."""
        if self.phase == "header":
            return ASSISTANT_HEADER[self.header_matched]
        budget = self.reasoning_budget
        if self.phase == "reasoning" and budget is not None and self.reasoning_tokens >= budget:
            return IM_END
        return None

    @property
    def well_formed(self) -> bool:
        """Reasoning closed, the full assistant header, the answer closed, no stray special ids."""
        header_ok = self.raw or self.header_matched == len(ASSISTANT_HEADER)
        return self.finished and header_ok and not self.stray

    def feed(self, token: int) -> Literal["reasoning", "answer"] | None:
        """Advance by one generated id; the text it carries (None for structure ids and dropped ones)."""
        if self.phase == "reasoning":
            if token == IM_END:
                self.phase = "header"
            elif token == EOT:
                self.phase, self.finished = "done", True
            elif token in SPECIAL_BY_ID:
                self.stray = True
            else:
                self.reasoning_tokens += 1
                return "reasoning"
            return None
        if self.phase == "header":
            if token == ASSISTANT_HEADER[self.header_matched]:
                self.header_matched += 1
                if self.header_matched == len(ASSISTANT_HEADER):
                    self.phase = "answer"
                return None
            self.phase = "answer"  # a broken header: this id is the answer's first
        if self.phase == "answer":
            if token in (IM_END, EOT):
                self.phase, self.finished = "done", True
            elif token in SPECIAL_BY_ID:
                self.stray = True
            else:
                return "answer"
        return None  # "done": whatever follows the closed answer is not part of the turn


class ChatTokenizer:
    """GPT-2 BPE (tiktoken) extended with the chat ids of DESIGN.md §1."""

    base_encoding = "gpt2"
    n_vocab = N_VOCAB

    def __init__(self) -> None:
        self._enc = gpt2_encoding()

    # -- plain text ---------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Plain BPE ids of `text`; never a special id, whatever the text contains."""
        return self._enc.encode_ordinary(text)

    def decode_bytes(self, ids: Iterable[int], *, skip_special: bool = False) -> bytes:
        parts = []
        for i in ids:
            if i in SPECIAL_BY_ID:
                if not skip_special:
                    parts.append(SPECIAL_BY_ID[i].encode())
            elif 0 <= i < EOT:
                parts.append(self._enc.decode_single_token_bytes(i))
            else:
                raise TokenizerError(f"token id {i} is outside the vocabulary (0..{N_VOCAB - 1})")
        return b"".join(parts)

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        """Text of `ids`; special ids render as their strings unless `skip_special`."""
        return self.decode_bytes(ids, skip_special=skip_special).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return self.decode_bytes([token_id])

    # -- chat format ----------------------------------------------------------------
    def _turn(self, role: str, text: str) -> list[int]:
        return [IM_START, ROLE_IDS[role], NEWLINE, *self.encode(text), IM_END, NEWLINE]

    def render_prompt(self, messages: Sequence[Mapping[str, str]], *, system: str | None = None) -> list[int]:
        """Ids the engine feeds: the conversation (after `system`, if given), ending with `<|im_start|>reasoning\\n`."""
        if system:
            messages = [{"role": "system", "content": system}, *messages]
        messages = _merge_system(messages)
        if not messages or messages[-1]["role"] != "user":
            raise TokenizerError("a prompt must end with a user message")
        ids: list[int] = []
        for message in messages:
            ids += self._turn(message["role"], message["content"])
        return [*ids, IM_START, REASONING, NEWLINE]

    def render_generation(self, reasoning: str, answer: str) -> list[int]:
        """The ids the engine must generate after the prompt, through the final <|endoftext|>."""
        return [*self.encode(reasoning), IM_END, *ASSISTANT_HEADER, *self.encode(answer), IM_END, EOT]

    def render_example(
        self,
        user: str,
        reasoning: str,
        assistant: str,
        *,
        system: str | None = None,
        train_on_prompt: bool = False,
    ) -> RenderedExample:
        """One training sequence; the loss covers the generated part (and the prompt if asked)."""
        messages = [{"role": "user", "content": user}]
        return self.render_conversation(
            messages, reasoning, assistant, system=system, train_on_prompt=train_on_prompt
        )

    def render_conversation(
        self,
        messages: Sequence[Mapping[str, str]],
        reasoning: str,
        answer: str,
        *,
        system: str | None = None,
        train_on_prompt: bool = False,
    ) -> RenderedExample:
        """A multi-turn history ending in a user turn, plus the final reasoning and answer to learn."""
        prompt = self.render_prompt(messages, system=system)
        target = self.render_generation(reasoning, answer)
        mask = [train_on_prompt] * len(prompt) + [True] * len(target)
        if train_on_prompt:
            mask[0] = False  # nothing predicts the first token
        return RenderedExample(prompt + target, mask)

    def parse(self, ids: Sequence[int]) -> ParsedOutput:
        """Split generated ids (everything after the prompt) into reasoning and answer: feed a `Turn`.

        Tolerates truncation, a missing or partial assistant header and stray special ids.
        """
        turn = Turn()
        text: dict[str, list[int]] = {"reasoning": [], "answer": []}
        for token in ids:
            kind = turn.feed(token)
            if kind is not None:
                text[kind].append(token)
        return ParsedOutput(
            self.decode(text["reasoning"]), self.decode(text["answer"]), turn.finished, turn.well_formed
        )

    # -- persistence ----------------------------------------------------------------
    @staticmethod
    def save(directory: str | Path) -> None:
        """Write `tokenizer.json`: the base encoding and the special ids (no BPE ranks needed)."""
        info = {"base_encoding": "gpt2", "n_vocab": N_VOCAB, "special_tokens": SPECIAL_TOKENS}
        (Path(directory) / "tokenizer.json").write_text(json.dumps(info, indent=2) + "\n")

    @staticmethod
    def check_compatible(directory: str | Path) -> None:
        """Raise unless `directory/tokenizer.json` (when present) describes this tokenizer."""
        path = Path(directory) / "tokenizer.json"
        if not path.is_file():
            return
        info = json.loads(path.read_text())
        if info.get("base_encoding") != "gpt2" or info.get("special_tokens") != SPECIAL_TOKENS:
            raise TokenizerError(f"{path} describes a different tokenizer than GPT-2 + the chat ids")


def _merge_system(messages: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    """Validate roles and fold system messages into the first user turn (blank line between); an
    empty one is no instruction and adds nothing (API clients often send one)."""
    system: list[str] = []
    turns: list[dict[str, str]] = []
    for message in messages:
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise TokenizerError(f"unknown role {role!r}; expected one of {', '.join(CHAT_ROLES)}")
        if not isinstance(content, str):
            raise TokenizerError(f"message content must be a string, got {type(content).__name__}")
        if role == "system":
            if content:
                system.append(content)
        else:
            turns.append({"role": role, "content": content})
    if system:
        first_user = next((t for t in turns if t["role"] == "user"), None)
        if first_user is None:
            raise TokenizerError("a system message needs a user message to attach to")
        first_user["content"] = "\n\n".join([*system, first_user["content"]])
    return turns


@lru_cache(maxsize=1)
def get_tokenizer() -> ChatTokenizer:
    """A shared tokenizer (building the BPE ranks takes a moment)."""
    return ChatTokenizer()
