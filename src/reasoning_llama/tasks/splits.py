"""Train and test splits of the synthetic tasks, and seeded sampling of distinct problems.

Train and test never share a problem: :func:`problem_split` assigns each problem to a split by a stable
hash of its question text, independent of the seed, and :func:`generate_examples` resamples until it finds
problems of the requested split. A family whose problem space at a difficulty holds fewer distinct problems
of the split than asked for gives all it has, with a warning (a small space is a fact of the task, not an
error: chain_sum at difficulty 4 holds ~5,800 train problems).
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Sequence
from typing import Literal

from reasoning_llama.tasks.families import DEFAULT_FAMILIES, FAMILIES, Family, SyntheticExample, get_family

Split = Literal["train", "test"]

TEST_FRACTION = 0.2
"""Share of every family's problem space that belongs to the test split (fixed so splits never move)."""

_SPLIT_SALT = b"reasoning-llama/synthetic/split/v1"
_MAX_CONSECUTIVE_MISSES = 5000  # draws in a row that find nothing new: the space is (nearly) exhausted

log = logging.getLogger(__name__)


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
    """``count`` distinct problems of ``split`` from one family (fewer if it has no more), drawn from a
    stream seeded by all inputs."""
    rng = random.Random(f"reasoning-llama/synthetic/{seed}/{split}/{family.name}/{difficulty}")
    seen: set[str] = set()
    examples: list[SyntheticExample] = []
    misses = 0
    while len(examples) < count:
        example = family.generate(rng, difficulty)
        if example.user in seen or problem_split(example.user) != split:
            misses += 1
            if misses > _MAX_CONSECUTIVE_MISSES:
                log.warning(
                    "synthetic task %r at difficulty %d holds %d distinct %s problems, fewer than the %d "
                    "asked for: using them all (a higher difficulty holds more)",
                    family.name,
                    difficulty,
                    len(examples),
                    split,
                    count,
                )
                break
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
    """``n`` distinct problems of ``split``, round-robin over ``families`` (default: :data:`DEFAULT_FAMILIES`);
    fewer where a family's problem space holds fewer (see the module docstring).

    Deterministic for the same arguments. Each family draws from its own seeded stream, so a shorter call
    is a prefix of a longer one. Raises ValueError for an unknown family, a bad split or difficulty.
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
    rounds = max((len(examples) for examples in per_family.values()), default=0)
    return [per_family[name][i] for i in range(rounds) for name in names if i < len(per_family[name])]
