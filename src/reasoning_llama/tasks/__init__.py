"""The built-in verifiable reasoning tasks: seeded generators of ``{user, reasoning, assistant}`` rows,
their train/test splits and the answer checkers that evaluation and training use.

`generators.py` writes the problems, `families.py` registers each generator with its checker,
`splits.py` keeps train and test apart and samples distinct problems, `answers.py` normalises answers.
Import from here.
"""

from reasoning_llama.tasks.answers import normalize_answer
from reasoning_llama.tasks.families import (
    DEFAULT_FAMILIES,
    FAMILIES,
    Family,
    SyntheticExample,
    check_answer,
    families_or_default,
    get_family,
)
from reasoning_llama.tasks.splits import TEST_FRACTION, Split, generate_examples, problem_split

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
    "get_family",
    "normalize_answer",
    "problem_split",
]
