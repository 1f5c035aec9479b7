"""Running statistics: ``nn.BatchNorm``'s update rule, applied a block or a whole model at a time.

Nothing reads a running statistic during a training forward, so its updates can be queued and
applied together, exactly: one ``_foreach_add_`` for the ``num_batches_tracked`` counters and one
``_foreach_lerp_`` for the means and variances. The Python engine's autograd Functions queue a
block's updates (:class:`RunningUpdates`); the custom ops must not mutate their inputs, so they
return the batch statistics (:class:`DeferredUpdates`) and their caller applies them
(:func:`update_block_stats`, :func:`update_tail_stats`), for a whole model inside
:func:`batched_running_updates`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from .context import BlockTensors, stat_dtype


class RunningUpdates:
    """Running-statistics updates of a block, applied together at its end (one ``_foreach`` kernel per
    kind instead of several ops per BN). Exact: nothing reads a running statistic in between.

    nn.BatchNorm's rule: ``running = (1 - f) * running + f * batch`` with the unbiased batch variance,
    ``f = momentum``, or ``1 / num_batches_tracked`` when ``momentum is None`` (computed on the
    device, so a training step never synchronises with the host).
    """

    def kernel_target(self, bn: Any, dtype: torch.dtype) -> tuple[Tensor, Tensor, float] | None:
        """The running buffers and momentum a BN kernel applies ``bn``'s update to itself (see
        :func:`bn_train`), or ``None`` when the update must be queued (``momentum=None``, whose
        factor lives on the device; buffers in bf16/fp16, which the kernel refuses beside float
        statistics)."""
        if bn.momentum is None or bn.running_mean.dtype != dtype:
            return None
        return bn.running_mean, bn.running_var, float(bn.momentum)

    def __init__(self, count: int) -> None:
        self.bessel = count / max(count - 1, 1)
        self.fixed: tuple[list[Tensor], list[Tensor], list[float]] = ([], [], [])
        self.cumulative: tuple[list[Tensor], list[Tensor], list[Tensor]] = ([], [], [])

    def add(self, bn: nn.BatchNorm2d, mean: Tensor, var: Tensor) -> None:
        """Queue ``bn``'s update from batch ``mean`` and unbiased variance ``var``."""
        for running, batch in ((bn.running_mean, mean), (bn.running_var, var)):
            batch = batch if batch.dtype == running.dtype else batch.to(running.dtype)
            if bn.momentum is None:
                self.cumulative[0].append(running)
                self.cumulative[1].append(batch)
                self.cumulative[2].append(bn.num_batches_tracked.to(running.dtype).reciprocal_())
            else:
                self.fixed[0].append(running)
                self.fixed[1].append(batch)
                self.fixed[2].append(float(bn.momentum))

    def add_shared(self, norms: list[Any], mean: Tensor, var: Tensor) -> None:
        """Queue the updates of BNs that normalise prefixes of the same channels (a block's norm1s)."""
        for bn in norms:
            c = bn.num_features
            self.add(bn, mean[:c], var[:c])

    def flush(self) -> None:
        for group in (self.fixed, self.cumulative):
            if group[0]:
                torch._foreach_lerp_(*group)


class DeferredUpdates(RunningUpdates):
    """The batch statistics a running-statistics update needs, collected instead of applied: a
    custom op (:mod:`.ops`) must not mutate its inputs, so it returns them and its caller, which
    the compiler traces, applies them with :class:`RunningUpdates`.

    Each BN kernel writes its batch mean and unbiased variance itself, into a zeroed slot of
    ``batch`` (``[2, slots, channels]``) with momentum 1 (``1 * batch + 0 * 0``: exact), so
    collecting them costs no kernel.
    """

    def __init__(self, count: int, batch: Tensor) -> None:
        super().__init__(count)
        self.batch = batch
        self.slots = batch.view(2, -1, batch.shape[-1])  # [2, C] (a tail) or [2, layers, C] (a block)
        self.used = 0
        self.shared: Tensor | None = None

    def kernel_target(self, bn: Any, dtype: torch.dtype) -> tuple[Tensor, Tensor, float]:
        i, self.used = self.used, self.used + 1
        return self.slots[0, i], self.slots[1, i], 1.0

    def add(self, bn: Any, mean: Tensor, var: Tensor) -> None:
        """Statistics computed outside a BN kernel (synchronised batch norm's): into the next slot."""
        mean_slot, var_slot, _ = self.kernel_target(bn, mean.dtype)
        mean_slot.copy_(mean)
        var_slot.copy_(var)

    def add_shared(self, norms: list[Any], mean: Tensor, var: Tensor) -> None:
        self.shared = var  # the mean is the block statistics' own row

    def flush(self) -> None:
        raise RuntimeError("deferred running-statistics updates are applied by the caller")


def count_batches(norms: list[nn.BatchNorm2d]) -> None:
    """``num_batches_tracked += 1`` for every BN of a block, as one kernel."""
    counters = [bn.num_batches_tracked for bn in norms if bn.num_batches_tracked is not None]
    if counters:
        torch._foreach_add_(counters, 1)


class RunningBatch:
    """Running-statistics updates queued by the engine's calls and applied together: one
    ``_foreach_add_`` for every ``num_batches_tracked`` and one ``_foreach_lerp_`` (nn.BatchNorm's
    momentum rule) for every running mean and variance. Exact, because nothing reads a running
    statistic during a training forward; :func:`batched_running_updates` spans a whole model."""

    def __init__(self) -> None:
        self.counters: list[Tensor] = []
        self.running: list[Tensor] = []
        self.batch: list[Tensor] = []
        self.momenta: list[float] = []

    def add(self, counters: list[Tensor | None], running: list[Tensor], batch: list[Tensor], momenta: list) -> None:
        self.counters += [c for c in counters if c is not None]
        self.running += running
        self.batch += batch
        self.momenta += [float(m) for m in momenta for _ in range(2)]  # a mean and a variance each

    def flush(self) -> None:
        if self.counters:
            torch._foreach_add_(self.counters, 1)
        if self.running:
            torch._foreach_lerp_(self.running, self.batch, self.momenta)
        self.__init__()


_queue: RunningBatch | None = None  # set by batched_running_updates()


@contextlib.contextmanager
def batched_running_updates() -> Iterator[None]:
    """Inside, eager engine calls queue their running-statistics updates; they are applied on exit,
    as two ``_foreach`` kernels for the whole model instead of two per block and tail (nothing
    reads them before). The compiler traces each call's own update instead."""
    global _queue
    if _queue is not None or torch.compiler.is_compiling():
        yield
        return
    _queue = RunningBatch()
    try:
        yield
        _queue.flush()
    finally:
        _queue = None


def queue_or_apply(counters: list, running: list[Tensor], batch: list[Tensor], momenta: list) -> None:
    if _queue is not None and not torch.compiler.is_compiling():
        _queue.add(counters, running, batch, momenta)
        return
    updates = RunningBatch()
    updates.add(counters, running, batch, momenta)
    updates.flush()


def fixed_momenta(momenta: list, running: list[Tensor], dtype: torch.dtype) -> bool:
    """Whether the one-lerp update applies: numeric momenta and float32+ buffers (else each BN's
    update is queued by :class:`RunningUpdates`, exactly as nn.BatchNorm does it)."""
    stat = stat_dtype(dtype)
    return None not in momenta and all(r.dtype == stat for r in running)


def update_block_stats(
    t: BlockTensors, x: Tensor, dtype: torch.dtype, rows: Tensor, unbiased: Tensor, norm2: Tensor
) -> None:
    """nn.BatchNorm's running-statistics update of every BN of a block from the op's statistics."""
    means2, variances2 = norm2[0].unbind(0), norm2[1].unbind(0)
    if fixed_momenta(t.momenta, t.running, dtype):
        sources: list[Tensor] = []
        for i, (mean2, var2) in enumerate(zip(means2, variances2, strict=True)):
            c = t.params[6 * i].shape[0]
            sources += [rows[0, :c], unbiased[:c], mean2, var2]
        queue_or_apply(t.counters, t.running, sources, t.momenta)
        return
    count_batches(t.norms)  # now: momentum=None's factor reads the counters below
    n, _, h, w = x.shape
    updates = RunningUpdates(n * h * w)
    for norm2_bn, mean2, var2 in zip(t.norms[1::2], means2, variances2, strict=True):
        updates.add(norm2_bn, mean2, var2)
    updates.add_shared(t.norms[0::2], rows[0], unbiased)
    updates.flush()


def update_tail_stats(norm: nn.BatchNorm2d, x: Tensor, dtype: torch.dtype, batch: Tensor) -> None:
    """nn.BatchNorm's running-statistics update of a tail's BN from the op's ``[2, C]`` statistics."""
    running, mean, var = [norm.running_mean, norm.running_var], *batch.unbind(0)
    if fixed_momenta([norm.momentum], running, dtype):
        queue_or_apply([norm.num_batches_tracked], running, [mean, var], [norm.momentum])
        return
    count_batches([norm])
    updates = RunningUpdates(x.numel() // x.shape[1])
    updates.add(norm, mean, var)
    updates.flush()
