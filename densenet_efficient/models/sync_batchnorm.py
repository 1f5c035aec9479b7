"""Synchronised batch norm on any backend: :func:`convert_sync_batchnorm` and :class:`SyncBatchNorm2d`.

torch's ``nn.SyncBatchNorm`` runs only on CUDA, and DDP refuses it in a CPU model ("SyncBatchNorm
layers only work with GPU modules"). :class:`SyncBatchNorm2d` is an ``nn.BatchNorm2d`` (so DDP
accepts it anywhere, and the ``state_dict`` is a batch norm's) whose training statistics are
those of the whole process group's batch, through collectives that run on gloo (CPU) and NCCL
(CUDA). The memory-efficient engine reads these modules (and torch's ``nn.SyncBatchNorm``) and
synchronises each channel's statistics once, when the channel is produced.

>>> import torch.nn as nn
>>> model = convert_sync_batchnorm(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))
>>> type(model[1]).__name__, list(model[1].state_dict()) == list(nn.BatchNorm2d(8).state_dict())
('SyncBatchNorm2d', True)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from .engine import sync

__all__ = ["SyncBatchNorm2d", "convert_sync_batchnorm"]


class SyncBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` normalising with the statistics of the whole ``process_group``'s batch in
    training (``None``: the default group). Outside a process group of more than one rank, or in
    eval, it is exactly ``nn.BatchNorm2d``.

    Forward gathers each rank's mean, variance and count in one collective and combines them
    (exact for uneven per-rank batches); backward all-reduces the two per-channel sums the input
    gradient needs; parameter gradients stay local, for DDP to average.
    """

    #: read by the engine: these statistics are the process group's
    synchronised = True

    def __init__(self, num_features: int, *args: Any, process_group: Any = None, **kwargs: Any) -> None:
        super().__init__(num_features, *args, **kwargs)
        self.process_group = process_group

    def forward(self, x: Tensor) -> Tensor:
        group = sync.process_group([self]) if self.training else None
        if group is None or not self.affine or not self.track_running_stats:
            return super().forward(x)
        self._check_input_dim(x)
        if torch.compiler.is_compiling():
            sync.check_compiled_batch(x)
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
        return _SyncBatchNorm.apply(x, self.weight, self.bias, self, group)


class _SyncBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, bn: SyncBatchNorm2d, group: Any) -> Tensor:
        mean, var, count = sync.batch_stats(x, group)
        invstd = torch.rsqrt(var + bn.eps)
        # nn.BatchNorm's rule with the group's unbiased variance (the cumulative average: 1/batches)
        factor = 1.0 / bn.num_batches_tracked.to(mean.dtype) if bn.momentum is None else bn.momentum
        unbiased = var * (count / (count - 1).clamp_(min=1))
        bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), factor)
        bn.running_var.lerp_(unbiased.to(bn.running_var.dtype), factor)
        ctx.group = group
        ctx.save_for_backward(x, weight, mean, invstd, count)
        return sync.bn_forward(x, weight, bias, mean, invstd)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, mean, invstd, count = ctx.saved_tensors
        dx, dweight, dbias = sync.bn_backward(grad, x, weight, mean, invstd, count, ctx.group)
        return dx, dweight, dbias, None, None


def convert_sync_batchnorm(module: nn.Module, process_group: Any = None) -> nn.Module:
    """Every ``nn.BatchNorm2d`` of ``module`` as a :class:`SyncBatchNorm2d` over ``process_group``
    (torch's ``nn.SyncBatchNorm.convert_sync_batchnorm`` name and signature, on any backend).

    The converted modules keep the same parameter objects (an optimizer built before still
    updates them), buffers and ``state_dict`` keys, so weights load into an unconverted model and
    into torchvision's. Returns ``module`` itself, or the new module when ``module`` is a batch norm.

    >>> import densenet_efficient as de
    >>> model = de.convert_sync_batchnorm(de.densenet_bc_100(memory_efficient=True))
    """
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, SyncBatchNorm2d):
        converted = SyncBatchNorm2d(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
            process_group=process_group,
        )  # fmt: skip
        if module.affine:
            converted.weight, converted.bias = module.weight, module.bias
        if module.track_running_stats:
            converted.running_mean, converted.running_var = module.running_mean, module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        new = convert_sync_batchnorm(child, process_group)
        if new is not child:
            setattr(module, name, new)
    return module
