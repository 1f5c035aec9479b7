"""The one search every planner question reduces to: where a monotone yes/no answer changes.

Memory grows with the batch, the depth and the number of layers that keep their bottleneck, and
falls as the recompute threshold rises; so "the largest batch that fits", "the deepest model",
"the most layers that can keep" and "the least threshold" are all a boundary of a monotone
predicate, found in ``O(log n)`` evaluations whatever the number.

>>> first_true(lambda i: i * i >= 50, 0, 100), last_true(lambda n: 3 * n <= 100, 1)
(8, 33)
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["first_true", "last_true"]


def first_true(pred: Callable[[int], bool], lo: int, hi: int) -> int:
    """The least ``i`` in ``[lo, hi)`` with ``pred(i)``, or ``hi`` when there is none.

    ``pred`` must be monotone (False ... False True ... True); it is never called at ``hi``."""
    while lo < hi:
        mid = (lo + hi) // 2
        if pred(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def last_true(pred: Callable[[int], bool], lo: int, hi: int | None = None) -> int:
    """The greatest ``i`` in ``[lo, hi]`` with ``pred(i)``, for ``pred(lo)`` true (not called).

    ``pred`` must be monotone (True ... True False ... False). Without ``hi`` the range is found by
    doubling first, so ``pred`` must turn False eventually (memory outgrows any budget)."""
    if hi is None:
        hi = max(2 * lo, lo + 1)
        while pred(hi):
            lo, hi = hi, 2 * hi
        hi -= 1  # pred(hi + 1) is False
    return first_true(lambda i: not pred(i + 1), lo, hi)
