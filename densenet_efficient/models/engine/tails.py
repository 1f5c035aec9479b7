"""BN-ReLU tails: a transition (BN-ReLU-[pool, conv1x1]), the ImageNet stem (BN-ReLU-maxpool) and
``norm5`` (BN-ReLU), each keeping only its input (and, when its flag says so, what its backward
needs: the stem's max-pool indices and sign, norm5's output).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import sync
from .batchnorm import (
    Dummies,
    bn_eval,
    bn_fixed_backward,
    bn_train,
    bn_train_backward,
    running_stats,
)
from .context import BN, Call, Conv, check_norms, make_call, no_autocast, stat_dtype
from .kernels import cast_all, conv, conv_backward, pool_args, relu_backward_
from .running import RunningUpdates, count_batches

_aten = torch.ops.aten


class Tail:
    """What follows a tail's BN-ReLU: the transition's pool-then-conv, or the stem's max-pool."""

    def params(self, modules: list[nn.Module]) -> list[Tensor]:
        return []

    def bind(self, module: nn.Module, params: list[Tensor]) -> Any:
        return module

    def forward(self, z: Tensor, module: Any, call: Call, keep: bool) -> tuple[Tensor, list[Tensor]]:
        """``(output, what backward needs)``; with ``keep`` False it keeps nothing and backward
        recomputes ``relu(norm(x))``."""
        raise NotImplementedError

    def kept_backward(self, grad: Tensor, kept: list[Tensor], x: Tensor, module: Any) -> Tensor:
        """Gradient w.r.t. the BN output from what :meth:`forward` kept (ReLU's backward included)."""
        raise NotImplementedError

    def backward(self, grad: Tensor, z: Tensor, module: Any, call: Call) -> tuple[Tensor, list[Tensor]]:
        raise NotImplementedError


class TransitionTail(Tail):
    """avg-pool then 1x1 conv: both linear maps on different axes, so they commute, and the
    convolution runs on a quarter of the pixels."""

    def params(self, modules: list[nn.Module]) -> list[Tensor]:
        return [modules[1].weight]

    def bind(self, module: Any, params: list[Tensor]) -> Any:
        return module._replace(weight=params[0])

    def forward(self, z, module, call, keep):
        (weight,) = cast_all([module.weight], [call.dtype])
        return conv(F.avg_pool2d(z, 2, 2), module, weight), []

    def backward(self, grad, z, module, call):
        (weight,) = cast_all([module.weight], [call.dtype])
        pooled = F.avg_pool2d(z, 2, 2)
        dpooled, dw = conv_backward(grad, pooled, module, weight)
        dz = _aten.avg_pool2d_backward.default(dpooled, z, [2, 2], [2, 2], [0, 0], False, True, None)
        return dz, cast_all([dw], [module.weight.dtype])


class StemTail(Tail):
    """max-pool. In ``"efficient"`` mode it keeps the max-pool indices and the sign of the pooled
    output (a quarter-size int64 and bool tensor): backward is then one masked scatter and the BN
    backward, with no recompute of the largest activation of the network."""

    def kept_backward(self, grad, kept, x, module):
        idx, positive = kept  # mask by relu's sign, scatter to the max positions
        return _aten.max_pool2d_with_indices_backward.default(grad * positive, x, *pool_args(module), idx)

    def forward(self, z, module, call, keep):
        args = pool_args(module)
        if keep:
            out, idx = _aten.max_pool2d_with_indices.default(z, *args)
            return out, [idx, out > 0]  # at the max position relu's mask is the pooled value's sign
        return _aten.max_pool2d.default(z, *args), []

    def backward(self, grad, z, module, call):
        args = pool_args(module)
        _, idx = _aten.max_pool2d_with_indices.default(z, *args)
        return _aten.max_pool2d_with_indices_backward.default(grad, z, *args, idx), []


class IdentityTail(Tail):
    """Nothing: the network's final BN-ReLU (``norm5``). It keeps its output, as naive's in-place
    ReLU does (the final map, the smallest of the network): no recompute in backward."""

    def kept_backward(self, grad, kept, x, module):
        return _aten.threshold_backward.default(grad, kept[0], 0)

    def forward(self, z, module, call, keep):
        return z, [z] if keep else []

    def backward(self, grad, z, module, call):
        return grad.clone(memory_format=call.fmt), []  # relu's backward writes into it


def tail_forward(
    x: Tensor, call: Call, tail: Tail, updates: RunningUpdates | None, keep: bool
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """``tail(relu(norm(x)))`` in ``call.dtype``: ``(out, kept, stats)``, ``kept`` what the tail keeps
    for its backward (``keep``), ``stats`` the batch statistics and reserve it then needs too."""
    bn = call.modules[0]
    with no_autocast(call.autocast[0]):
        x = x.to(call.dtype)
        if call.group is not None:  # the group's statistics, always kept: backward needs no collective
            mean, var, count = sync.batch_stats(x, call.group)
            invstd = torch.rsqrt(var + bn.eps)
            updates.add(bn, mean, var * (count / (count - 1).clamp_(min=1)))
            z, stats = sync.bn_forward(x, bn.weight, bn.bias, mean, invstd), [mean, invstd, count]
        elif call.training:
            z, mean, invstd, reserve = bn_train(x, bn, None, updates)
            stats = [mean, invstd, reserve] if keep else []
        else:
            z, stats = bn_eval(x, bn), []
        out, kept = tail.forward(z.relu_(), call.modules[1], call, keep)
    return out, kept, stats


def tail_backward(
    grad: Tensor, x: Tensor, call: Call, tail: Tail, kept: list[Tensor], stats: list[Tensor]
) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """Gradients of :func:`tail_forward` (``x`` in ``call.dtype``, ``call.modules`` holding the saved
    parameters): ``(dx, dweight, dbias, the tail's own parameter gradients)``, ``dx`` in ``x``'s dtype."""
    bn, module = call.modules
    extra: list[Tensor] = []
    with no_autocast(call.autocast[0]):
        grad = grad.to(call.dtype)
        if call.group is not None:
            return _synchronised_backward(grad, x, call, tail, kept, stats)
        dummies = Dummies(x, x.shape[1], stat_dtype(x.dtype))
        if kept:
            dz = tail.kept_backward(grad, kept, x, module)
            if call.training:
                mean, invstd, reserve = stats
        else:
            if call.training:
                z, mean, invstd, reserve = bn_train(x, bn, dummies, None)
            else:
                z = bn_eval(x, bn)
            z = z.relu_()
            dz, extra = tail.backward(grad, z, module, call)
            relu_backward_(dz, z)
            del z
        if call.training:
            dx, dg, dbeta = bn_train_backward(dz, x, bn, mean, invstd, reserve, dummies)
        else:
            dx, dg, dbeta = bn_fixed_backward(dz, x, bn, running_stats(bn))
    return dx, dg, dbeta, extra


def _synchronised_backward(
    grad: Tensor, x: Tensor, call: Call, tail: Tail, kept: list[Tensor], stats: list[Tensor]
) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """:func:`tail_backward` with the process group's statistics that forward kept (one collective)."""
    bn, module = call.modules
    mean, invstd, count = stats
    extra: list[Tensor] = []
    if kept:
        dz = tail.kept_backward(grad, kept, x, module)
    else:
        z = sync.bn_forward(x, bn.weight, bn.bias, mean, invstd).relu_()
        dz, extra = tail.backward(grad, z, module, call)
        relu_backward_(dz, z)
        del z
    return (*sync.bn_backward(dz, x, bn.weight, mean, invstd, count, call.group), extra)


class _NormReluTailFunction(torch.autograd.Function):
    """``tail(relu(norm(x)))`` saving ``x`` (and the stem's pool indices in ``"efficient"``)."""

    @staticmethod
    def forward(ctx, x: Tensor, call: Call, tail: Tail, *params: Tensor) -> Tensor:
        ctx.call, ctx.tail, ctx.input_dtype, ctx.n_params = call, tail, x.dtype, len(params)
        bn = call.modules[0]
        updates = None
        if call.training:
            count_batches([bn])
            updates = RunningUpdates(x.numel() // x.shape[1])
        x = x.to(call.dtype)  # once: the tail computes in it and backward reads it
        out, kept, stats = tail_forward(x, call, tail, updates, call.graph and call.keep[0])
        if updates is not None:
            updates.flush()
        running = [] if call.training else [bn.running_mean, bn.running_var]
        # Parameters too, so backward's read of them is version-checked (see _DenseBlockFunction).
        ctx.n_kept = len(kept)
        ctx.save_for_backward(x, *params, *kept, *stats, *running)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        x, *rest = ctx.saved_tensors
        params, rest = rest[: ctx.n_params], rest[ctx.n_params :]
        call, tail = ctx.call, ctx.tail
        bn = call.modules[0]._replace(weight=params[0], bias=params[1])  # the saved parameters
        call = replace(call, modules=[bn, tail.bind(call.modules[1], params[2:])])
        kept, stats = rest[: ctx.n_kept], rest[ctx.n_kept :]
        dx, dg, dbeta, extra = tail_backward(grad, x, call, tail, kept, stats[:3] if call.training else [])
        return (dx.to(ctx.input_dtype), None, None, dg, dbeta, *extra)


def eager_tail(x: Tensor, modules: list[nn.Module | None], tail: Tail, training: bool, keep: bool) -> Tensor:
    """``tail(relu(norm(x)))`` eagerly (``modules``: the BN and what follows it): one autograd Function,
    or a plain forward when no backward follows. ``keep``: the tail's flag (:class:`.plan.ExecutionPlan`)."""
    check_norms([modules[0]])
    group = sync.process_group([modules[0]]) if training else None
    if x.shape[0] == 0 and group is None:  # an empty batch: the modules' own forward (see empty_block)
        z = F.relu(modules[0](x))
        if isinstance(tail, TransitionTail):
            return F.avg_pool2d(modules[1](z), 2, 2)
        return z if modules[1] is None else modules[1](z)
    specs = [BN.of(modules[0]), Conv.of(modules[1]) if isinstance(tail, TransitionTail) else modules[1]]
    params = [modules[0].weight, modules[0].bias, *tail.params(modules)]
    call = make_call(specs, (keep,), x, training, params, group)
    if not call.graph:
        with torch.no_grad():
            return _NormReluTailFunction.forward(_NoCtx(), x, call, tail, *params)
    return _NormReluTailFunction.apply(x, call, tail, *params)


class _NoCtx:
    """A throwaway ``ctx`` for running a Function's forward outside autograd (nothing is kept)."""

    def save_for_backward(self, *tensors: Tensor) -> None:
        pass


#: The tails by the name the custom op takes.
TAILS: dict[str, Tail] = {"transition": TransitionTail(), "stem": StemTail(), "identity": IdentityTail()}
