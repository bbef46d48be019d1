"""GPT-2 BPE plus the chat ids; the one renderer and the one parser of the chat format.

Special ids come only from structure, never from text: `encode` is tiktoken's
`encode_ordinary`, so a typed `<|im_end|>` or the word `user` stays plain BPE.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from reasoning_llama.errors import TokenizerError
from reasoning_llama.gpt2_ranks import gpt2_encoding

EOT = 50256  # <|endoftext|>: end of a training sequence
IM_START = 50257
IM_END = 50258
USER = 50259
REASONING = 50260
ASSISTANT = 50261
PAD = 50262
N_VOCAB = 50263
NEWLINE = 198  # GPT-2's id for "\n"

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

    def render_prompt(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """Ids the engine feeds: the conversation, ending with `<|im_start|>reasoning\\n`."""
        messages = _merge_system(messages)
        if not messages or messages[-1]["role"] != "user":
            raise TokenizerError("a prompt must end with a user message")
        ids: list[int] = []
        for message in messages:
            ids += self._turn(message["role"], message["content"])
        return [*ids, IM_START, REASONING, NEWLINE]

    def render_generation(self, reasoning: str, answer: str) -> list[int]:
        """The ids the engine must generate after the prompt, through the final <|endoftext|>."""
        return [
            *self.encode(reasoning),
            IM_END,
            NEWLINE,
            IM_START,
            ASSISTANT,
            NEWLINE,
            *self.encode(answer),
            IM_END,
            EOT,
        ]

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
        if system:
            messages.insert(0, {"role": "system", "content": system})
        return self.render_conversation(messages, reasoning, assistant, train_on_prompt=train_on_prompt)

    def render_conversation(
        self,
        messages: Sequence[Mapping[str, str]],
        reasoning: str,
        answer: str,
        *,
        train_on_prompt: bool = False,
    ) -> RenderedExample:
        """A multi-turn history ending in a user turn, plus the final reasoning and answer to learn."""
        prompt = self.render_prompt(messages)
        target = self.render_generation(reasoning, answer)
        mask = [train_on_prompt] * len(prompt) + [True] * len(target)
        if train_on_prompt:
            mask[0] = False  # nothing predicts the first token
        return RenderedExample(prompt + target, mask)

    def parse(self, ids: Sequence[int]) -> ParsedOutput:
        """Split generated ids (everything after the prompt) into reasoning and answer.

        Tolerates truncation, a missing or partial assistant header and stray special ids.
        """
        reasoning: list[int] = []
        answer: list[int] = []
        stray = False
        pos, n = 0, len(ids)
        while pos < n and ids[pos] not in (IM_END, EOT):
            stray |= _keep_text(ids[pos], reasoning)
            pos += 1
        if pos == n:  # cut off inside the reasoning
            return ParsedOutput(self.decode(reasoning), "", False, False)
        if ids[pos] == EOT:  # the sequence ended without an answer
            return ParsedOutput(self.decode(reasoning), "", True, False)
        pos += 1
        header = (NEWLINE, IM_START, ASSISTANT, NEWLINE)
        matched = 0
        while matched < len(header) and pos < n and ids[pos] == header[matched]:
            matched += 1
            pos += 1
        finished = False
        while pos < n:
            if ids[pos] in (IM_END, EOT):
                finished = True
                break
            stray |= _keep_text(ids[pos], answer)
            pos += 1
        well_formed = finished and matched == len(header) and not stray
        return ParsedOutput(self.decode(reasoning), self.decode(answer), finished, well_formed)

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


def _keep_text(token_id: int, out: list[int]) -> bool:
    """Append a text id to `out`; return True for a stray special id (which is dropped)."""
    if token_id in SPECIAL_BY_ID:
        return True
    out.append(token_id)
    return False


def _merge_system(messages: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    """Validate roles and fold system messages into the first user turn (blank line between)."""
    system: list[str] = []
    turns: list[dict[str, str]] = []
    for message in messages:
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise TokenizerError(f"unknown role {role!r}; expected one of {', '.join(CHAT_ROLES)}")
        if not isinstance(content, str):
            raise TokenizerError(f"message content must be a string, got {type(content).__name__}")
        if role == "system":
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
