"""Training to a memory budget: the batch size and memory plan ``--memory``/``--batch-size auto``
choose, and how ``--accum-steps`` weighs the micro-batches of one optimizer step.

The budget covers what the planner counts for one training step (``MemoryEstimate.total``):
parameters, gradients, the SGD momentum buffer, the input batch, the activations kept for backward
and the backward workspace, plus the CUDA context on a GPU. It does not cover the Python and
PyTorch runtime of the process or the data loader (see docs/training_to_a_budget.md).

>>> accumulation_weights([16, 16, 16, 16, 8], 2)
[0.5, 0.5, 0.5, 0.5, 1.0]
>>> suggest_accumulation(64, 13)
(13, 5)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import UsageError, check_int
from ..models.config import ArchConfig
from ..models.engine import MAX_SAVING
from ..models.memory_plan import MemoryPlan
from ..models.planner import (
    MemoryBudgetError,
    fit_memory,
    format_bytes,
    max_batch_size,
    parse_memory,
)
from .distributed import DistInfo

__all__ = [
    "AUTO",
    "CUDA_RESERVE_BYTES",
    "CUDA_RESERVE_FRACTION",
    "BudgetChoice",
    "accumulation_weights",
    "choose_budget",
    "suggest_accumulation",
]

#: ``--memory auto`` and ``--batch-size auto``.
AUTO = "auto"

# ``--memory auto`` on CUDA budgets the device's free memory minus a reserve, the larger of 10% and
# 512 MiB. The planner counts tensors; the caching allocator rounds blocks up and fragments (a
# freed block is reused only by a tensor that fits it), cuDNN picks algorithms whose workspaces it
# allocates on the fly, and the data loader's pinned-memory copies and other processes on the card
# take their share too. 10% (at least 512 MiB) keeps a planner-exact step clear of those.
CUDA_RESERVE_FRACTION = 0.10
CUDA_RESERVE_BYTES = 512 << 20


@dataclass(frozen=True)
class BudgetChoice:
    """What a budget decided: the per-process batch, the plan, and how the budget was arrived at."""

    budget: int
    batch_size: int
    plan: MemoryPlan
    source: str  # "--memory 4GiB", or how "auto" measured the device

    def describe(self, accum_steps: int, world_size: int = 1) -> str:
        """The one line a run prints about its budget."""
        batch = f"batch {self.batch_size}"
        if accum_steps > 1 or world_size > 1:
            effective = self.batch_size * accum_steps * world_size
            parts = [batch]
            if accum_steps > 1:
                parts.append(f"{accum_steps} accumulation steps")
            if world_size > 1:
                parts.append(f"{world_size} processes")
            batch = f"{' x '.join(parts)} (effective {effective})"
        recompute = self.plan.estimated_extra_time or 0.0
        return (
            f"memory: budget {format_bytes(self.budget)} ({self.source}) -> {batch}, plan: {self.plan}; "
            f"planner peak {format_bytes(self.plan.estimated_peak or 0)}, +{100 * recompute:.0f}% recompute"
        )


def accumulation_weights(batch_sizes: Sequence[int], accum_steps: int) -> list[float]:
    """The factor on each micro-batch's mean loss: consecutive groups of ``accum_steps``
    micro-batches make one optimizer step, and a micro-batch of ``n`` images in a group of ``N``
    weighs ``n / N``, so a group's accumulated gradient is the gradient of the mean loss over its
    images, as one batch of them would give (exactly, for a model without batch statistics). The
    epoch's last group may be shorter and its last micro-batch smaller: the weights follow."""
    check_int(accum_steps, "accum_steps")
    weights: list[float] = []
    for start in range(0, len(batch_sizes), accum_steps):
        group = batch_sizes[start : start + accum_steps]
        total = sum(group)
        weights += [n / total for n in group]
    return weights


def suggest_accumulation(effective: int, largest: int) -> tuple[int, int]:
    """``(batch, accum_steps)`` with ``batch <= largest`` and ``batch * accum_steps >= effective``,
    as few steps as possible and then the smallest such batch (the closest to ``effective``)."""
    steps = math.ceil(effective / largest)
    return math.ceil(effective / steps), steps


def _cuda_budget(device: torch.device, info: DistInfo) -> tuple[int, str]:
    free, _total = torch.cuda.mem_get_info(device)
    if info.enabled:  # every process must choose the same batch: budget the tightest device
        t = torch.tensor([free], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        free = int(t.item())
    reserve = max(int(CUDA_RESERVE_FRACTION * free), CUDA_RESERVE_BYTES)
    if free <= reserve:
        raise UsageError(
            f"--memory auto: {device} has {format_bytes(free)} free, no more than the "
            f"{format_bytes(reserve)} kept in reserve; free the GPU or give --memory"
        )
    return (
        free - reserve,
        f"auto: {format_bytes(free)} free on {device} minus {format_bytes(reserve)} reserve",
    )


def _budget(memory: str | None, device: torch.device, info: DistInfo) -> tuple[int, str]:
    if memory in (None, AUTO):
        if device.type != "cuda":
            asked = "--memory auto" if memory == AUTO else "--batch-size auto"
            raise UsageError(
                f"{asked} on {device.type}: only a CUDA device has free memory to measure; give a "
                "budget, e.g. --memory 4GiB (it covers the training step, not the Python process)"
            )
        return _cuda_budget(device, info)
    return parse_memory(memory), f"--memory {memory}"


def choose_budget(
    arch: ArchConfig,
    *,
    memory: str | None,
    batch_size: int | str,
    accum_steps: int,
    image_size: int,
    amp: str | None,
    optimizer: str,
    train_images: int,
    device: torch.device,
    info: DistInfo,
    sync_bn: bool = False,
    channels_last: bool = False,
    drop_rate: float = 0.0,
    freeze_features: bool = False,
) -> BudgetChoice:
    """The batch (``batch_size``, or with ``"auto"`` the largest that fits, at most the images each
    process trains on) and the plan with the least recompute that fits the budget.

    ``sync_bn``: the batch norms synchronise over the job's processes (``--sync-bn``; plain batch
    norm in a single process): the planner then simulates the synchronised step, which holds more.
    ``channels_last``: model and batches in ``torch.channels_last`` (``--channels-last``), the
    layout the planner then simulates. ``drop_rate``: the model's dropout (``--drop-rate``), whose
    masks the step keeps. ``freeze_features``: only the classifier trains (``--freeze-features``).

    Raises :class:`UsageError` when the batch does not fit even in ``max_saving`` mode, suggesting
    a smaller batch with gradient accumulation that keeps the effective batch."""
    budget, source = _budget(memory, device, info)
    kwargs = {
        "amp": amp, "device": device.type, "optimizer": optimizer, "channels_last": channels_last,
        "drop_rate": drop_rate, "freeze_features": freeze_features,
    }  # fmt: skip
    if sync_bn and info.enabled:  # the loop converts the model's batch norms only then
        kwargs["sync_bn_world_size"] = info.world_size
    # the planner names a named architecture with another class count by all its fields
    known = arch.architecture_name(ignore_classes=True)

    def named(err: Exception) -> str:
        return (
            str(err).replace(arch.describe(), f"{known} ({arch.num_classes} classes)") if known else str(err)
        )

    if batch_size == AUTO:
        try:
            largest = max_batch_size(arch, budget, image_size=image_size, mode=MAX_SAVING, **kwargs)
        except UsageError as err:
            raise UsageError(f"--batch-size auto: {named(err)}") from None
        batch_size = max(1, min(largest, train_images // info.world_size))
    try:
        plan = fit_memory(arch, budget, batch_size=batch_size, image_size=image_size, **kwargs)
    except MemoryBudgetError as err:
        if err.max_batch_size == 0:
            raise UsageError(named(err)) from None
        batch, steps = suggest_accumulation(batch_size * accum_steps, err.max_batch_size)
        raise UsageError(
            f"{named(err)}; train with --batch-size {batch} --accum-steps {steps} for an effective batch of "
            f"{batch * steps}, or give a larger --memory"
        ) from None
    return BudgetChoice(budget, batch_size, plan, source)
