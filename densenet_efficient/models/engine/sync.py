"""Batch norm over a process group: the statistics of the whole group's batch, on any backend.

A synchronised BN differs from a plain one in two reductions: forward's per-channel mean and
variance, and backward's per-channel sums of the upstream gradient (``sum_dy``) and of its
product with the centred input (``sum_dy_xmu``), which the input gradient needs. Each rank
computes its own, one collective combines them, and the rest is the plain BN's arithmetic.

* Forward gathers every rank's ``[mean, biased variance, count]`` (one ``all_gather``) and
  combines them with Chan's parallel formula, so uneven per-rank batches (DDP's last batch) give
  the exact global statistics, without the cancellation of a sum-of-squares.
* Backward all-reduces ``[sum_dy, sum_dy_xmu]`` (one ``all_reduce``). Parameter gradients stay
  local: DDP averages them as it does every other gradient, exactly as torch's SyncBatchNorm.
* The collectives are torch's functional ones (``torch.distributed._functional_collectives``),
  which run eagerly on gloo (CPU) and NCCL (CUDA) alike.

The engine measures a channel's statistics once, when the channel is produced, so a dense block
synchronises each new channel group once (not every BN that later normalises it); its backward
synchronises each BN's reductions once. :mod:`...sync_batchnorm` holds the module and
``convert_sync_batchnorm``.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from .context import stat_dtype


def process_group(norms: list[Any]) -> Any | None:
    """The process group ``norms`` synchronise over, or ``None`` for plain batch norm: modules that
    were not converted, or no process group of more than one rank (torch's SyncBatchNorm rule).
    Inside :func:`stand_in`, the stand-in group instead of a real one (this thread only)."""
    synchronising = [_synchronising(bn) for bn in norms]
    if not any(synchronising):
        return None
    group = getattr(norms[0], "process_group", _PLAIN)
    if not all(synchronising) or any(getattr(bn, "process_group", _PLAIN) is not group for bn in norms[1:]):
        raise NotImplementedError(
            "the memory-efficient engine synchronises a dense block's batch norms together: convert "
            "the whole model with one process group (densenet_efficient.convert_sync_batchnorm)"
        )
    stand = _stand_in.get()
    if stand is not None:
        return stand
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = group if group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


class StandInGroup:
    """A process group that is not one: what the planner's simulation synchronises over
    (:func:`stand_in`). Its collectives return fresh tensors of the real sizes, never read."""

    def __init__(self, world: int) -> None:
        self.world = world

    def all_gather(self, t: Tensor) -> Tensor:
        return t.new_empty(self.world * t.numel())

    def all_reduce(self, t: Tensor) -> Tensor:
        return torch.empty_like(t)


#: This thread's stand-in group (a context variable: another thread, e.g. a training step running
#: beside a simulation, still synchronises over its real process group).
_stand_in: contextvars.ContextVar[StandInGroup | None] = contextvars.ContextVar("sync_stand_in", default=None)


@contextlib.contextmanager
def stand_in(group: StandInGroup) -> Iterator[StandInGroup]:
    """Within, in this thread, converted batch norms in training synchronise over ``group``."""
    token = _stand_in.set(group)
    try:
        yield group
    finally:
        _stand_in.reset(token)


_PLAIN = object()


def check_compiled_batch(x: Tensor) -> Tensor:
    """``x``, when the compiler may trace a synchronised call on it: not an empty batch, which must
    still take part in every collective with weight 0 and which torch's compiled convolution
    backward cannot run (``DenseNet.forward`` runs an empty batch eagerly instead)."""
    if x.shape[0] == 0:
        raise NotImplementedError(
            "a compiled step with synchronised batch norm cannot trace an empty batch: call the "
            "DenseNet itself (its forward runs an empty batch eagerly), or drop the last uneven "
            "batch (DistributedSampler(..., drop_last=True))"
        )
    return x


def group_name(group: Any) -> str:
    """The name the custom ops take for ``group`` (an op's schema has no process-group type)."""
    return group.group_name


def resolve_group(name: str | None) -> Any | None:
    """The process group of :func:`group_name` (``None`` for plain batch norm)."""
    if name is None:
        return None
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(name)


def _synchronising(bn: Any) -> bool:
    return isinstance(bn, nn.SyncBatchNorm) or getattr(bn, "synchronised", False)


def batch_stats(x: Tensor, group: Any) -> tuple[Tensor, Tensor, Tensor]:
    """``(mean, biased variance, count)`` of ``x``'s channels over the whole group's batch, in at
    least float32; ``count`` is a 0-d tensor (the group's batch x H x W), never read on the host."""
    dtype = stat_dtype(x.dtype)
    c = x.shape[1]
    scratch = torch.zeros(2, c, dtype=dtype, device=x.device)  # float statistics of bf16/fp16 input
    if x.numel() == 0 or (not torch.compiler.is_compiling() and (is_fake(x) or x.is_meta)):
        # A rank with an empty batch still takes part (the others wait for it), with weight 0. On
        # fake or meta tensors (the ops' fake kernels, the planner's simulation) only shapes matter.
        mean, var = scratch
    elif torch.compiler.is_compiling():
        # traced (a naive block's SyncBatchNorm2d): the statistics kernel has no meta implementation,
        # so tracing would run it on real zeros; var_mean has one, and inductor fuses its upcast
        var, mean = torch.var_mean(x.to(dtype), dim=(0, 2, 3), correction=0)
    else:
        mean, var = torch.batch_norm_update_stats(x, scratch[0], scratch[1], 0.0)
    count = torch.full((1,), x.numel() // c, dtype=dtype, device=x.device)
    local = torch.cat([mean, var, count])
    gathered = _all_gather(local, group).view(-1, 2 * c + 1)  # [ranks, mean | var | count]
    means, variances, counts = gathered[:, :c], gathered[:, c : 2 * c], gathered[:, 2 * c :]
    total = counts.sum()
    weights = counts / total
    mean = (weights * means).sum(0)
    var = (weights * (variances + (means - mean).square())).sum(0)
    return mean, var, total


def backward_sums(dy: Tensor, x: Tensor, mean: Tensor, group: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(sum_dy, sum_dy_xmu)`` over the whole group's batch, and the local ones (the parameter
    gradients' reductions: ``grad_bias = sum_dy``, ``grad_weight = sum_dy_xmu * invstd``)."""
    dtype = mean.dtype
    dims = [0, 2, 3]
    local_dy = dy.sum(dims, dtype=dtype)
    local_dy_xmu = (dy.to(dtype) * (x.to(dtype) - mean[:, None, None])).sum(dims)
    total = _all_reduce(torch.cat([local_dy, local_dy_xmu]), group)
    c = mean.shape[0]
    return total[:c], total[c:], local_dy, local_dy_xmu


def bn_forward(x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, invstd: Tensor) -> Tensor:
    """``(x - mean) * invstd * weight + bias`` in ``x``'s dtype: the statistics are the group's."""
    scale = (invstd * weight.to(invstd.dtype)).to(x.dtype)
    shift = (bias.to(invstd.dtype) - mean * invstd * weight.to(invstd.dtype)).to(x.dtype)
    return torch.addcmul(shift[:, None, None], x, scale[:, None, None])


def bn_backward(
    dy: Tensor, x: Tensor, weight: Tensor, mean: Tensor, invstd: Tensor, count: Tensor, group: Any
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dweight, dbias)`` of :func:`bn_forward` with the group's statistics (one all-reduce);
    ``dx`` in ``x``'s dtype, the parameter gradients local (DDP averages them)."""
    sum_dy, sum_dy_xmu, local_dy, local_dy_xmu = backward_sums(dy, x, mean, group)
    w = weight.to(invstd.dtype)
    mean_dy = (sum_dy / count)[:, None, None]
    proj = (sum_dy_xmu / count * invstd.square())[:, None, None]
    dx = (dy.to(invstd.dtype) - mean_dy - (x.to(invstd.dtype) - mean[:, None, None]) * proj) * (invstd * w)[:, None, None]
    return dx.to(x.dtype), (local_dy_xmu * invstd).to(weight.dtype), local_dy.to(weight.dtype)


def _all_gather(t: Tensor, group: Any) -> Tensor:
    if isinstance(group, StandInGroup):
        return group.all_gather(t)
    from torch.distributed import _functional_collectives as funcol

    gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor  # its newer name
    return funcol.wait_tensor(gather(t, 0, group))


def _all_reduce(t: Tensor, group: Any) -> Tensor:
    if isinstance(group, StandInGroup):
        return group.all_reduce(t)
    from torch.distributed import _functional_collectives as funcol

    return funcol.wait_tensor(funcol.all_reduce(t, "sum", group))
