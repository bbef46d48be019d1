"""The tokenizer: GPT-2 BPE (tiktoken's `gpt2` encoding) plus the six chat ids (DESIGN.md §1).

`chat.py` holds the ids, the one renderer and the one parser (`Turn`) of the chat format;
`gpt2_ranks.py` obtains and verifies GPT-2's BPE files offline. Import from here.
"""

from reasoning_llama.tokenizer.chat import (
    ASSISTANT,
    ASSISTANT_HEADER,
    CHAT_ROLES,
    EOT,
    IM_END,
    IM_START,
    N_VOCAB,
    NEWLINE,
    PAD,
    REASONING,
    ROLE_IDS,
    SPECIAL_BY_ID,
    SPECIAL_TOKENS,
    USER,
    ChatTokenizer,
    ParsedOutput,
    RenderedExample,
    Turn,
    get_tokenizer,
)

__all__ = [
    "ASSISTANT",
    "ASSISTANT_HEADER",
    "CHAT_ROLES",
    "EOT",
    "IM_END",
    "IM_START",
    "NEWLINE",
    "N_VOCAB",
    "PAD",
    "REASONING",
    "ROLE_IDS",
    "SPECIAL_BY_ID",
    "SPECIAL_TOKENS",
    "USER",
    "ChatTokenizer",
    "ParsedOutput",
    "RenderedExample",
    "Turn",
    "get_tokenizer",
]
