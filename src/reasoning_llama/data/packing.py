"""Best-fit packing of whole examples into fixed-capacity rows."""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Sequence

import numpy as np


def best_fit_pack(sizes: Sequence[int] | np.ndarray, capacity: int, seed: int) -> list[list[int]]:
    """Group item indices into rows of at most `capacity` by best-fit decreasing.

    Largest items go first, each into the open row it fills most tightly; ties in size are
    ordered by a shuffle seeded with `seed`, so the grouping is deterministic per seed.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    if len(sizes) == 0:
        return []
    if sizes.min() <= 0 or sizes.max() > capacity:
        raise ValueError(f"item sizes must lie in 1..{capacity}, got {sizes.min()}..{sizes.max()}")
    shuffled = np.random.default_rng(seed).permutation(len(sizes))
    order = shuffled[np.argsort(-sizes[shuffled], kind="stable")]
    smallest = int(sizes.min())
    rows: list[list[int]] = []
    open_rows: list[tuple[int, int]] = []  # (free space, row index), sorted
    for item in order.tolist():
        size = int(sizes[item])
        slot = bisect_left(open_rows, (size, -1))
        if slot == len(open_rows):
            rows.append([item])
            row, free = len(rows) - 1, capacity - size
        else:
            free, row = open_rows.pop(slot)
            rows[row].append(item)
            free -= size
        if free >= smallest:  # rows that can take nothing more leave the search
            insort(open_rows, (free, row))
    return rows
