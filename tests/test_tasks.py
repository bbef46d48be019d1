"""Tests for the built-in synthetic reasoning tasks."""

from __future__ import annotations

import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reasoning_llama.tasks import (
    DEFAULT_FAMILIES,
    FAMILIES,
    TEST_FRACTION,
    Family,
    SyntheticExample,
    check_answer,
    families_or_default,
    generate_examples,
    normalize_answer,
    problem_split,
)

ALL_FAMILIES = sorted(FAMILIES)
SPECIAL_STRINGS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")


def _difficulties(family: Family) -> list[int]:
    """A few levels around the family's default, all valid."""
    return sorted({family.min_difficulty, family.default_difficulty, family.default_difficulty + 1})


def _samples(name: str, difficulty: int, count: int = 60, seed: int = 0) -> list[SyntheticExample]:
    rng = random.Random(seed)
    return [FAMILIES[name].generate(rng, difficulty) for _ in range(count)]


def _wrong_answer(answer: str) -> str:
    """A different answer of the same shape."""
    if re.fullmatch(r"-?\d+", answer):
        return str(int(answer) + 1)
    digits = answer.split()
    return " ".join([*digits[:-1], str((int(digits[-1]) + 1) % 10)]) if digits else "1"


# --------------------------------------------------------------------------- registry


def test_registry_has_at_least_six_families_and_three_easy_defaults() -> None:
    assert len(FAMILIES) >= 6
    assert len(DEFAULT_FAMILIES) >= 3
    for name in DEFAULT_FAMILIES:
        assert FAMILIES[name].easy
    for name, family in FAMILIES.items():
        assert family.name == name
        assert family.description
        assert family.default_difficulty >= family.min_difficulty


def test_as_row_has_the_dataset_columns() -> None:
    example = generate_examples(["chain_sum"], 1, split="train", seed=0)[0]
    assert example.as_row() == {
        "user": example.user,
        "reasoning": example.reasoning,
        "assistant": example.assistant,
        "family": "chain_sum",
    }


# --------------------------------------------------------------------------- answers and reasoning


@pytest.mark.parametrize("name", ALL_FAMILIES)
def test_generated_answers_pass_their_checker_and_wrong_ones_fail(name: str) -> None:
    for difficulty in _difficulties(FAMILIES[name]):
        for example in _samples(name, difficulty):
            assert example.family == name
            assert check_answer(name, example, example.assistant)
            assert check_answer(name, example.assistant, f"  {example.assistant.upper()}. ")
            assert not check_answer(name, example, _wrong_answer(example.assistant))
            assert not check_answer(name, example, "")


@pytest.mark.parametrize("name", ALL_FAMILIES)
def test_text_is_well_formed(name: str) -> None:
    for difficulty in _difficulties(FAMILIES[name]):
        for example in _samples(name, difficulty):
            assert example.user.endswith(("?", ".")) and example.user[0].isupper()
            assert example.reasoning and example.assistant
            assert example.assistant == example.assistant.strip() and "\n" not in example.assistant
            lines = example.reasoning.split("\n")
            assert all(line and line == line.strip() for line in lines)
            for text in (example.user, example.reasoning, example.assistant):
                assert not any(special in text for special in SPECIAL_STRINGS)


@pytest.mark.parametrize("name", ALL_FAMILIES)
def test_reasoning_arrives_at_the_answer(name: str) -> None:
    for difficulty in _difficulties(FAMILIES[name]):
        for example in _samples(name, difficulty):
            last = example.reasoning.split("\n")[-1]
            if name in {"add", "subtract", "multiply"}:
                assert last.replace(" ", "") == example.assistant
            elif name == "sort_digits":
                assert last == example.assistant
            else:
                assert last.split()[-1] == example.assistant or last.startswith(f"{example.assistant} ")


def test_chain_sum_steps_are_a_running_total() -> None:
    for example in _samples("chain_sum", 6):
        terms = [int(t) for t in re.findall(r"\d+", example.user)]
        assert all(1 <= t <= 9 for t in terms)
        total = terms[0]
        for term, line in zip(terms[1:], example.reasoning.split("\n"), strict=True):
            assert line == f"{total} + {term} = {total + term}"
            total += term
        assert example.assistant == str(sum(terms))


def test_sort_digits_moves_the_smallest_digit_each_line() -> None:
    for example in _samples("sort_digits", 6):
        digits = sorted(int(d) for d in re.findall(r"\d", example.user))
        assert example.assistant == " ".join(map(str, digits))
        lines = example.reasoning.split("\n")
        assert len(lines) == len(digits)
        for i, line in enumerate(lines[:-1]):
            done, rest = line.split(" | ")
            assert done.split() == [str(d) for d in digits[: i + 1]]
            assert sorted(rest.split()) == [str(d) for d in digits[i + 1 :]]


def test_max_digit_keeps_a_running_maximum() -> None:
    for example in _samples("max_digit", 6):
        digits = [int(d) for d in re.findall(r"\d", example.user)]
        assert example.assistant == str(max(digits))
        largest = digits[0]
        for digit, line in zip(digits[1:], example.reasoning.split("\n"), strict=True):
            assert line == f"{largest} vs {digit}: {max(largest, digit)}"
            largest = max(largest, digit)


def test_count_letter_spells_the_word_with_a_running_count() -> None:
    for example in _samples("count_letter", 7, count=200):
        letter, word = re.fullmatch(
            r'How many times does the letter "(\w)" appear in (\w+)\?', example.user
        ).groups()
        lines = example.reasoning.split("\n")
        assert "".join(line.split()[0] for line in lines) == word
        assert [int(line.split()[1]) for line in lines] == [
            word[: i + 1].count(letter) for i in range(len(word))
        ]
        assert example.assistant == str(word.count(letter))


def _spaced(number: int, width: int = 0) -> str:
    return " ".join(str(number).zfill(width))


def _padded(a: int, b: int, operator: str) -> str:
    width = max(len(str(a)), len(str(b)))
    return f"{_spaced(a, width)} {operator} {_spaced(b, width)}"


@pytest.mark.parametrize(
    ("name", "pattern", "operation", "header"),
    [
        ("add", r"What is (\d+) \+ (\d+)\?", lambda a, b: a + b, lambda a, b: _padded(a, b, "+")),
        ("subtract", r"What is (\d+) - (\d+)\?", lambda a, b: a - b, lambda a, b: _padded(a, b, "-")),
        (
            "multiply",
            r"What is (\d+) \* (\d+)\?",
            lambda a, b: a * b,
            lambda a, b: f"{_spaced(a)} * {_spaced(b)}",
        ),
        (
            "compare",
            r"Which number is larger, (\d+) or (\d+)\?",
            max,
            lambda a, b: f"{_spaced(a)} vs {_spaced(b)}",
        ),
    ],
)
def test_arithmetic_answers_are_correct(name: str, pattern: str, operation, header) -> None:
    for difficulty in range(1, 7):
        for example in _samples(name, difficulty, count=40):
            a, b = (int(v) for v in re.fullmatch(pattern, example.user).groups())
            assert int(example.assistant) == operation(a, b) >= 0
            assert example.reasoning.split("\n")[0] == header(a, b)


def test_digit_reasoning_uses_single_digits() -> None:
    """The column lines of the multi-digit families write digits (and carries) one token at a time."""
    for name in ("add", "subtract", "multiply"):
        for example in _samples(name, 4):
            header = example.reasoning.split("\n")[0]
            assert all(len(token) == 1 for token in header.split())
            for line in example.reasoning.split("\n")[1:]:
                for match in re.finditer(r"(write|carry|borrow) (\d+)", line):
                    assert match.group(1) == "carry" or len(match.group(2)) == 1


def test_linear_equation_solution_satisfies_the_equation() -> None:
    for difficulty in range(1, 6):
        for example in _samples("linear_equation", difficulty, count=40):
            a, sign, b, c = re.fullmatch(
                r"Solve for x: (\d+)x ([+-]) (\d+) = (-?\d+)\.", example.user
            ).groups()
            b_value = int(b) if sign == "+" else -int(b)
            assert int(a) * int(example.assistant) + b_value == int(c)
            assert example.reasoning.split("\n")[-1] == f"x = {example.assistant}"


@pytest.mark.parametrize("name", ALL_FAMILIES)
def test_difficulty_changes_problem_size(name: str) -> None:
    family = FAMILIES[name]
    low, high = family.min_difficulty, family.default_difficulty + 2

    def mean_length(difficulty: int) -> float:
        examples = _samples(name, difficulty, count=200)
        return sum(len(e.user) + len(e.reasoning) for e in examples) / len(examples)

    assert mean_length(low) < mean_length(high)


@pytest.mark.parametrize("name", ALL_FAMILIES)
def test_invalid_difficulty_is_a_clear_error(name: str) -> None:
    family = FAMILIES[name]
    with pytest.raises(ValueError, match=name):
        family.generate(random.Random(0), family.min_difficulty - 1)
    with pytest.raises(ValueError, match="difficulty"):
        generate_examples([name], 0, split="train", seed=0, difficulty=family.min_difficulty - 1)
    with pytest.raises(ValueError, match="difficulty"):
        generate_examples([name], 1, split="train", seed=0, difficulty={name: family.min_difficulty - 1})


# --------------------------------------------------------------------------- checking


def test_normalize_answer() -> None:
    assert normalize_answer("  The   Answer\tIS 7.  ") == "the answer is 7"
    assert normalize_answer("16") == "16"
    assert normalize_answer("") == ""


def test_check_answer_tolerances_are_principled() -> None:
    assert check_answer("chain_sum", "7", "07")
    assert check_answer("chain_sum", "16", "16.")
    assert not check_answer("chain_sum", "16", "61")
    assert not check_answer("chain_sum", "16", "16 apples")
    assert check_answer("linear_equation", "-3", "x = -3")
    assert check_answer("sort_digits", "1 2 5 8", "1, 2, 5, 8")
    assert check_answer("sort_digits", "1 2 5 8", "1258")
    assert not check_answer("sort_digits", "1 2 5 8", "1 2 8 5")
    assert not check_answer("sort_digits", "1 2 5 8", "1 2 5")
    assert check_answer(None, "Paris.", "  paris")  # no family: normalised text
    assert not check_answer(None, "7", "07")


def test_check_answer_rejects_unknown_family_and_mismatched_example() -> None:
    example = generate_examples(["chain_sum"], 1, split="train", seed=0)[0]
    with pytest.raises(ValueError, match="unknown synthetic task family 'nope'"):
        check_answer("nope", "1", "1")
    with pytest.raises(ValueError, match="chain_sum"):
        check_answer("sort_digits", example, example.assistant)


# --------------------------------------------------------------------------- generate_examples


def test_train_and_test_never_share_a_problem() -> None:
    families = ["chain_sum", "sort_digits", "add", "multiply"]
    levels = {"multiply": 3}  # the default 2x1-digit products have only 144 test problems
    train = generate_examples(families, 2000, split="train", seed=0, difficulty=levels)
    test = generate_examples(families, 2000, split="test", seed=0, difficulty=levels)
    train_users = {e.user for e in train}
    test_users = {e.user for e in test}
    assert len(train_users) == len(test_users) == 2000
    assert not train_users & test_users
    assert all(problem_split(user) == "train" for user in train_users)
    assert all(problem_split(user) == "test" for user in test_users)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(min_value=0, max_value=2**63))
def test_split_is_independent_of_the_seed(seed: int) -> None:
    for split in ("train", "test"):
        for example in generate_examples(ALL_FAMILIES, 16, split=split, seed=seed):
            assert problem_split(example.user) == split


def test_split_is_a_stable_hash_with_the_intended_share() -> None:
    users = [f"Compute {i} + {j}." for i in range(100) for j in range(100)]
    share = sum(problem_split(user) == "test" for user in users) / len(users)
    assert abs(share - TEST_FRACTION) < 0.02
    assert [problem_split(u) for u in users[:50]] == [problem_split(u) for u in users[:50]]


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(min_value=-(2**31), max_value=2**31), n=st.integers(min_value=0, max_value=40))
def test_generation_is_deterministic_per_seed(seed: int, n: int) -> None:
    first = generate_examples(ALL_FAMILIES, n, split="train", seed=seed)
    assert first == generate_examples(ALL_FAMILIES, n, split="train", seed=seed)
    assert len(first) == n
    assert len({e.user for e in first}) == n


def test_different_seeds_give_different_data() -> None:
    a = generate_examples(None, 300, split="train", seed=1)
    b = generate_examples(None, 300, split="train", seed=2)
    assert [e.user for e in a] != [e.user for e in b]
    assert len({e.user for e in a} & {e.user for e in b}) < 150


def test_round_robin_mix_and_prefix_stability() -> None:
    names = ["sort_digits", "add", "compare"]
    examples = generate_examples(names, 10, split="test", seed=3)
    assert [e.family for e in examples] == [names[i % 3] for i in range(10)]
    assert generate_examples(names, 25, split="test", seed=3)[:10] == examples


def test_default_families_and_difficulty_mapping() -> None:
    examples = generate_examples(None, 30, split="train", seed=0)
    assert {e.family for e in examples} == set(DEFAULT_FAMILIES)
    hard = generate_examples(["add", "chain_sum"], 40, split="train", seed=0, difficulty={"add": 6})
    add_sizes = [max(len(n) for n in re.findall(r"\d+", e.user)) for e in hard if e.family == "add"]
    chain_sizes = [e.user.count("+") + 1 for e in hard if e.family == "chain_sum"]
    assert max(add_sizes) > 3
    assert max(chain_sizes) <= FAMILIES["chain_sum"].default_difficulty


def test_bad_arguments_are_clear_errors() -> None:
    with pytest.raises(
        ValueError, match=r"unknown synthetic task family 'nope'.*known families: .*chain_sum"
    ):
        generate_examples(["chain_sum", "nope"], 4, split="train", seed=0)
    with pytest.raises(ValueError, match="unknown synthetic task family"):
        generate_examples(["chain_sum"], 4, split="train", seed=0, difficulty={"nope": 2})
    with pytest.raises(ValueError, match="split"):
        generate_examples(None, 4, split="validation", seed=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-negative"):
        generate_examples(None, -1, split="train", seed=0)
    with pytest.raises(ValueError, match="sequence of names"):
        generate_examples("chain_sum", 4, split="train", seed=0)
    with pytest.raises(ValueError, match="repeat"):
        generate_examples(["add", "add"], 4, split="train", seed=0)


def test_small_problem_spaces_give_all_they_hold_and_say_so(caplog) -> None:
    # chain_sum at difficulty 2 has 81 problems in total, so 81 test problems cannot exist; max_digit
    # at its default difficulty holds thousands.
    levels = {"chain_sum": 2}
    with caplog.at_level("WARNING", logger="reasoning_llama.tasks.splits"):
        every = generate_examples(["chain_sum", "max_digit"], 2 * 81, split="test", seed=0, difficulty=levels)
    chain = [e for e in every if e.family == "chain_sum"]
    assert 0 < len(chain) < 81 and len({e.user for e in chain}) == len(chain)
    assert all(problem_split(e.user) == "test" for e in chain)
    assert "'chain_sum' at difficulty 2 holds" in caplog.text and "fewer than the 81 asked for" in caplog.text
    assert len([e for e in every if e.family == "max_digit"]) == 81  # the other family is not cut short
    # round-robin while both last, then the longer one alone; a shorter call is still a prefix
    assert [e.family for e in every[:4]] == ["chain_sum", "max_digit"] * 2
    assert (
        generate_examples(["chain_sum", "max_digit"], 6, split="test", seed=0, difficulty=levels) == every[:6]
    )
    small = generate_examples(["chain_sum"], 5, split="test", seed=0, difficulty=2)
    assert len({e.user for e in small}) == 5


def test_no_named_families_means_the_defaults():
    assert families_or_default([]) == list(DEFAULT_FAMILIES)
    assert families_or_default(("max_digit", "add")) == ["max_digit", "add"]
