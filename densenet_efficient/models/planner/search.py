"""The searches over the estimate: the largest batch that fits, the plan with the least recompute
that fits, the deepest DenseNet-BC that fits. Each is a bisection (:mod:`.bisection`) over a
monotone "fits", so it takes ``O(log)`` estimates of the number it searches, whatever that is.

>>> max_batch_size("densenet121", "8GiB", image_size=224, mode="efficient") > 64
True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ...errors import UsageError, check_int
from ..config import ArchConfig, densenet_bc_config, resolve_arch
from ..engine import EFFICIENT, MAX_SAVING
from ..memory_plan import MemoryPlan, resolve_memory_plan
from .bisection import first_true, last_true
from .estimate import MemoryEstimate, estimate
from .options import (
    DEFAULT_OPTIMIZER,
    Dial,
    check_image_size,
    check_options,
    resolve_setting,
    runs,
)
from .parameters import block_inputs
from .units import format_bytes, parse_memory

__all__ = [
    "MAX_PLAN_LAYERS",
    "MemoryBudgetError",
    "Step",
    "deepest_densenet_bc",
    "fit_memory",
    "largest_batch",
    "max_batch_size",
]

#: The most layers a block of a fitted plan may have when only some of them keep their
#: bottleneck: such a :class:`MemoryPlan` holds one flag per layer.
MAX_PLAN_LAYERS = 1_000_000


class MemoryBudgetError(UsageError):
    """A budget below the ``"max_saving"`` floor: says the smallest budget that fits this batch and
    the largest batch that fits this budget (``floor`` and ``max_batch_size``, 0 when none)."""

    def __init__(self, message: str, *, floor: int, max_batch_size: int) -> None:
        super().__init__(message)
        self.floor = floor
        self.max_batch_size = max_batch_size


class Step:
    """One training step's settings, checked once; ``total(setting, batch)`` is its estimate."""

    def __init__(self, arch: str | ArchConfig, image_size: int | None, kwargs: dict[str, Any], where: str):
        unknown = set(kwargs) - {"mode", "dtype", "amp", "device", "optimizer"}
        if unknown:
            raise TypeError(f"{where}() got unexpected keyword arguments: {', '.join(sorted(unknown))}")
        self.config = resolve_arch(arch)
        self.name = arch if isinstance(arch, str) else self.config.name
        self.image_size = check_image_size(self.config, image_size, self.name)
        self.dtype = kwargs.get("dtype", "fp32")
        self.device = kwargs.get("device", "cuda")
        self.optimizer = kwargs.get("optimizer", DEFAULT_OPTIMIZER)
        self.amp = check_options(self.dtype, kwargs.get("amp"), self.optimizer, self.device)
        self.options = {k: v for k, v in kwargs.items() if k in ("dtype", "amp", "device", "optimizer")}
        setting = resolve_setting(kwargs.get("mode", EFFICIENT), self.config)
        self.label = setting if isinstance(setting, str) else (setting.mode or str(setting))
        self.setting = setting if isinstance(setting, str) else Dial.of(setting)

    def estimate(self, batch: int, setting: str | Dial | None = None) -> MemoryEstimate:
        setting = self.setting if setting is None else setting
        label = self.label if setting is self.setting else "plan"
        return estimate(
            self.config, self.name, label, setting, batch, self.image_size,
            self.dtype, self.amp, self.device, self.optimizer,
        )  # fmt: skip

    def total(self, batch: int, setting: str | Dial | None = None) -> int:
        return self.estimate(batch, setting).total


def max_batch_size(
    arch: str | ArchConfig, memory: int | str, *, image_size: int | None = None, **kwargs: Any
) -> int:
    """The largest batch whose training step fits ``memory`` (bytes or ``"8GiB"``).

    ``kwargs`` are :func:`~.estimate.estimate_memory`'s (``mode``, ``dtype``, ``amp``, ``device``,
    ``optimizer``). Raises a UsageError, naming the minimum needed, when not even one image fits.
    Bisection: ``O(log batch)`` estimates (a 16 EiB budget takes about a hundred).

    >>> max_batch_size("densenet_bc_100", "12GB", mode="efficient") > 1000
    True
    """
    budget = parse_memory(memory)
    step = Step(arch, image_size, kwargs, "max_batch_size")
    return largest_batch(step, budget)


def largest_batch(step: Step, budget: int, setting: str | Dial | None = None) -> int:
    one = step.estimate(1, setting)
    if one.total > budget:
        raise UsageError(
            f"{format_bytes(budget)} fits no batch of {one.arch} in {one.mode} mode at "
            f"{one.image_size}x{one.image_size}: one image needs at least {format_bytes(one.total)}"
        )
    return last_true(lambda n: step.total(n, setting) <= budget, 1)


def _plan_below(config: ArchConfig, width: int, stem: str) -> Dial:
    """Every layer reading fewer than ``width`` channels recomputes its bottleneck, the rest keep it.

    Recomputing layer ``l``'s bottleneck costs ``c_l * B`` multiply-adds per pixel and saves ``B``
    values per pixel, in every block alike: the narrowest layers save memory most cheaply, so the
    cheapest plan for a budget is such a threshold (each block keeps its last layers).
    """
    keeps = []
    for c, layers in zip(block_inputs(config), config.block_config, strict=True):
        dropped = min(max(-(-(width - c) // config.growth_rate), 0), layers)  # layers with c + i k < width
        keeps.append(layers - dropped)
    return _dial(keeps, config, stem)


def _dial(keeps: list[int], config: ArchConfig, stem: str) -> Dial:
    """Counts of kept last layers as a :class:`Dial` (a whole block as its mode)."""
    blocks = tuple(
        EFFICIENT if n == layers else MAX_SAVING if n == 0 else n
        for n, layers in zip(keeps, config.block_config, strict=True)
    )
    return Dial(blocks, stem)


def _refit(dial: Dial, config: ArchConfig, fits: Callable[[Dial], bool]) -> Dial:
    """Give layers back their bottleneck where the budget still allows it.

    The threshold plan saves bytes wherever they are cheapest, but the peak is reached at one
    moment of the step: bytes saved in a block whose bottlenecks are not alive then buy nothing.
    Block by block, the most expensive recomputation first, keep as many last layers as still fit.
    """
    keeps = [
        sum(n for kept, n in runs(b, layers) if kept)
        for b, layers in zip(dial.blocks, config.block_config, strict=True)
    ]
    starts = block_inputs(config)

    def with_keep(block: int, n: int) -> Dial:
        return _dial(keeps[:block] + [n] + keeps[block + 1 :], config, dial.stem)

    changed = True
    while changed:
        changed = False
        # the widest layer each block recomputes is its most expensive one
        order = sorted(
            (b for b, n in enumerate(config.block_config) if keeps[b] < n),
            key=lambda b: -(starts[b] + (config.block_config[b] - keeps[b] - 1) * config.growth_rate),
        )
        for b in order:
            most = last_true(lambda n, b=b: fits(with_keep(b, n)), keeps[b], config.block_config[b])
            if most > keeps[b]:
                keeps[b], changed = most, True
    return with_keep(0, keeps[0])


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
    ``optimizer``, default ``"momentum"``). The search runs over the width below which layers recompute their
    bottleneck (see :func:`_plan_below`), with the stem keeping or recomputing its indices, so it
    takes ``O(blocks * log(width))`` estimates at any depth. Raises :class:`MemoryBudgetError`
    below the ``"max_saving"`` floor.

    >>> plan = fit_memory("densenet121", "600MiB", batch_size=16, device="cpu")
    >>> plan.estimated_peak <= parse_memory("600MiB"), 0 < plan.estimated_extra_time < 0.1
    (True, True)
    """
    if "mode" in kwargs:
        raise TypeError("fit_memory() picks the memory setting itself: it takes no mode=")
    budget = parse_memory(budget)
    batch_size = check_int(batch_size, "batch_size")
    step = Step(arch, image_size, kwargs, "fit_memory")
    config = step.config

    def fits(dial: Dial) -> bool:
        return step.total(batch_size, dial) <= budget

    widest = config.num_init_features + sum(config.block_config) * config.growth_rate + 1
    stems = (EFFICIENT,) if config.small_inputs else (EFFICIENT, MAX_SAVING)
    best: tuple[float, Dial, MemoryEstimate] | None = None
    for stem in stems:
        if not fits(_plan_below(config, widest, stem)):
            continue  # not even with every bottleneck recomputed
        least = first_true(lambda w, stem=stem: fits(_plan_below(config, w, stem)), 0, widest)
        dial = _refit(_plan_below(config, least, stem), config, fits)
        est = step.estimate(batch_size, dial)
        if best is None or est.extra_time < best[0]:
            best = (est.extra_time, dial, est)
    if best is None:
        raise _below_floor(step, budget, batch_size)
    _, dial, est = best
    plan = _to_plan(dial, config)
    return MemoryPlan(
        plan.blocks,
        plan.stem,
        estimated_peak=est.total,
        estimated_extra_time=est.extra_time,
        budget=budget,
        batch_size=batch_size,
        image_size=step.image_size,
    )


def _to_plan(dial: Dial, config: ArchConfig) -> MemoryPlan:
    """The :class:`MemoryPlan` of a searched dial; refused where it would need millions of flags."""
    for b, (setting, layers) in enumerate(zip(dial.blocks, config.block_config, strict=True)):
        if isinstance(setting, int) and layers > MAX_PLAN_LAYERS:
            raise UsageError(
                f"the plan that fits keeps {setting} of the {layers} layers of block {b + 1} of "
                f"{config.name}: a memory plan holds one flag per layer, at most {MAX_PLAN_LAYERS} "
                "per block; choose a budget that fits the block in one mode"
            )
    return MemoryPlan(resolve_memory_plan(list(dial.blocks), config).blocks, dial.stem)


def _below_floor(step: Step, budget: int, batch_size: int) -> MemoryBudgetError:
    config, size = step.config, step.image_size
    floor_plan = Dial.of(MemoryPlan.uniform(MAX_SAVING, len(config.block_config)))
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

    >>> deepest_densenet_bc("12GB", mode="naive") < deepest_densenet_bc("12GB", mode="efficient")
    True
    """
    budget = parse_memory(memory)
    batch_size = check_int(batch_size, "batch_size")

    def fits(n: int) -> bool:
        cfg = densenet_bc_config(6 * n + 4, growth_rate)
        step = Step(cfg, image_size, {**kwargs, "mode": mode}, "deepest_densenet_bc")
        return step.total(batch_size) <= budget

    if not fits(1):
        return 0
    return 6 * last_true(fits, 1) + 4
