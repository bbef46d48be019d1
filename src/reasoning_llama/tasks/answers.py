"""Answer checking for the synthetic tasks: normalisation and each family's canonical form."""

from __future__ import annotations

import re


def normalize_answer(text: str) -> str:
    """Strip, casefold, collapse whitespace and drop trailing periods."""
    text = " ".join(text.split()).casefold()
    return text.rstrip(".").rstrip()


_INTEGER = re.compile(r"[+-]?\d+")
_DIGIT_SEQUENCE = re.compile(r"\d(?:[\s,]*\d)*")


def canonical_integer(text: str) -> str:
    """Integers compare by value, so ``07`` and ``+7`` match ``7``."""
    text = normalize_answer(text)
    return str(int(text)) if _INTEGER.fullmatch(text) else text


def canonical_solution(text: str) -> str:
    """An equation's answer: the integer, optionally written as ``x = 7``."""
    text = normalize_answer(text)
    text = re.sub(r"^x\s*=\s*", "", text)
    return canonical_integer(text)


def canonical_digit_sequence(text: str) -> str:
    """A list of single digits; commas or missing separators do not matter (``1,2,5`` == ``1 2 5``)."""
    text = normalize_answer(text)
    if _DIGIT_SEQUENCE.fullmatch(text):
        return " ".join(ch for ch in text if ch.isdigit())
    return text
