"""The generators of the synthetic task families: ``(rng, difficulty) -> (user, reasoning, answer)``.

Every family writes its reasoning as short, extremely regular lines in which each step moves single-digit
(or single-letter) tokens, because GPT-2 BPE hides digits inside multi-digit tokens (``457`` is one token).
"""

from __future__ import annotations

import random
from collections.abc import Sequence


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


def make_chain_sum(rng: random.Random, difficulty: int) -> tuple[str, str, str]:
    """Running total of 2..difficulty single digits (1-9), one line per addition."""
    terms = [rng.randint(1, 9) for _ in range(_problem_length(rng, 2, difficulty, 9))]
    lines = []
    total = terms[0]
    for term in terms[1:]:
        lines.append(f"{total} + {term} = {total + term}")
        total += term
    user = f"Compute {' + '.join(str(t) for t in terms)}."
    return user, "\n".join(lines), str(total)


def make_sort_digits(rng: random.Random, difficulty: int) -> tuple[str, str, str]:
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


def make_max_digit(rng: random.Random, difficulty: int) -> tuple[str, str, str]:
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


def make_count_letter(rng: random.Random, difficulty: int) -> tuple[str, str, str]:
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


def make_compare(rng: random.Random, difficulty: int) -> tuple[str, str, str]:
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


def make_add(rng: random.Random, difficulty: int) -> tuple[str, str, str]:
    """Addition of numbers with at most ``difficulty`` digits, one line per column with its carry."""
    a, b = rng.randrange(10**difficulty), rng.randrange(10**difficulty)
    lines = _column_addition([a, b])
    return f"What is {a} + {b}?", "\n".join(lines), str(a + b)


def make_subtract(rng: random.Random, difficulty: int) -> tuple[str, str, str]:
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


def make_multiply(rng: random.Random, difficulty: int) -> tuple[str, str, str]:
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


def make_linear_equation(rng: random.Random, difficulty: int) -> tuple[str, str, str]:
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
