"""Batch throughput: the largest batch that fits (double until OOM, then bisect) and its decode rate."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class BatchSearch:
    """Outcome of a largest-fitting-batch search."""

    largest: int
    trials: list[tuple[int, bool]] = field(default_factory=list)
    capped: bool = False  # the time cap (or max batch) stopped the search before it settled
    seconds: float = 0.0


def largest_batch(
    fits: Callable[[int], bool],
    *,
    cap_s: float,
    max_batch: int = 1024,
    clock: Callable[[], float] = time.perf_counter,
) -> BatchSearch:
    """The largest batch ``b`` with ``fits(b)``: doubles from 1 until a failure, then bisects.

    ``fits`` must catch the out-of-memory error itself and free what it allocated. The search
    stops (``capped``) once ``cap_s`` seconds have passed or ``max_batch`` is reached.
    """
    start = clock()
    result = BatchSearch(largest=0)

    def timed_out() -> bool:
        return clock() - start >= cap_s

    low, high = 0, None  # low fits (0: nothing known), high fails
    batch = 1
    while high is None:
        if batch > max_batch:
            result.capped = True
            break
        ok = fits(batch)
        result.trials.append((batch, ok))
        if ok:
            low = batch
            batch *= 2
        else:
            high = batch
        if high is None and timed_out():
            result.capped = True
            break
    while high is not None and high - low > 1:
        if timed_out():
            result.capped = True
            break
        mid = (low + high) // 2
        ok = fits(mid)
        result.trials.append((mid, ok))
        if ok:
            low = mid
        else:
            high = mid
    result.largest = low
    result.seconds = clock() - start
    return result


def search_row(search: BatchSearch) -> dict[str, Any]:
    """The JSON fields of a search."""
    return {
        "max_batch": search.largest,
        "search_capped": search.capped,
        "search_s": search.seconds,
        "trials": [{"batch": b, "fits": ok} for b, ok in search.trials],
    }
