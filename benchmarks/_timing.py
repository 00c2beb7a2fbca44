"""Timing helper shared by the benchmarks."""

from __future__ import annotations

import time
from collections.abc import Callable


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Return the fastest of ``repeats`` timed calls of ``fn``, after one untimed warm-up call.

    The warm-up absorbs first-touch page faults and lazy initialisation.
    """
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best
