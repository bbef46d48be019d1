"""The engine's log-probabilities in OpenAI's two shapes: per-token objects (chat) and parallel lists
(legacy completions).

The figures are the engine's (`sampling.token_logprobs`): for sampled tokens, the log-softmax of the
logits the sampler drew from, after the repetition penalty and before the mask of ids it never
samples, at temperature 1; for echoed prompt tokens, the model's own distribution.
"""

from __future__ import annotations

import codecs
from collections.abc import Mapping, Sequence

from reasoning_llama.sampling import TokenLogprob
from reasoning_llama.server.schemas import ChatTokenLogprob, ChoiceLogprobs, CompletionLogprobs, TopLogprob
from reasoning_llama.tokenizer import N_VOCAB, SPECIAL_BY_ID, ChatTokenizer

# JSON has no -inf (an id the penalty or a logits hook ruled out entirely); vLLM reports this floor too.
LOGPROB_FLOOR = -9999.0


def token_text(tokenizer: ChatTokenizer, token: int) -> tuple[str, list[int] | None]:
    """A token's text and UTF-8 bytes; `bytes:\\xNN` for part of a character; a special id's name, no bytes."""
    if token in SPECIAL_BY_ID:
        return SPECIAL_BY_ID[token], None
    if token >= N_VOCAB:  # a model's padding rows beyond the tokenizer's ids
        return f"<|unused {token}|>", None
    data = tokenizer.token_bytes(token)
    try:
        return data.decode("utf-8"), list(data)
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data), list(data)


def _floor(logprob: float) -> float:
    return max(logprob, LOGPROB_FLOOR)


def chat_token_logprobs(tokenizer: ChatTokenizer, entries: Sequence[TokenLogprob]) -> list[ChatTokenLogprob]:
    out = []
    for entry in entries:
        text, data = token_text(tokenizer, entry.token)
        top = []
        for token, logprob in entry.top:
            top_text, top_data = token_text(tokenizer, token)
            top.append(TopLogprob(token=top_text, logprob=_floor(logprob), bytes=top_data))
        out.append(ChatTokenLogprob(token=text, logprob=_floor(entry.logprob), bytes=data, top_logprobs=top))
    return out


def chat_logprobs(tokenizer: ChatTokenizer, by_kind: Mapping[str, Sequence[TokenLogprob]]) -> ChoiceLogprobs:
    """`content` for the answer's tokens, `reasoning` for the reasoning's; a kind left out stays null."""
    return ChoiceLogprobs(
        content=chat_token_logprobs(tokenizer, by_kind["answer"]) if "answer" in by_kind else None,
        reasoning=chat_token_logprobs(tokenizer, by_kind["reasoning"]) if "reasoning" in by_kind else None,
    )


class CompletionLogprobsBuilder:
    """Legacy `logprobs` of one choice, built in pieces (echoed prompt, then each streamed delta);
    `text_offset` counts characters of the choice's text so far (an end id closes it: nothing follows)."""

    def __init__(self, tokenizer: ChatTokenizer) -> None:
        self.tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._chars = 0

    def add(self, tokens: Sequence[int], entries: Sequence[TokenLogprob | None]) -> CompletionLogprobs:
        """The next tokens; `entries[i]` is tokens[i]'s logprob (None for a prompt's first token)."""
        out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        for token, entry in zip(tokens, entries, strict=True):
            out.tokens.append(token_text(self.tokenizer, token)[0])
            out.text_offset.append(self._chars)
            if token < N_VOCAB:  # a special id as its name, as an echoed prompt of ids writes it
                self._chars += len(self._decoder.decode(self.tokenizer.token_bytes(token)))
            if entry is None:
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                continue
            out.token_logprobs.append(_floor(entry.logprob))
            top: dict[str, float] = {}
            for top_token, logprob in entry.top:  # best first: a repeated text keeps its best figure
                top.setdefault(token_text(self.tokenizer, top_token)[0], _floor(logprob))
            out.top_logprobs.append(top)
        return out


def joined(parts: Sequence[CompletionLogprobs]) -> CompletionLogprobs:
    return CompletionLogprobs(
        tokens=[t for p in parts for t in p.tokens],
        token_logprobs=[t for p in parts for t in p.token_logprobs],
        top_logprobs=[t for p in parts for t in p.top_logprobs],
        text_offset=[t for p in parts for t in p.text_offset],
    )
