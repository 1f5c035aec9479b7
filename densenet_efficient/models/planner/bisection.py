"""The one search every planner question reduces to: where a monotone yes/no answer changes.

Memory grows with the batch, the depth and the number of layers that keep their bottleneck, and
falls as the recompute threshold rises; so "the largest batch that fits", "the deepest model",
"the most layers that can keep" and "the least threshold" are all a boundary of a monotone
predicate, found in ``O(log n)`` evaluations whatever the number.

>>> first_true(lambda i: i * i >= 50, 0, 100), last_true(lambda n: 3 * n <= 100, 1)
(8, 33)
>>> last_within(lambda n: 3 * n * n + 7 * n, 10**6, 1)
576
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["first_true", "last_true", "last_within"]


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


def last_within(cost: Callable[[int], float], budget: float, lo: int, hi: int | None = None) -> int:
    """The greatest ``n`` in ``[lo, hi]`` with ``cost(n) <= budget``, for a cost that grows with
    ``n`` and ``cost(lo) <= budget``; ``hi`` when even it fits.

    :func:`last_true` on ``cost(n) <= budget``, for a cost that is dear to evaluate and grows
    smoothly (a training step's bytes against the depth): each guess is where the parabola through
    the three deepest costs evaluated meets the budget (the secant with two), kept inside what is
    known (below: fits; above: does not). The answer is what was evaluated, never the parabola: a
    guess only chooses where to look. A guess that leaves the unknown range more than half as wide
    is followed by a bisection, and a range with no upper end grows by at most 4x per guess, so it
    takes a few more evaluations than bisection at worst and a handful when the cost is smooth.
    """
    seen: dict[int, float] = {lo: cost(lo)}
    below, above = lo, None  # cost(below) <= budget; cost(above) > budget (None: not found yet)
    while above is None or above - below > 1:
        width = None if above is None else above - below
        guess = _parabola_root(seen, budget)
        top = (hi if hi is not None else 4 * below + 4) if above is None else above - 1
        if above is None:
            top = min(top, 4 * below + 4)
        n = below + 1 if guess is None else min(max(int(guess), below + 1), top)
        if n in seen:  # the parabola points at a depth already known: close in by one
            n = below + 1 if below + 1 not in seen else (below + top + 1) // 2
        if hi is not None and n > hi:
            n = hi
        seen[n] = cost(n)
        if seen[n] <= budget:
            below = n
            if hi is not None and n >= hi:
                return hi
        else:
            above = n
        if width is not None and above - below > width // 2 and above - below > 1:
            mid = (below + above) // 2  # the guess did not halve the range: bisect once
            if mid not in seen:
                seen[mid] = cost(mid)
                if seen[mid] <= budget:
                    below = mid
                else:
                    above = mid
    return below


def _parabola_root(seen: dict[int, float], budget: float) -> float | None:
    """Where the parabola (two points: the line) through the deepest costs in ``seen`` reaches
    ``budget`` beyond the deepest of them that fits; None when it never does."""
    pts = sorted(seen.items())[-3:]
    if len(pts) < 2:
        return None
    if len(pts) == 2:
        (x0, y0), (x1, y1) = pts
        slope = (y1 - y0) / (x1 - x0)
        return None if slope <= 0 else x1 + (budget - y1) / slope
    (x0, y0), (x1, y1), (x2, y2) = pts
    d01, d12 = (y1 - y0) / (x1 - x0), (y2 - y1) / (x2 - x1)
    a = (d12 - d01) / (x2 - x0)
    b = d12 - a * (x1 + x2)  # y = a x^2 + b x + c through the three points
    c = y2 - a * x2 * x2 - b * x2
    if abs(a) < 1e-12:
        return None if b <= 0 else (budget - c) / b
    disc = b * b - 4 * a * (c - budget)
    if disc < 0:
        return None
    roots = [(-b + sign * disc**0.5) / (2 * a) for sign in (1, -1)]
    ahead = [r for r in roots if r >= x0 - 1e-9 and 2 * a * r + b > 0]  # the rising branch
    return min(ahead) if ahead else None
