"""Built-in verifiable synthetic reasoning tasks: seeded generators of ``{user, reasoning, assistant}`` rows.

Every family writes its reasoning as short, extremely regular lines in which each step moves single-digit
(or single-letter) tokens, because GPT-2 BPE hides digits inside multi-digit tokens (``457`` is one token).
The *easy* families (:data:`DEFAULT_FAMILIES`) are small enough for a tiny model trained for a few CPU
minutes; the multi-digit ones share the same digit-level style and are meant for longer (GPU) runs.

Train and test never share a problem: :func:`problem_split` assigns each problem to a split by a stable
hash of its question text, independent of the seed, and :func:`generate_examples` resamples until it finds
problems of the requested split.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "DEFAULT_FAMILIES",
    "FAMILIES",
    "TEST_FRACTION",
    "Family",
    "Split",
    "SyntheticExample",
    "check_answer",
    "families_or_default",
    "generate_examples",
    "normalize_answer",
    "problem_split",
]

Split = Literal["train", "test"]

TEST_FRACTION = 0.2
"""Share of every family's problem space that belongs to the test split (fixed so splits never move)."""

_SPLIT_SALT = b"reasoning-llama/synthetic/split/v1"
_MAX_CONSECUTIVE_MISSES = 5000


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


_Generator = Callable[[random.Random, int], tuple[str, str, str]]
_Canonicalizer = Callable[[str], str]


@dataclass(frozen=True)
class Family:
    """A task family: a seeded problem generator plus the answer checker for its problems."""

    name: str
    description: str
    default_difficulty: int
    min_difficulty: int
    easy: bool
    make: _Generator
    canonical: _Canonicalizer

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
            or difficulty < self.min_difficulty
        ):
            raise ValueError(
                f"difficulty for family {self.name!r} must be an integer >= {self.min_difficulty}, "
                f"got {difficulty!r}"
            )
        return difficulty

    def check(self, expected: str, predicted: str) -> bool:
        """Exact match of ``predicted`` against the ``expected`` answer after normalisation."""
        return self.canonical(expected) == self.canonical(predicted)


# --------------------------------------------------------------------------- answers


def normalize_answer(text: str) -> str:
    """Strip, casefold, collapse whitespace and drop trailing periods."""
    text = " ".join(text.split()).casefold()
    return text.rstrip(".").rstrip()


_INTEGER = re.compile(r"[+-]?\d+")
_DIGIT_SEQUENCE = re.compile(r"\d(?:[\s,]*\d)*")


def _canonical_integer(text: str) -> str:
    """Integers compare by value, so ``07`` and ``+7`` match ``7``."""
    text = normalize_answer(text)
    return str(int(text)) if _INTEGER.fullmatch(text) else text


def _canonical_solution(text: str) -> str:
    """An equation's answer: the integer, optionally written as ``x = 7``."""
    text = normalize_answer(text)
    text = re.sub(r"^x\s*=\s*", "", text)
    return _canonical_integer(text)


def _canonical_digit_sequence(text: str) -> str:
    """A list of single digits; commas or missing separators do not matter (``1,2,5`` == ``1 2 5``)."""
    text = normalize_answer(text)
    if _DIGIT_SEQUENCE.fullmatch(text):
        return " ".join(ch for ch in text if ch.isdigit())
    return text


# --------------------------------------------------------------------------- shared helpers


def _spaced(digits: Sequence[int]) -> str:
    """Digits as separate single-digit tokens: ``[4, 5, 7]`` -> ``"4 5 7"``."""
    return " ".join(str(d) for d in digits)


def _digits(number: int, width: int = 0) -> list[int]:
    """Decimal digits of a non-negative number, most significant first, left-padded with zeros to ``width``."""
    return [int(ch) for ch in str(number).zfill(width)]


def _strip_leading_zeros(digits: Sequence[int]) -> list[int]:
    """Drop leading zeros but keep a lone zero."""
    index = 0
    while index < len(digits) - 1 and digits[index] == 0:
        index += 1
    return list(digits[index:])


def _problem_length(rng: random.Random, low: int, high: int, alphabet: int) -> int:
    """A length in ``low..high`` weighted by how many problems have it (``alphabet ** length``).

    This makes problems uniform over the whole space, so no short length gets exhausted by deduplication
    and the train and test splits keep the same length mix.
    """
    lengths = range(low, high + 1)
    return rng.choices(lengths, weights=[alphabet**length for length in lengths])[0]


def _random_number(rng: random.Random, length: int) -> int:
    """A uniformly random number with exactly ``length`` digits (a single digit may be 0)."""
    if length == 1:
        return rng.randint(0, 9)
    return rng.randint(10 ** (length - 1), 10**length - 1)


def _column_addition(addends: Sequence[int]) -> list[str]:
    """Column-by-column addition of non-negative numbers, least significant column first.

    Returns the header (addends spelled and zero-padded), one line per column, and the result's digits.
    """
    width = max(len(str(a)) for a in addends)
    padded = [_digits(a, width) for a in addends]
    lines = [" + ".join(_spaced(p) for p in padded)]
    written: list[int] = []
    carry = 0
    for column in range(width - 1, -1, -1):
        column_digits = [p[column] for p in padded]
        total = sum(column_digits) + carry
        terms = " + ".join(str(d) for d in [*column_digits, carry])
        lines.append(f"{terms} = {total}, write {total % 10}, carry {total // 10}")
        written.append(total % 10)
        carry = total // 10
    result = _digits(carry) + written[::-1] if carry else written[::-1]
    lines.append(_spaced(_strip_leading_zeros(result)))
    return lines


# --------------------------------------------------------------------------- easy families


def _make_chain_sum(rng: random.Random, difficulty: int) -> tuple[str, str, str]:
    """Running total of 2..difficulty single digits (1-9), one line per addition."""
    terms = [rng.randint(1, 9) for _ in range(_problem_length(rng, 2, difficulty, 9))]
    lines = []
    total = terms[0]
    for term in terms[1:]:
        lines.append(f"{total} + {term} = {total + term}")
        total += term
    user = f"Compute {' + '.join(str(t) for t in terms)}."
    return user, "\n".join(lines), str(total)


def _make_sort_digits(rng: random.Random, difficulty: int) -> tuple[str, str, str]:
    """Selection sort of 3..difficulty digits: each line is ``sorted-so-far | remaining``."""
    length = _problem_length(rng, min(3, difficulty), difficulty, 10)
    remaining = [rng.randint(0, 9) for _ in range(length)]
    user = f"Sort these digits from smallest to largest: {_spaced(remaining)}."
    done: list[int] = []
    lines = []
    while len(remaining) > 1:
        smallest = min(remaining)
        remaining.remove(smallest)  # removes the first occurrence, keeping the rest in order
        done.append(smallest)
        lines.append(f"{_spaced(done)} | {_spaced(remaining)}")
    done.extend(remaining)
    lines.append(_spaced(done))
    return user, "\n".join(lines), _spaced(done)


def _make_max_digit(rng: random.Random, difficulty: int) -> tuple[str, str, str]:
    """Largest of 3..difficulty digits by a running maximum: each line compares it with the next digit."""
    digits = [rng.randint(0, 9) for _ in range(_problem_length(rng, min(3, difficulty), difficulty, 10))]
    largest = digits[0]
    lines = []
    for digit in digits[1:]:
        lines.append(f"{largest} vs {digit}: {max(largest, digit)}")
        largest = max(largest, digit)
    user = f"What is the largest digit in {_spaced(digits)}?"
    return user, "\n".join(lines), str(largest)


# Common lowercase English words (3-11 letters) for ``count_letter``; the model learns their spellings.
_WORD_LIST = """
    ant arm art bag bed bee box boy bus cap car cat cow cup day dog ear egg eye fan fox fun gum hat hen ice
    jam jar key kid leg lid map mom net nut owl pan pen pie pig pot rat red sea sky sun toy van web zoo
    baby ball bear bell bird boat book cake coat corn door duck farm fish flag frog game gate girl goat
    hand hill home kite lake lamp leaf milk moon nest nose park pear rain ring road rock roof rose sand
    seed shoe sock star tree wind wolf yard
    apple beach bread brick chair chalk cloud clock dream earth field fruit glass grape grass heart horse
    house juice knife lemon light money mouse music night ocean onion paper party pizza plant queen river
    robot salad sheep shirt smile snake spoon stone storm sugar table tiger toast train truck water whale
    world zebra
    animal banana bottle bridge butter candle carrot castle cheese cherry circle coffee cookie dinner
    doctor dragon finger flower forest garden guitar hammer island jacket kitten ladder letter market
    monkey number orange parrot pencil pepper pillow planet pocket potato rabbit rocket school silver
    spider square street summer ticket tomato turtle window winter yellow
    balloon blanket chicken cupboard diamond dolphin holiday kitchen library morning mustard octopus
    penguin picture pumpkin rainbow sandwich giraffe teacher thunder tractor uniform village volcano
    weather whistle
    airplane backpack birthday building calendar elephant football hospital mountain mushroom notebook
    painting squirrel strawberry sunflower treasure umbrella
    blueberry butterfly chocolate crocodile dinosaur adventure telephone vegetable waterfall
    basketball lighthouse motorcycle playground strawberries watermelon grasshopper
"""
_WORDS = tuple(_WORD_LIST.split())


def _make_count_letter(rng: random.Random, difficulty: int) -> tuple[str, str, str]:
    """Count a letter in a word of at most ``difficulty`` letters by spelling it with a running count."""
    word = rng.choice([w for w in _WORDS if len(w) <= difficulty])
    present = sorted(set(word))
    absent = [ch for ch in "abcdefghijklmnopqrstuvwxyz" if ch not in present]
    letter = rng.choice(present) if rng.random() < 0.75 else rng.choice(absent)
    count = 0
    lines = []
    for ch in word:
        count += ch == letter
        lines.append(f"{ch} {count}")
    # Quoting the letter makes it the same BPE token as the line-initial letters of the spelling.
    user = f'How many times does the letter "{letter}" appear in {word}?'
    return user, "\n".join(lines), str(count)


# --------------------------------------------------------------------------- multi-digit families


def _make_compare(rng: random.Random, difficulty: int) -> tuple[str, str, str]:
    """Which of two different numbers with at most ``difficulty`` digits is larger, digit by digit."""
    first = rng.randrange(10**difficulty)
    if rng.random() < 0.75:  # same length, sharing a random prefix, so the digit-wise scan matters
        digits = str(first)
        shared = rng.randint(0, len(digits) - 1)
        second = first
        while second == first:
            tail = "".join(str(rng.randint(0, 9)) for _ in range(len(digits) - shared))
            if shared == 0 and len(digits) > 1:
                tail = str(rng.randint(1, 9)) + tail[1:]
            second = int(digits[:shared] + tail)
    else:
        second = first
        while second == first:
            second = rng.randrange(10**difficulty)
    a, b = _digits(first), _digits(second)
    lines = [f"{_spaced(a)} vs {_spaced(b)}"]
    if len(a) != len(b):
        lines.append(f"{len(a)} digits {'<' if len(a) < len(b) else '>'} {len(b)} digits")
    else:
        for x, y in zip(a, b, strict=True):
            lines.append(f"{x} {'=' if x == y else '<' if x < y else '>'} {y}")
            if x != y:
                break
    larger = max(first, second)
    lines.append(f"{larger} is larger")
    return f"Which number is larger, {first} or {second}?", "\n".join(lines), str(larger)


def _make_add(rng: random.Random, difficulty: int) -> tuple[str, str, str]:
    """Addition of numbers with at most ``difficulty`` digits, one line per column with its carry."""
    a, b = rng.randrange(10**difficulty), rng.randrange(10**difficulty)
    lines = _column_addition([a, b])
    return f"What is {a} + {b}?", "\n".join(lines), str(a + b)


def _make_subtract(rng: random.Random, difficulty: int) -> tuple[str, str, str]:
    """Subtraction ``a - b`` with ``a >= b`` (at most ``difficulty`` digits), one line per column with its borrow."""
    a, b = sorted((rng.randrange(10**difficulty), rng.randrange(10**difficulty)), reverse=True)
    width = len(str(a))
    top, bottom = _digits(a, width), _digits(b, width)
    lines = [f"{_spaced(top)} - {_spaced(bottom)}"]
    written: list[int] = []
    borrow = 0
    for column in range(width - 1, -1, -1):
        t, s = top[column], bottom[column]
        borrow_out = int(t - s - borrow < 0)
        result = t + 10 * borrow_out - s - borrow
        lines.append(f"{t + 10 * borrow_out} - {s} - {borrow} = {result}, borrow {borrow_out}")
        written.append(result)
        borrow = borrow_out
    lines.append(_spaced(_strip_leading_zeros(written[::-1])))
    return f"What is {a} - {b}?", "\n".join(lines), str(a - b)


def _multiply_sizes(difficulty: int) -> tuple[int, int]:
    """Operand digit counts: 1: 2x1, 2: 3x1, 3: 2x2, 4: 3x2, 5: 3x3, n >= 6: (n-2)x(n-2)."""
    table = {1: (2, 1), 2: (3, 1), 3: (2, 2), 4: (3, 2), 5: (3, 3)}
    return table.get(difficulty, (difficulty - 2, difficulty - 2))


def _single_digit_product(a: int, digit: int) -> tuple[list[str], list[int]]:
    """Lines for ``a * digit`` (one per digit of ``a`` with its carry) and the product's digits."""
    lines = []
    written: list[int] = []
    carry = 0
    for d in reversed(_digits(a)):
        total = d * digit + carry
        lines.append(f"{d} * {digit} + {carry} = {total}, write {total % 10}, carry {total // 10}")
        written.append(total % 10)
        carry = total // 10
    result = _digits(carry) + written[::-1] if carry else written[::-1]
    return lines, _strip_leading_zeros(result)


def _make_multiply(rng: random.Random, difficulty: int) -> tuple[str, str, str]:
    """Long multiplication: single-digit products with carries, then a column addition of the partials."""
    len_a, len_b = _multiply_sizes(difficulty)
    a = _random_number(rng, len_a)
    b = rng.randint(2, 9) if len_b == 1 else _random_number(rng, len_b)
    lines = [f"{_spaced(_digits(a))} * {_spaced(_digits(b))}"]
    b_digits = _digits(b)
    if len(b_digits) == 1:
        steps, product = _single_digit_product(a, b)
        lines += [*steps, _spaced(product)]
    else:
        partials = []
        for shift, digit in enumerate(reversed(b_digits)):
            steps, product = _single_digit_product(a, digit)
            partial = _strip_leading_zeros(product + [0] * shift)
            lines += [f"{_spaced(_digits(a))} * {digit}", *steps, f"partial {_spaced(partial)}"]
            partials.append(int("".join(map(str, partial))))
        lines += _column_addition(partials)
    return f"What is {a} * {b}?", "\n".join(lines), str(a * b)


def _linear_ranges(difficulty: int) -> tuple[int, tuple[int, int], int, bool]:
    """(max a, x range, max |b|, whether b may be negative) for ``linear_equation``."""
    if difficulty == 1:
        return 9, (0, 9), 9, False
    if difficulty == 2:
        return 9, (0, 19), 20, True
    return 4 * difficulty, (-10 * (difficulty - 1), 10 * (difficulty - 1)), 10 * difficulty, True


def _signed(value: int) -> str:
    """``+ 5`` or ``- 5`` as written after another term."""
    return f"+ {value}" if value >= 0 else f"- {-value}"


def _make_linear_equation(rng: random.Random, difficulty: int) -> tuple[str, str, str]:
    """Solve ``a*x + b = c`` for an integer x: move b across, then divide by a."""
    max_a, (low_x, high_x), max_b, negative_b = _linear_ranges(difficulty)
    a = rng.randint(2, max_a)
    x = rng.randint(low_x, high_x)
    b = rng.randint(1, max_b) * (rng.choice((1, -1)) if negative_b else 1)
    c = a * x + b
    lines = [
        f"{a}x = {c} {_signed(-b)}",
        f"{a}x = {c - b}",
        f"x = {c - b} / {a}",
        f"x = {x}",
    ]
    return f"Solve for x: {a}x {_signed(b)} = {c}.", "\n".join(lines), str(x)


# --------------------------------------------------------------------------- registry

FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family(
            "chain_sum",
            "Add 2..difficulty single digits with a running total, one line per step.",
            default_difficulty=4,
            min_difficulty=2,
            easy=True,
            make=_make_chain_sum,
            canonical=_canonical_integer,
        ),
        Family(
            "sort_digits",
            "Sort 3..difficulty digits by repeatedly moving the smallest remaining digit.",
            default_difficulty=5,
            min_difficulty=2,
            easy=True,
            make=_make_sort_digits,
            canonical=_canonical_digit_sequence,
        ),
        Family(
            "max_digit",
            "Find the largest of 3..difficulty digits with a running maximum, one comparison per line.",
            default_difficulty=6,
            min_difficulty=2,
            easy=True,
            make=_make_max_digit,
            canonical=_canonical_integer,
        ),
        Family(
            "count_letter",
            "Count a letter in a common word of at most difficulty letters, spelling it with a running count.",
            default_difficulty=7,
            min_difficulty=3,
            easy=True,
            make=_make_count_letter,
            canonical=_canonical_integer,
        ),
        Family(
            "compare",
            "Say which of two numbers with at most difficulty digits is larger, comparing digit by digit.",
            default_difficulty=3,
            min_difficulty=1,
            easy=False,
            make=_make_compare,
            canonical=_canonical_integer,
        ),
        Family(
            "add",
            "Add two numbers with at most difficulty digits, one column per line with carries.",
            default_difficulty=3,
            min_difficulty=1,
            easy=False,
            make=_make_add,
            canonical=_canonical_integer,
        ),
        Family(
            "subtract",
            "Subtract two numbers with at most difficulty digits (non-negative result), one column per line.",
            default_difficulty=3,
            min_difficulty=1,
            easy=False,
            make=_make_subtract,
            canonical=_canonical_integer,
        ),
        Family(
            "multiply",
            "Long multiplication; difficulty 1: 2x1 digits, 2: 3x1, 3: 2x2, 4: 3x2, 5: 3x3, n: (n-2)x(n-2).",
            default_difficulty=1,
            min_difficulty=1,
            easy=False,
            make=_make_multiply,
            canonical=_canonical_integer,
        ),
        Family(
            "linear_equation",
            "Solve a*x + b = c for an integer x; difficulty widens the ranges and allows negatives.",
            default_difficulty=1,
            min_difficulty=1,
            easy=False,
            make=_make_linear_equation,
            canonical=_canonical_solution,
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


# --------------------------------------------------------------------------- splits and sampling


def problem_split(user: str) -> Split:
    """The split a problem belongs to, from a stable hash of its question text (never Python's hash())."""
    digest = hashlib.blake2b(user.encode("utf-8"), digest_size=8, key=_SPLIT_SALT).digest()
    return "test" if int.from_bytes(digest, "big") < TEST_FRACTION * 2**64 else "train"


def _resolve_difficulties(names: Sequence[str], difficulty: int | dict[str, int] | None) -> dict[str, int]:
    """Per-family difficulty: the family default, one level for all, or a mapping (missing = default)."""
    if isinstance(difficulty, dict):
        for name in difficulty:
            get_family(name)
        levels = {name: difficulty.get(name, FAMILIES[name].default_difficulty) for name in names}
    else:
        levels = {
            name: FAMILIES[name].default_difficulty if difficulty is None else difficulty for name in names
        }
    return {name: FAMILIES[name].validate_difficulty(level) for name, level in levels.items()}


def _sample_family(
    family: Family, count: int, split: Split, seed: int, difficulty: int
) -> list[SyntheticExample]:
    """``count`` distinct problems of ``split`` from one family, drawn from a stream seeded by all inputs."""
    rng = random.Random(f"reasoning-llama/synthetic/{seed}/{split}/{family.name}/{difficulty}")
    seen: set[str] = set()
    examples: list[SyntheticExample] = []
    misses = 0
    while len(examples) < count:
        example = family.generate(rng, difficulty)
        if example.user in seen or problem_split(example.user) != split:
            misses += 1
            if misses > _MAX_CONSECUTIVE_MISSES:
                raise ValueError(
                    f"family {family.name!r} at difficulty {difficulty} ran out of distinct {split} problems "
                    f"after {len(examples)} of the {count} requested; ask for fewer examples or raise the "
                    "difficulty"
                )
            continue
        misses = 0
        seen.add(example.user)
        examples.append(example)
    return examples


def generate_examples(
    families: Sequence[str] | None,
    n: int,
    *,
    split: Split,
    seed: int,
    difficulty: int | dict[str, int] | None = None,
) -> list[SyntheticExample]:
    """``n`` distinct problems of ``split``, round-robin over ``families`` (default: :data:`DEFAULT_FAMILIES`).

    Deterministic for the same arguments. Each family draws from its own seeded stream, so a shorter call
    is a prefix of a longer one. Raises ValueError for an unknown family, a bad split or difficulty, or when
    a family cannot produce enough distinct problems of the split.
    """
    if isinstance(families, str):
        raise ValueError(f"families must be a sequence of names, not the string {families!r}")
    names = list(DEFAULT_FAMILIES if families is None else families)
    if not names:
        raise ValueError("families must name at least one synthetic task family")
    if len(set(names)) != len(names):
        raise ValueError(f"families must not repeat a name: {names}")
    for name in names:
        get_family(name)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    levels = _resolve_difficulties(names, difficulty)
    per_family = {
        name: _sample_family(
            FAMILIES[name], n // len(names) + (i < n % len(names)), split, seed, levels[name]
        )
        for i, name in enumerate(names)
    }
    return [per_family[names[i % len(names)]][i // len(names)] for i in range(n)]


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
        return normalize_answer(expected) == normalize_answer(predicted)
    return task.check(expected, predicted)
