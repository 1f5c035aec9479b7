"""Report rows: per mode, the largest batch that fits a budget and the estimate there (what
``densenet-efficient plan`` prints).

>>> [row["mode"] for row in plan("densenet121", "8GiB", modes=("naive", "efficient"))]
['naive', 'efficient']
"""

from __future__ import annotations

from typing import Any

from ...errors import UsageError, check_int, shown
from ..config import ArchConfig
from ..engine import MODES
from .estimate import Step
from .search import largest_batch
from .units import parse_memory

__all__ = ["plan"]


def plan(
    arch: str | ArchConfig,
    memory: int | str,
    *,
    modes: tuple[str, ...] = MODES,
    batch_size: int | None = None,
    image_size: int | None = None,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """Per mode: the largest batch that fits ``memory``, the estimate there (and at ``batch_size``).

    ``modes``: this package's three by default; ``"torchvision"`` and ``"torchvision_efficient"``
    (:data:`~.options.ESTIMABLE` has all five) plan torchvision's own DenseNet for comparison,
    which imports torchvision.
    ``kwargs`` are :func:`~.estimate.estimate_memory`'s besides ``mode``. Each row has ``mode``,
    ``per_image`` (bytes each image adds), ``max_batch_size`` (0 when none fits, with ``note`` and
    ``minimum``), ``at_max`` (the estimate there, as a dict) and ``at_batch`` when asked.
    """
    budget = parse_memory(memory)
    if isinstance(modes, str):  # iterated, it would be planned letter by letter
        raise UsageError(f"modes must be a tuple of modes, e.g. ({modes!r},), found {shown(modes)}")
    if batch_size is not None:
        batch_size = check_int(batch_size, "batch_size")
    rows = []
    for mode in modes:
        step = Step(arch, image_size, {**kwargs, "mode": mode}, "plan")
        one = step.total(1)
        row: dict[str, Any] = {"mode": mode, "per_image": step.total(2) - one}
        try:
            best = largest_batch(step, budget)
        except UsageError as err:
            row.update(max_batch_size=0, note=str(err), minimum=one)
        else:
            row.update(max_batch_size=best, at_max=step.estimate(best).to_dict())
        if batch_size is not None:
            row["at_batch"] = step.estimate(batch_size).to_dict()
        rows.append(row)
    return rows
