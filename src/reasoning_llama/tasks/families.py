"""The registry of synthetic task families: each a seeded generator plus its answer checker.

The *easy* families (:data:`DEFAULT_FAMILIES`) are small enough for a tiny model trained for a few CPU
minutes; the multi-digit ones share the same digit-level style and are meant for longer (GPU) runs.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from reasoning_llama.tasks import answers, generators


@dataclass(frozen=True)
class SyntheticExample:
    """One generated problem with its step-by-step reasoning and short final answer."""

    family: str
    user: str
    reasoning: str
    assistant: str

    def as_row(self) -> dict[str, str]:
        """The dataset row: ``{"user", "reasoning", "assistant", "family"}``."""
        return {
            "user": self.user,
            "reasoning": self.reasoning,
            "assistant": self.assistant,
            "family": self.family,
        }


Generator = Callable[[random.Random, int], tuple[str, str, str]]
Canonicalizer = Callable[[str], str]


MAX_DIFFICULTY = 100  # problems of hundreds of digits already overflow any context this model has


@dataclass(frozen=True)
class Family:
    """A task family: a seeded problem generator plus the answer checker for its problems."""

    name: str
    description: str
    default_difficulty: int
    min_difficulty: int
    easy: bool
    make: Generator
    canonical: Canonicalizer

    def generate(self, rng: random.Random, difficulty: int | None = None) -> SyntheticExample:
        """Draw one problem (with reasoning and answer) at ``difficulty`` (the family default if None)."""
        level = self.validate_difficulty(self.default_difficulty if difficulty is None else difficulty)
        user, reasoning, assistant = self.make(rng, level)
        return SyntheticExample(self.name, user, reasoning, assistant)

    def validate_difficulty(self, difficulty: int) -> int:
        """``difficulty`` itself if it is a valid level for this family; a clear ValueError otherwise."""
        if (
            not isinstance(difficulty, int)
            or isinstance(difficulty, bool)
            or not self.min_difficulty <= difficulty <= MAX_DIFFICULTY
        ):
            raise ValueError(
                f"difficulty for family {self.name!r} must be an integer in {self.min_difficulty}.."
                f"{MAX_DIFFICULTY}, got {difficulty!r}"
            )
        return difficulty

    def check(self, expected: str, predicted: str) -> bool:
        """Exact match of ``predicted`` against the ``expected`` answer after normalisation."""
        return self.canonical(expected) == self.canonical(predicted)


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family(
            "chain_sum",
            "Add 2..difficulty single digits with a running total, one line per step.",
            default_difficulty=4,
            min_difficulty=2,
            easy=True,
            make=generators.make_chain_sum,
            canonical=answers.canonical_integer,
        ),
        Family(
            "sort_digits",
            "Sort 3..difficulty digits by repeatedly moving the smallest remaining digit.",
            default_difficulty=5,
            min_difficulty=2,
            easy=True,
            make=generators.make_sort_digits,
            canonical=answers.canonical_digit_sequence,
        ),
        Family(
            "max_digit",
            "Find the largest of 3..difficulty digits with a running maximum, one comparison per line.",
            default_difficulty=6,
            min_difficulty=2,
            easy=True,
            make=generators.make_max_digit,
            canonical=answers.canonical_integer,
        ),
        Family(
            "count_letter",
            "Count a letter in a common word of at most difficulty letters, spelling it with a running count.",
            default_difficulty=7,
            min_difficulty=3,
            easy=True,
            make=generators.make_count_letter,
            canonical=answers.canonical_integer,
        ),
        Family(
            "compare",
            "Say which of two numbers with at most difficulty digits is larger, comparing digit by digit.",
            default_difficulty=3,
            min_difficulty=1,
            easy=False,
            make=generators.make_compare,
            canonical=answers.canonical_integer,
        ),
        Family(
            "add",
            "Add two numbers with at most difficulty digits, one column per line with carries.",
            default_difficulty=3,
            min_difficulty=1,
            easy=False,
            make=generators.make_add,
            canonical=answers.canonical_integer,
        ),
        Family(
            "subtract",
            "Subtract two numbers with at most difficulty digits (non-negative result), one column per line.",
            default_difficulty=3,
            min_difficulty=1,
            easy=False,
            make=generators.make_subtract,
            canonical=answers.canonical_integer,
        ),
        Family(
            "multiply",
            "Long multiplication; difficulty 1: 2x1 digits, 2: 3x1, 3: 2x2, 4: 3x2, 5: 3x3, n: (n-2)x(n-2).",
            default_difficulty=1,
            min_difficulty=1,
            easy=False,
            make=generators.make_multiply,
            canonical=answers.canonical_integer,
        ),
        Family(
            "linear_equation",
            "Solve a*x + b = c for an integer x; difficulty widens the ranges and allows negatives.",
            default_difficulty=1,
            min_difficulty=1,
            easy=False,
            make=generators.make_linear_equation,
            canonical=answers.canonical_solution,
        ),
    )
}

DEFAULT_FAMILIES: tuple[str, ...] = ("chain_sum", "sort_digits", "count_letter")
"""The families used when none are named (training, `eval --task synthetic`): easy ones, single-digit or
letter tokens, tens of tokens per example. The quickstart names its own (see recipes/quickstart.yaml)."""


def families_or_default(names: Sequence[str]) -> list[str]:
    """The named families, or :data:`DEFAULT_FAMILIES` when none are named."""
    return list(names) or list(DEFAULT_FAMILIES)


def get_family(name: str) -> Family:
    """The registered family called ``name``; a ValueError lists the known ones otherwise."""
    try:
        return FAMILIES[name]
    except KeyError:
        known = ", ".join(FAMILIES)
        raise ValueError(f"unknown synthetic task family {name!r}; known families: {known}") from None


def check_answer(family: str | None, example_or_expected: SyntheticExample | str, predicted: str) -> bool:
    """Whether ``predicted`` matches the expected answer (a string or an example); the one answer checker.

    A ``family`` problem uses that family's checker (e.g. ``07`` == ``7``); ``family=None`` (an answer
    that belongs to no synthetic family) compares :func:`normalize_answer` texts.
    """
    task = None if family is None else get_family(family)
    expected = example_or_expected
    if isinstance(example_or_expected, SyntheticExample):
        if example_or_expected.family != family:
            raise ValueError(f"example belongs to family {example_or_expected.family!r}, not {family!r}")
        expected = example_or_expected.assistant
    if task is None:
        return answers.normalize_answer(expected) == answers.normalize_answer(predicted)
    return task.check(expected, predicted)
