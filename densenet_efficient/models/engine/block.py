"""The Python engine's dense block: forward and backward loops over its layers, one autograd Function.

This is the reference the C++ loops (``csrc/engine.cpp``) translate line by line, the code the
custom ops' fake kernels run on fake tensors, and the engine wherever the C++ one cannot be built.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.autograd.function import once_differentiable

from . import sync
from .batchnorm import (
    Dummies,
    Stats,
    apply_bn,
    bn_eval,
    bn_fixed_backward,
    bn_train,
    bn_train_backward,
    running_stats,
)
from .context import Call, Layer, check_norms, make_call, no_autocast, stat_dtype
from .kernels import Scratch, cast_all, conv, conv_backward, conv_weights, relu_backward_
from .plan import Keep
from .running import RunningUpdates, count_batches

_aten = torch.ops.aten


class BlockStats:
    """The batch statistics of a block's channels, each measured once, when its channel is written.

    ``rows[0]`` is the mean and ``rows[1]`` the biased variance of every channel a later layer
    normalises; layer ``l``'s ``norm1`` reads the prefix ``[:c_l]`` of both (views, no copies).
    """

    #: synchronised batch norm (:mod:`.sync`): the process group, the group's batch x H x W
    #: (a 0-d tensor) and each layer's norm2 ``(mean, invstd)``, kept for backward so that its
    #: recompute needs no second collective
    group: Any = None
    count: Tensor | None = None
    norm2: list[tuple[Tensor, Tensor]]

    def __init__(self, like: Tensor, channels: int, dummies: int, dtype: torch.dtype, group: Any = None) -> None:
        self.rows = torch.empty(2, channels, dtype=dtype, device=like.device)
        self.mean, self.var = self.rows.unbind(0)
        self.dummies = Dummies(like, max(channels, dummies), dtype)  # also serve norm2's kernels
        self.group, self.norm2 = group, []

    @classmethod
    def of_rows(cls, rows: Tensor, like: Tensor, dummies: int) -> BlockStats:
        """Statistics measured earlier (``rows`` from a forward), for a backward."""
        stats = cls.__new__(cls)
        stats.rows = rows
        stats.mean, stats.var = rows.unbind(0)
        stats.dummies = Dummies(like, max(rows.shape[1], dummies), rows.dtype)
        return stats

    def measure(self, x: Tensor, start: int) -> None:
        """Mean and biased variance of ``x``'s channels into ``[start, start + x.shape[1])``: the native
        statistics kernel, its two results written into place by one stack."""
        c = x.shape[1]
        if self.group is not None:  # the whole process group's statistics: one collective
            mean, var, self.count = sync.batch_stats(x, self.group)
            torch.stack([mean, var], out=self.rows.narrow(1, start, c))
            return
        if is_fake(x) or x.is_meta:  # a fake or meta kernel (ops.py): the kernel has no meta; values unused
            return
        rm, rv = self.dummies.narrow(c)  # float buffers keep bf16/fp16 inputs' statistics in float32
        mean, var = torch.batch_norm_update_stats(x, rm, rv, 0.0)
        torch.stack([mean, var], out=self.rows.narrow(1, start, c))

    def prefix(self, channels: int) -> Stats:
        return Stats(self.mean.narrow(0, 0, channels), self.var.narrow(0, 0, channels))


@dataclass
class BlockSaved:
    """What a block's backward needs besides the buffer and the parameters (which are saved)."""

    c0: int  # block input channels
    k: int  # growth rate
    stats: BlockStats | None  # training: the shared batch statistics
    bottlenecks: list[Tensor | None]  # per layer: the kept bottleneck output, or None (recompute)
    masks: list[Tensor | None]  # per layer: the dropout mask, or None
    running: list[Tensor]  # eval: every BN's running statistics (saved, so version-checked)


def _norm1_stats(layer: nn.Module, stats: BlockStats | None, c: int) -> Stats:
    if stats is not None:
        return stats.prefix(c)
    return running_stats(layer.norm1)


def _norm1_forward(
    buf: Tensor, layer: nn.Module, s: Stats, c: int, scratch: Scratch, copy: bool, dense: Tensor | None = None
) -> Tensor:
    """``relu(norm1(buf[:, :c]))`` with fixed statistics, into the scratch (``dense``: the same
    channels as a dense tensor, the block's own input for its first layer).

    On CPU the inference kernel is 2-3x slower on a strided view than a dense copy plus the kernel
    on dense memory, at every size measured (16K to 1.6M elements, 1 and 2 threads): there it
    normalises a dense copy in place, one op more. CUDA's kernel reads the view directly.
    """
    x, out = buf.narrow(1, 0, c) if dense is None else dense, scratch.view(c)
    if dense is None and copy:
        x = out.copy_(x)
    return apply_bn(x, layer.norm1, s, out, scratch.unused).relu_()


def block_forward(x: Tensor, call: Call, updates: RunningUpdates | None) -> tuple[Tensor, BlockSaved]:
    """Run a dense block into one buffer. Returns the buffer and what backward needs. Training
    queues every BN's running-statistics update in ``updates`` (a norm2's may happen in its kernel);
    the caller flushes them and counts the batch."""
    layers = call.modules
    n, c0, h, w = x.shape
    k = layers[0].conv2.weight.shape[0]
    channels = c0 + k * len(layers)
    buf = torch.empty((n, channels, h, w), dtype=call.dtype, device=x.device, memory_format=call.fmt)
    buf[:, :c0].copy_(x)
    dense = x if x.dtype == call.dtype and x.is_contiguous(memory_format=call.fmt) else None
    weights = conv_weights(layers, call.dtype)

    stats = None
    if call.training:
        stats = BlockStats(x, channels - k, layers[0].norm2.num_features, stat_dtype(call.dtype), call.group)
        stats.measure(dense if dense is not None else buf.narrow(1, 0, c0), 0)
        if call.group is not None:  # running variances are unbiased over the group's batch
            updates.bessel = stats.count / (stats.count - 1).clamp_(min=1)

    bottlenecks: list[Tensor | None] = []
    masks: list[Tensor | None] = []
    scratch = Scratch(buf, channels - k, call.fmt)
    for i, layer in enumerate(layers):
        c = c0 + i * k
        s1 = _norm1_stats(layer, stats, c)
        z1 = _norm1_forward(buf, layer, s1, c, scratch, call.dense_copy, dense if i == 0 else None)
        bottleneck = conv(z1, layer.conv1, weights[2 * i])
        del z1
        if call.group is not None:
            z2 = _norm2_synchronised(bottleneck, layer.norm2, stats, updates)
        elif call.training:
            z2 = bn_train(bottleneck, layer.norm2, stats.dummies, updates)[0]
        else:
            z2 = bn_eval(bottleneck, layer.norm2)
        y = conv(z2.relu_(), layer.conv2, weights[2 * i + 1])
        del z2
        mask = None
        if layer.drop_rate > 0 and call.training:
            y, mask = torch.native_dropout(y, layer.drop_rate, True)
        buf.narrow(1, c, k).copy_(y)
        if stats is not None and i + 1 < len(layers):  # the last layer's channels feed no later layer
            stats.measure(y, c)
        bottlenecks.append(bottleneck if call.keep[i] else None)
        masks.append(mask)
        del bottleneck, y, mask  # as the C++ loop's: not alive into the next layer's convolutions
    if call.training:
        # every norm1 normalised a prefix of the block's statistics: one Bessel correction for all
        updates.add_shared([layer.norm1 for layer in layers], stats.rows[0], stats.rows[1] * updates.bessel)
    running = [] if call.training else [t for layer in layers for t in _running_of(layer)]
    return buf, BlockSaved(c0, k, stats, bottlenecks, masks, running)


def _norm2_synchronised(bottleneck: Tensor, norm2: Any, stats: BlockStats, updates: RunningUpdates) -> Tensor:
    """A layer's norm2 with the process group's statistics (one collective), kept for backward."""
    mean, var, count = sync.batch_stats(bottleneck, stats.group)
    invstd = torch.rsqrt(var + norm2.eps)
    updates.add(norm2, mean, var * updates.bessel)
    stats.norm2.append((mean, invstd))
    return sync.bn_forward(bottleneck, norm2.weight, norm2.bias, mean, invstd)


def _run_block(x: Tensor, call: Call) -> tuple[Tensor, BlockSaved]:
    """:func:`block_forward` with the running statistics updated in place: one ``_foreach_add_``
    for the block's ``num_batches_tracked``, then the kernels' and the queued updates."""
    updates = None
    if call.training:
        n, _, h, w = x.shape
        count_batches([bn for layer in call.modules for bn in (layer.norm1, layer.norm2)])
        updates = RunningUpdates(n * h * w)
    with no_autocast(call.autocast[0]):
        buf, saved = block_forward(x, call, updates)
    if updates is not None:
        updates.flush()
    return buf, saved


def _running_of(layer: nn.Module) -> list[Tensor]:
    return [layer.norm1.running_mean, layer.norm1.running_var, layer.norm2.running_mean, layer.norm2.running_var]


def _invstd(stats: BlockStats, layers: list[Any]) -> Tensor:
    """1/sqrt(var + eps) of every channel, once per block (per layer only if the layers' eps differ)."""
    eps = {layer.norm1.eps for layer in layers}
    if len(eps) == 1:
        return torch.rsqrt(stats.rows[1] + eps.pop())
    return torch.stack([torch.rsqrt(stats.rows[1] + layer.norm1.eps) for layer in layers])  # [layer, channel]


def block_backward(
    grad: Tensor, buf: Tensor, call: Call, saved: BlockSaved
) -> tuple[Tensor, list[Tensor]]:
    """Reverse walk over the layers; returns the input gradient and per-layer parameter gradients.

    Temporaries are released as soon as they are consumed, so the transient peak is about three
    ``c_l``-channel tensors.
    """
    layers, fmt, c0, k = call.modules, call.fmt, saved.c0, saved.k
    bottlenecks = list(saved.bottlenecks)
    gbuf = grad.to(call.dtype).clone(memory_format=fmt)  # the one gradient buffer, accumulated in place
    del grad
    weights = conv_weights(layers, call.dtype)
    conv_grads: list[Tensor] = [None] * (2 * len(layers))  # type: ignore[list-item]
    bn_grads: list[Tensor] = [None] * (4 * len(layers))  # type: ignore[list-item]
    invstd = _invstd(saved.stats, layers) if saved.stats is not None else None
    dummies = saved.stats.dummies if saved.stats is not None else None
    group = saved.stats.group if saved.stats is not None else None
    # z1 is dead (after its ReLU backward) before the dense copy of the input that BN backward
    # reads (2x faster than the strided view on CPU, the fused kernel on CUDA): one scratch serves both.
    scratch = Scratch(buf, c0 + k * (len(layers) - 1), fmt)
    for i in reversed(range(len(layers))):
        layer, c = layers[i], c0 + i * k
        dy = gbuf.narrow(1, c, k)
        mask = saved.masks[i]
        if mask is not None:
            dy = _aten.native_dropout_backward.default(dy, mask, 1.0 / (1.0 - layer.drop_rate))
        s1 = _norm1_stats(layer, saved.stats, c)
        if invstd is not None:
            s1.invstd = invstd[:c] if invstd.dim() == 1 else invstd[i, :c]
        z1 = _norm1_forward(buf, layer, s1, c, scratch, call.dense_copy)
        bottleneck, bottlenecks[i] = bottlenecks[i], None
        if bottleneck is None:  # not kept (max_saving): recompute the 1x1 convolution too
            bottleneck = conv(z1, layer.conv1, weights[2 * i])
        if group is not None:  # the group's statistics, kept by forward: no collective
            mean2, invstd2 = saved.stats.norm2[i]
            z2 = sync.bn_forward(bottleneck, layer.norm2.weight, layer.norm2.bias, mean2, invstd2)
        elif call.training:
            z2, mean2, invstd2, reserve = bn_train(bottleneck, layer.norm2, dummies, None)
        else:
            z2 = bn_eval(bottleneck, layer.norm2)
        z2 = z2.relu_()
        dz2, conv_grads[2 * i + 1] = conv_backward(dy, z2, layer.conv2, weights[2 * i + 1])
        del dy
        relu_backward_(dz2, z2)
        del z2
        if group is not None:
            w2, count = layer.norm2.weight, saved.stats.count
            db, dg2, dbeta2 = sync.bn_backward(dz2, bottleneck, w2, mean2, invstd2, count, group)
        elif call.training:
            db, dg2, dbeta2 = bn_train_backward(dz2, bottleneck, layer.norm2, mean2, invstd2, reserve, dummies)
        else:
            db, dg2, dbeta2 = bn_fixed_backward(dz2, bottleneck, layer.norm2, running_stats(layer.norm2))
        del dz2, bottleneck
        dz1, conv_grads[2 * i] = conv_backward(db, z1, layer.conv1, weights[2 * i])
        del db
        relu_backward_(dz1, z1)
        del z1
        x1 = scratch.view(c).copy_(buf.narrow(1, 0, c))
        if group is not None:
            dx, dg1, dbeta1 = sync.bn_backward(dz1, x1, layer.norm1.weight, s1.mean, s1.invstd, saved.stats.count, group)
        else:
            dx, dg1, dbeta1 = bn_fixed_backward(dz1, x1, layer.norm1, s1)
        del x1
        del dz1
        gbuf.narrow(1, 0, c).add_(dx)
        del dx
        bn_grads[4 * i : 4 * i + 4] = [dg1, dbeta1, dg2, dbeta2]
    conv_grads = cast_all(conv_grads, [p.dtype for layer in layers for p in (layer.conv1.weight, layer.conv2.weight)])
    param_grads: list[Tensor] = []
    for i in range(len(layers)):
        dg1, dbeta1, dg2, dbeta2 = bn_grads[4 * i : 4 * i + 4]
        param_grads += [dg1, dbeta1, conv_grads[2 * i], dg2, dbeta2, conv_grads[2 * i + 1]]
    return gbuf[:, :c0], param_grads


def pack(tensors: list[Tensor | None]) -> tuple[list[Tensor], list[bool]]:
    """The present tensors and where they were (``save_for_backward`` takes no ``None``)."""
    return [t for t in tensors if t is not None], [t is not None for t in tensors]


def unpack(tensors: list[Tensor], present: list[bool]) -> list[Tensor | None]:
    """Re-insert ``None`` where a layer saved nothing (inverse of :func:`pack`)."""
    it = iter(tensors)
    return [next(it) if p else None for p in present]


class _DenseBlockFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, call: Call, *params: Tensor) -> Tensor:
        buf, saved = _run_block(x, call)
        # Tensors go through save_for_backward so autograd frees them right after this block's
        # backward (and keeps them when retain_graph=True), and so that reading them in backward
        # checks their version counters: a parameter changed in place between forward and
        # backward raises autograd's "modified by an inplace operation" error, as the naive path
        # does, instead of silently giving gradients of the new values. ctx keeps only
        # statistics (fresh tensors nobody else can reach) and layout.
        bottlenecks, ctx.has_bottleneck = pack(saved.bottlenecks)
        masks, ctx.has_mask = pack(saved.masks)
        ctx.call, ctx.input_dtype = call, x.dtype
        ctx.counts = (len(params), len(bottlenecks), len(masks))
        ctx.saved = replace(saved, bottlenecks=[], masks=[], running=[])
        ctx.save_for_backward(buf, *params, *bottlenecks, *masks, *saved.running)
        return buf

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        buf, *rest = ctx.saved_tensors  # unpacking checks every saved tensor's version
        n_params, n_bottlenecks, n_masks = ctx.counts
        params = rest[:n_params]
        kept = rest[n_params : n_params + n_bottlenecks]
        masks = rest[n_params + n_bottlenecks : n_params + n_bottlenecks + n_masks]
        saved = replace(
            ctx.saved, bottlenecks=unpack(kept, ctx.has_bottleneck), masks=unpack(masks, ctx.has_mask)
        )
        layers = ctx.call.modules
        call = replace(ctx.call, modules=[layer.bind(params[6 * i : 6 * i + 6]) for i, layer in enumerate(layers)])
        with no_autocast(call.autocast[0]):
            gx, param_grads = block_backward(grad, buf, call, saved)
        return (gx.to(ctx.input_dtype), None, *param_grads)


def empty_block(layers: list[nn.Module], x: Tensor) -> Tensor:
    """An empty batch (N=0) through the layers' own forward, which is the naive computation.

    There is nothing to save memory on, and the engine's statistics kernels refuse empty input;
    ``nn.BatchNorm2d`` defines what an empty batch does (it counts the batch in
    ``num_batches_tracked``, leaves the running statistics alone and gives zero parameter
    gradients), so the modules themselves give exactly the naive path's outputs, buffers and
    gradients.
    """
    features = [x]
    for layer in layers:
        features.append(layer(torch.cat(features, 1)))
    return torch.cat(features, 1)


def eager_block(modules: list[nn.Module], x: Tensor, keep: Keep, training: bool) -> Tensor:
    """A dense block's layers (torchvision ``_DenseLayer``s) on a non-empty batch, eagerly: one autograd
    Function, or a plain forward when no backward follows. ``keep``: the block's flags
    (:class:`.plan.ExecutionPlan`)."""
    norms = [m for layer in modules for m in (layer.norm1, layer.norm2)]
    check_norms(norms)
    layers = [Layer.of(layer) for layer in modules]
    params = [p for layer in layers for p in layer.params()]
    call = make_call(layers, keep, x, training, params, sync.process_group(norms))
    if not call.graph:
        with torch.no_grad():
            return _run_block(x, call)[0]
    return _DenseBlockFunction.apply(x, call, *params)

