"""Batch-norm pieces of the engine, each one native kernel call.

Training BN with its own batch statistics runs ``_batch_norm_with_update`` and its backward
``batch_norm_backward`` with the forward's reserve: the pair that selects cuDNN on CUDA, as
``F.batch_norm`` does. BN with fixed statistics (a block's shared statistics, or the running ones
in eval) runs the inference kernel and ``native_batch_norm_backward``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from torch import Tensor

from .context import stat_dtype

if TYPE_CHECKING:
    from .running import RunningUpdates

_aten = torch.ops.aten
_ALL_GRADS = [True, True, True]


def param(t: Tensor, dtype: torch.dtype) -> Tensor:
    """A BN parameter in the dtype the kernels want beside ``dtype`` statistics (a no-op unless the
    model's own parameters are bf16/fp16)."""
    return t if t.dtype == dtype else t.to(dtype)


def apply_bn(x: Tensor, bn: nn.BatchNorm2d, stats: Stats, out: Tensor, unused: Tensor) -> Tensor:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` with fixed statistics, written into ``out``
    (which may be ``x``): the inference batch-norm kernel, one native call. ``unused``: an empty
    tensor for the kernel's statistics outputs, which inference leaves untouched."""
    dtype = stats.mean.dtype
    if unused.numel():  # meta and fake kernels resize the statistics outputs the real one leaves alone
        unused.resize_(0)
    _aten.native_batch_norm.out(
        x, param(bn.weight, dtype), param(bn.bias, dtype), stats.mean, param(stats.var, dtype), False,
        0.0, bn.eps, out=out, save_mean=unused, save_invstd=unused,
    )
    return out


class Dummies:
    """Stand-in running buffers for batch-norm kernels that must not touch the real ones.

    ``_batch_norm_with_update`` (the op that selects cuDNN on CUDA, like ``F.batch_norm``) always
    updates the running buffers it is given; a recompute in backward passes these with momentum 0.
    """

    def __init__(self, like: Tensor, channels: int, dtype: torch.dtype) -> None:
        self.mean = torch.empty(channels, dtype=dtype, device=like.device)
        self.var = torch.empty(channels, dtype=dtype, device=like.device)

    def narrow(self, channels: int) -> tuple[Tensor, Tensor]:
        return self.mean[:channels], self.var[:channels]


def bn_train(x: Tensor, bn: nn.BatchNorm2d, dummies: Dummies | None, updates: RunningUpdates | None):
    """Training batch norm of ``x`` with its own batch statistics: ``(out, mean, invstd, reserve)``.

    With ``updates`` the running statistics are updated exactly once: inside the kernel when the
    momentum is a number, else (``momentum=None``, the cumulative average, whose factor lives on the
    device; or buffers in bf16/fp16, which the kernel refuses beside float statistics) queued in
    ``updates``. Without, ``dummies`` absorb the kernel's update (a recompute).
    """
    dtype = stat_dtype(x.dtype)
    weight, bias = param(bn.weight, dtype), param(bn.bias, dtype)
    c = x.shape[1]
    target = updates.kernel_target(bn, dtype) if updates is not None else None
    if target is not None:
        return _aten._batch_norm_with_update.default(x, weight, bias, *target, bn.eps)
    if dummies is None:
        dummies = Dummies(x, c, dtype)
    rm, rv = dummies.narrow(c)
    out, mean, invstd, reserve = _aten._batch_norm_with_update.default(x, weight, bias, rm, rv, 0.0, bn.eps)
    if updates is not None:  # momentum None, low-precision buffers or deferred: queue the update
        updates.add(bn, mean, invstd.pow(-2).sub_(bn.eps).mul_(updates.bessel))
    return out, mean, invstd, reserve


def bn_train_backward(
    grad: Tensor, x: Tensor, bn: nn.BatchNorm2d, mean: Tensor, invstd: Tensor, reserve: Tensor, dummies: Dummies
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of :func:`bn_train` through ``batch_norm_backward``: on CUDA it runs cuDNN's kernel
    where ``F.batch_norm`` would (``reserve`` is what the forward kernel returned), else ATen's."""
    rm, rv = dummies.narrow(x.shape[1])
    dx, dg, db = _aten.batch_norm_backward.default(
        grad, x, param(bn.weight, mean.dtype), rm, rv, mean, invstd, True, bn.eps, _ALL_GRADS, reserve
    )
    return dx, dg.to(bn.weight.dtype), db.to(bn.weight.dtype)


def bn_fixed_backward(
    grad: Tensor, x: Tensor, bn: nn.BatchNorm2d, stats: Stats
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of a BN applied with fixed statistics: the block's shared batch statistics
    (training: the gradient flows through mean and variance) or the running ones (eval)."""
    weight = param(bn.weight, stats.mean.dtype)
    if stats.invstd is not None:
        dx, dg, db = _aten.native_batch_norm_backward.default(
            grad, x, weight, None, None, stats.mean, stats.invstd, True, bn.eps, _ALL_GRADS
        )
    else:
        dx, dg, db = _aten.native_batch_norm_backward.default(
            grad, x, weight, stats.mean, stats.var, None, None, False, bn.eps, _ALL_GRADS
        )
    return dx, dg.to(bn.weight.dtype), db.to(bn.weight.dtype)


def bn_eval(x: Tensor, bn: nn.BatchNorm2d) -> Tensor:
    """Inference batch norm with the running statistics (one kernel)."""
    dtype = stat_dtype(x.dtype)
    w, b = param(bn.weight, dtype), param(bn.bias, dtype)
    rm, rv = param(bn.running_mean, dtype), param(bn.running_var, dtype)
    return torch.native_batch_norm(x, w, b, rm, rv, False, 0.0, bn.eps)[0]


@dataclass
class Stats:
    """Fixed per-channel statistics a layer's ``norm1`` applies: a prefix of the block's shared batch
    statistics in training (``invstd`` set in backward), the layer's running statistics in eval."""

    mean: Tensor
    var: Tensor  # biased batch variance, or the running variance
    invstd: Tensor | None = None  # training only: 1/sqrt(var + eps), for the backward kernel


def running_stats(bn: nn.BatchNorm2d) -> Stats:
    """``bn``'s running statistics, in float32 at least (a no-op for float32/float64 models)."""
    dtype = stat_dtype(bn.running_mean.dtype)
    return Stats(param(bn.running_mean, dtype), param(bn.running_var, dtype))

