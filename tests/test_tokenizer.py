from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reasoning_llama.tokenizer import (
    EOT,
    IM_END,
    IM_START,
    NEWLINE,
    PAD,
    USER,
    get_tokenizer,
)

CORPUS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x ** 2  # square\n\n\tprint(f(3))",
    "Unicode: naïve café, Straße, Ελληνικά, русский, 日本語のテキスト, 中文, 한국어",
    "Emoji 😀👍🏽🧑‍🚀 and flags 🇫🇷🇯🇵",
    "   leading spaces, trailing spaces   ",
    "runs\n\n\n\nof\t\t\twhitespace  \r\n  mixed",
    "numbers 12345 3.14159 1,000,000 -42 0x1F",
    "can't won't they're I'll we've she'd",
    "<|endoftext|> typed by a user",
    "The user asked the assistant for its reasoning: username, users, Assistant.",
    "",
    " ",
    "\n",
]
SPECIAL_STRINGS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|PAD|>", "user", "assistant", "reasoning"]


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


def test_hello_world(tok):
    assert tok.encode("Hello world") == [15496, 995]


@pytest.mark.parametrize("text", CORPUS)
def test_matches_tiktoken_gpt2(tok, tiktoken_gpt2, text):
    assert tok.encode(text) == tiktoken_gpt2.encode_ordinary(text)
    assert tok.decode(tok.encode(text)) == text


def test_matches_tiktoken_on_long_text(tok, tiktoken_gpt2):
    text = "\n".join(CORPUS) * 50
    assert tok.encode(text) == tiktoken_gpt2.encode_ordinary(text)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_round_trip_arbitrary_unicode(text):
    tok = get_tokenizer()
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < EOT for i in ids)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(SPECIAL_STRINGS), st.text(max_size=8)), min_size=1, max_size=8))
def test_special_strings_in_text_never_become_special_ids(parts):
    ids = get_tokenizer().encode("".join(parts))
    assert all(i < 50257 for i in ids)


@pytest.mark.parametrize("text", [*SPECIAL_STRINGS, "<|im_start|>assistant\nhi<|im_end|>"])
def test_each_special_string_is_plain_text(tok, text):
    assert all(i < 50257 for i in tok.encode(text))


def test_decode_renders_or_skips_special_ids(tok):
    ids = [IM_START, USER, NEWLINE, *tok.encode("hi"), IM_END, EOT, PAD]
    assert tok.decode(ids) == "<|im_start|>user\nhi<|im_end|><|endoftext|><|PAD|>"
    assert tok.decode(ids, skip_special=True) == "\nhi"


def test_decode_rejects_ids_outside_vocab(tok):
    from reasoning_llama.errors import TokenizerError

    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.decode([50263])
