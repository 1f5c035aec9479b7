"""The searches over the estimate: the largest batch that fits, the plan with the least recompute
that fits, the deepest DenseNet-BC that fits. Each is a bisection (:mod:`.bisection`) over a
monotone "fits". A batch costs no simulation (one simulated step answers every batch size); plans
are priced by composing two simulated steps (:mod:`.compose`) and the one chosen is simulated whole.

>>> max_batch_size("densenet121", "8GiB", image_size=224, mode="efficient") > 64
True
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ...errors import UsageError, check_int
from ..config import ArchConfig, densenet_bc_config
from ..engine import EFFICIENT, MAX_SAVING
from ..memory_plan import MemoryPlan, resolve_memory_plan
from ..parameters import block_inputs
from .bisection import first_true, last_true, last_within
from .compose import Composer
from .estimate import MAX_SIMULATED_LAYERS, MemoryEstimate, Step
from .recompute import extra_time
from .units import format_bytes, parse_memory

__all__ = [
    "MemoryBudgetError",
    "deepest_densenet_bc",
    "fit_memory",
    "largest_batch",
    "max_batch_size",
]


class MemoryBudgetError(UsageError):
    """A budget below the ``"max_saving"`` floor: says the smallest budget that fits this batch and
    the largest batch that fits this budget (``floor`` and ``max_batch_size``, 0 when none)."""

    def __init__(self, message: str, *, floor: int, max_batch_size: int) -> None:
        super().__init__(message)
        self.floor = floor
        self.max_batch_size = max_batch_size


def max_batch_size(
    arch: str | ArchConfig, memory: int | str, *, image_size: int | None = None, **kwargs: Any
) -> int:
    """The largest batch whose training step fits ``memory`` (bytes or ``"8GiB"``).

    ``kwargs`` are :func:`~.estimate.estimate_memory`'s (``mode``, ``dtype``, ``amp``, ``device``,
    ``optimizer``, ``sync_bn_world_size``: the per-process batch of a synchronised job). Raises a UsageError, naming the minimum needed, when not even one image fits.
    Bisection: ``O(log batch)`` estimates (a 16 EiB budget takes about a hundred).

    >>> max_batch_size("densenet_bc_100", "12GB", mode="efficient") > 1000
    True
    """
    budget = parse_memory(memory)
    step = Step(arch, image_size, kwargs, "max_batch_size")
    return largest_batch(step, budget)


def largest_batch(step: Step, budget: int, setting: str | MemoryPlan | None = None) -> int:
    one = step.estimate(1, setting)
    if one.total > budget:
        raise UsageError(
            f"{format_bytes(budget)} fits no batch of {one.arch} in {one.mode} mode at "
            f"{one.image_size}x{one.image_size}: one image needs at least {format_bytes(one.total)}"
        )
    return last_true(lambda n: step.total(n, setting) <= budget, 1)


def _keeps_below(config: ArchConfig, width: int) -> tuple[int, ...]:
    """Per block, how many last layers keep their bottleneck when every layer reading fewer than
    ``width`` channels recomputes it.

    Recomputing layer ``l``'s bottleneck costs ``c_l * B`` multiply-adds per pixel and saves ``B``
    values per pixel, in every block alike: the narrowest layers save memory most cheaply, so the
    cheapest plan for a budget is such a threshold (each block keeps its last layers).
    """
    keeps = []
    for c, layers in zip(block_inputs(config), config.block_config, strict=True):
        dropped = min(max(-(-(width - c) // config.growth_rate), 0), layers)  # layers with c + i k < width
        keeps.append(layers - dropped)
    return tuple(keeps)


def _plan(keeps: tuple[int, ...], config: ArchConfig, stem: str) -> MemoryPlan:
    """Counts of kept last layers as a :class:`MemoryPlan`."""
    return MemoryPlan(resolve_memory_plan(list(keeps), config).blocks, stem)


def _search(step: Step, composer: Composer, budget: int, batch: int) -> tuple[tuple[int, ...], str] | None:
    """The kept-layer counts and stem with the least recompute whose composed peak fits ``budget``
    (bytes of peak, the device's overhead taken off), or None when not even max_saving fits."""
    config = step.config
    widest = config.num_init_features + sum(config.block_config) * config.growth_rate + 1
    stems = (EFFICIENT,) if config.small_inputs else (EFFICIENT, MAX_SAVING)
    best: tuple[float, tuple[int, ...], str] | None = None
    for stem in stems:

        def fits(keeps: tuple[int, ...], stem: str = stem) -> bool:
            return composer.peak(keeps, stem == MAX_SAVING, batch) <= budget

        if not fits(_keeps_below(config, widest)):
            continue  # not even with every bottleneck recomputed
        least = first_true(lambda w: fits(_keeps_below(config, w)), 0, widest)
        keeps = list(_keeps_below(config, least))
        # Give layers back their bottleneck where the budget still allows it: the peak is reached
        # at one moment, and bytes saved in a block whose bottlenecks are not alive then buy
        # nothing. Block by block, the most expensive recomputation first.
        starts, changed = block_inputs(config), True
        while changed:
            changed = False
            order = sorted(
                (b for b, n in enumerate(config.block_config) if keeps[b] < n),
                key=lambda b: -(starts[b] + (config.block_config[b] - keeps[b] - 1) * config.growth_rate),
            )
            for b in order:
                most = last_true(
                    lambda n, b=b, k=tuple(keeps): fits((*k[:b], n, *k[b + 1 :])),
                    keeps[b],
                    config.block_config[b],
                )
                if most > keeps[b]:
                    keeps[b], changed = most, True
        cost = extra_time(config, _plan(tuple(keeps), config, stem), step.image_size)
        if best is None or cost < best[0]:
            best = (cost, tuple(keeps), stem)
    return None if best is None else best[1:]


#: How often fit_memory plans again when the whole simulation of its plan exceeds the budget.
MAX_ROUNDS = 4
#: The share of a budget fit_memory plans for: on the measured grid of docs/planner.md an
#: estimate reads up to 2.2% below its step (DenseNet-BC-250 keeping its bottlenecks at batch 4
#: on two threads), so a plan estimated at 97% of the budget measures within it.
FIT_SHARE = 0.97


def fit_memory(
    arch: str | ArchConfig,
    budget: int | str,
    *,
    batch_size: int,
    image_size: int | None = None,
    **kwargs: Any,
) -> MemoryPlan:
    """The plan with the least recompute whose training step (``MemoryEstimate.total``) fits ``budget``.

    ``kwargs`` are :func:`~.estimate.estimate_memory`'s (``amp``, ``dtype``, ``device``,
    ``optimizer``, default ``"momentum"``, ``channels_last``, ``sync_bn_world_size``: every batch
    norm synchronised over that many processes, each running ``batch_size`` images). The search runs over the width below which layers recompute their
    bottleneck, then gives blocks back what still fits, with the stem keeping or recomputing its
    indices (when the ``"efficient"`` setting, which recomputes nothing, fits, it is the answer, from
    one simulation); plans are priced by composing the simulated ``"efficient"`` and ``"max_saving"``
    steps (:mod:`.compose`) and the one returned is simulated whole: its ``estimated_peak`` is
    that simulation's ``total``. Raises :class:`MemoryBudgetError` below the ``"max_saving"`` floor.

    >>> plan = fit_memory("densenet_bc_40", "400MiB", batch_size=64, device="cpu")
    >>> plan.estimated_peak <= parse_memory("400MiB")
    True
    >>> synced = fit_memory("densenet_bc_40", "400MiB", batch_size=64, device="cpu", sync_bn_world_size=2)
    >>> synced.estimated_peak <= parse_memory("400MiB")
    True
    """
    if "mode" in kwargs:
        raise TypeError("fit_memory() picks the memory setting itself: it takes no mode=")
    budget = parse_memory(budget)
    batch_size = check_int(batch_size, "batch_size")
    step = Step(arch, image_size, kwargs, "fit_memory")
    config = step.config
    target = int(budget * FIT_SHARE)
    # Every block keeping every bottleneck recomputes nothing: when it fits, the search could
    # only find it, and the max_saving step need not be simulated.
    keep_all = _plan(config.block_config, config, EFFICIENT)
    est = step.estimate(batch_size, keep_all)
    if est.total <= target or (step.frozen and est.total <= budget):
        # frozen features: every setting makes the same step, "efficient" is the floor too
        return _fitted(keep_all, est, budget)
    # Frozen features keep nothing for backward, so no plan between "efficient" and "max_saving"
    # saves what backward keeps (and their simulations have no segments to compose): the floor below.
    rounds = 0 if step.frozen else MAX_ROUNDS
    if rounds:
        composer = Composer(
            step.simulation(step.uniform(EFFICIENT), batch_size),
            step.simulation(step.uniform(MAX_SAVING), batch_size),
            config.block_config,
        )
        overhead = step.beyond_peak(batch_size)
    for _ in range(rounds):
        found = _search(step, composer, target - overhead, batch_size)
        if found is None:
            break
        plan = _plan(found[0], config, found[1])
        est = step.estimate(batch_size, plan)
        if est.total <= int(budget * FIT_SHARE):
            return _fitted(plan, est, budget)
        target -= est.total - int(budget * FIT_SHARE)  # the composition was short: plan for less
    floor = step.uniform(MAX_SAVING)
    est = step.estimate(batch_size, floor)
    if est.total <= budget:  # the least a step can hold fits, only without the share kept back
        return _fitted(floor, est, budget)
    raise _below_floor(step, budget, batch_size)


def _fitted(plan: MemoryPlan, est: MemoryEstimate, budget: int) -> MemoryPlan:
    return replace(
        plan, estimated_peak=est.total, estimated_extra_time=est.extra_time, budget=budget,
        batch_size=est.batch_size, image_size=est.image_size,
    )  # fmt: skip


def _below_floor(step: Step, budget: int, batch_size: int) -> MemoryBudgetError:
    config, size = step.config, step.image_size
    floor_plan = step.uniform(MAX_SAVING)
    floor = step.total(batch_size, floor_plan)
    try:
        largest = largest_batch(step, budget, floor_plan)
        fits = f"the largest batch that fits {format_bytes(budget)} is {largest}"
    except UsageError:
        largest = 0
        one = step.total(1, floor_plan)
        fits = f"not even a batch of 1 fits {format_bytes(budget)} (it needs {format_bytes(one)})"
    return MemoryBudgetError(
        f"{format_bytes(budget)} is below what {config.name} needs for a batch of {batch_size} at "
        f"{size}x{size} even in max_saving mode ({format_bytes(floor)}); {fits}",
        floor=floor,
        max_batch_size=largest,
    )


def deepest_densenet_bc(
    memory: int | str,
    *,
    batch_size: int = 64,
    growth_rate: int = 12,
    mode: str = EFFICIENT,
    image_size: int | None = None,
    **kwargs: Any,
) -> int:
    """The greatest depth 6n+4 of a DenseNet-BC whose training step fits ``memory`` (0 if none).

    Each depth tried is simulated (a handful, the deepest costing the most); a
    budget that a DenseNet-BC deeper than :data:`MAX_SIMULATED_LAYERS` dense layers would fit is
    refused, saying so.

    >>> deepest_densenet_bc("120MB", batch_size=2, mode="naive", device="cpu") > 40  # 77 MiB of it: the CPU runtime
    True
    """
    budget = parse_memory(memory)
    batch_size = check_int(batch_size, "batch_size")
    most = MAX_SIMULATED_LAYERS // 3  # n: 3n dense layers

    def total(n: int) -> int:
        cfg = densenet_bc_config(6 * n + 4, growth_rate)
        return Step(cfg, image_size, {**kwargs, "mode": mode}, "deepest_densenet_bc").total(batch_size)

    if total(1) > budget:
        return 0
    # a simulation costs in proportion to its depth: guided by the bytes of the depths simulated
    # (they grow smoothly), the search simulates few depths, none far beyond the answer
    n = last_within(total, budget, 1, most)
    if n == most:
        raise UsageError(
            f"{format_bytes(budget)} fits a DenseNet-BC of {3 * most} dense layers (depth {6 * most + 4}) "
            f"in {mode} mode: the planner simulates at most {MAX_SIMULATED_LAYERS} layers; give a smaller budget"
        )
    return 6 * n + 4
