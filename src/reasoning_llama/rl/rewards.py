"""Answer checkers: the verifiable half of RL with verifiable rewards.

A synthetic row (one with a `family`) is scored by its family's own checker. Rows of a user's file
(`user` + `assistant`, no reasoning needed) are scored by the checker the config names: `exact`
(normalised text), `numeric` (the last number in the answer, by value), or `package.module:function`
or `path/to/file.py:function`: a function of (expected, predicted) returning a bool or a reward in [0, 1].
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

from reasoning_llama.errors import ConfigError
from reasoning_llama.tasks import FAMILIES, check_answer

Checker = Callable[[dict[str, str], str], float]  # (row, predicted answer) -> reward in [0, 1]

_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


def last_number(text: str) -> float | None:
    """The last number written in `text` (commas between digit groups allowed), or None."""
    found = _NUMBER.findall(text.replace(",", ""))
    return float(found[-1]) if found else None


def numbers_match(expected: str, predicted: str) -> bool:
    """The last numbers of both texts are equal (to 1e-9 relative), e.g. `x = 7.0` matches `7`."""
    a, b = last_number(expected), last_number(predicted)
    return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def _imported(spec: str) -> Callable[[str, str], float | bool]:
    """`package.module:function`, importable from here (the working directory first, as `python -m`
    has it), or `path/to/file.py:function`."""
    source, _, attribute = spec.rpartition(":")
    try:
        if source.endswith(".py"):
            path = Path(source).expanduser()
            if not path.is_file():
                raise ConfigError(f"checker {spec!r}: the file {source} does not exist")
            name = f"reasoning_llama_checker_{path.stem}"
            loader = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(loader)  # type: ignore[arg-type]
            sys.modules[name] = module  # as an import would (dataclasses look their module up there)
            try:
                loader.loader.exec_module(module)  # type: ignore[union-attr]
            except BaseException:
                del sys.modules[name]
                raise
        else:
            if "" not in sys.path and os.getcwd() not in sys.path:  # an installed script lacks it
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(source)
        function = getattr(module, attribute)
    except ConfigError:
        raise
    except Exception as e:  # the user's module failed to load: one line naming why
        raise ConfigError(
            f"checker {spec!r}: cannot import {attribute!r} from {source!r} ({type(e).__name__}: {e}); "
            "give package.module:function importable from the working directory, or path/to/file.py:function"
        ) from None
    if not callable(function):
        raise ConfigError(f"checker {spec!r} is not a function")
    return function


def make_checker(spec: str) -> Checker:
    """The reward of a row's answer: its family's checker for synthetic rows, else the named one."""
    if spec == "exact":
        other: Callable[[str, str], float | bool] = lambda expected, predicted: check_answer(  # noqa: E731
            None, expected, predicted
        )
    elif spec == "numeric":
        other = numbers_match
    elif ":" in spec:
        other = _imported(spec)
    else:
        raise ConfigError(
            f"unknown checker {spec!r}; use exact, numeric, package.module:function or file.py:function"
        )

    def reward(row: dict[str, str], predicted: str) -> float:
        family = row.get("family")
        if family in FAMILIES:
            return float(check_answer(family, row["assistant"], predicted))
        try:
            returned = other(row["assistant"], predicted)
        except Exception as e:  # the user's code: its failure is a one-line error naming it
            raise ConfigError(f"checker {spec!r} raised {type(e).__name__}: {e}") from None
        if not isinstance(returned, numbers.Real):  # bools, ints, floats, numpy's scalars
            raise ConfigError(f"checker {spec!r} returned {returned!r}; a reward is a number in [0, 1]")
        value = float(returned)
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"checker {spec!r} returned {value}; a reward must lie in [0, 1]")
        return value

    return reward
