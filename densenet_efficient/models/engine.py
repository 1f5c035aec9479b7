r"""The memory-efficient execution engine for dense blocks, transitions and the ImageNet stem.

Why
---
Dense layer :math:`l` of a block computes

.. math::  y_l = W^{(2)}_l * \mathrm{relu}(\mathrm{BN}^{(2)}_l(b_l)),\qquad
           b_l = W^{(1)}_l * \mathrm{relu}(\mathrm{BN}^{(1)}_l([x_0, y_0, \dots, y_{l-1}]))

A naive implementation materialises the concatenation :math:`[x_0, \dots, y_{l-1}]` (``c_l``
channels) and its BN/ReLU output for every layer and keeps both for backward: memory quadratic
in depth.

What this engine does
---------------------
* One preallocated buffer ``N x C_final x H x W`` per block. The block input is copied in once;
  layer ``l`` reads the view ``buf[:, :c_l]`` and writes its ``k`` new channels into
  ``buf[:, c_l:c_l+k]``. No concatenation ever happens, in training or inference.
* Batch statistics of a channel are the same for every later layer that normalises it, so they
  are computed once, when the channel is produced (``torch.batch_norm_update_stats``); each layer
  still applies its own affine parameters. Each BN's running statistics are updated exactly once
  per training forward with ``nn.BatchNorm``'s rule (momentum, or the cumulative average when
  ``momentum is None``), ``num_batches_tracked`` included.
* One autograd Function per block saves the buffer, the per-channel statistics and, per mode,
  each layer's bottleneck output ``b_l`` (``"efficient"``) or nothing (``"max_saving"``, which
  recomputes the 1x1 convolution). Backward walks the layers in reverse, recomputes
  ``relu(BN(.))`` from the buffer with the saved statistics, and accumulates every slice's
  gradient into one gradient buffer in place: the gradient of ``y_l`` is complete when layer
  ``l`` is reached because only later layers read it.
* The batch-norm input gradient is linear in its upstream gradient, so each layer's BN backward
  (``native_batch_norm_backward`` with the shared ``mean``/``invstd``) can be computed on its own
  and summed into the gradient buffer; the sum equals the gradient of the concatenated model.
* Transitions (BN-ReLU-conv1x1-avgpool) keep only their input and recompute BN+ReLU in backward.
  The transition pools before its 1x1 convolution: both are linear maps acting on different
  axes, so they commute, and the convolution runs on a quarter of the pixels. The ImageNet stem
  (BN-ReLU-maxpool after conv0) does the same in ``"max_saving"``; in ``"efficient"`` it also
  keeps the max-pool indices and the sign of the pooled output (a quarter-size int64 and bool
  tensor), so its backward is one masked scatter and the BN backward, with no recompute of the
  largest activation of the network.

Every kernel is a native ATen op: batch-norm statistics, training forward and backward
(``batch_norm_update_stats``, ``native_batch_norm``, ``native_batch_norm_backward``), convolution
and its backward, pooling backward, and for BN with fixed statistics the per-channel affine map as
one ``addcmul`` on the strided buffer view (no copy). Per-layer temporaries live in one reusable
scratch allocation. The engine does the naive path's work minus the concatenation copies and
the per-layer statistics passes, plus one elementwise BN+ReLU recompute per layer in backward:
naive speed or better on CPU (docs/benchmarks.md).

Modes
-----
``"naive"`` (``False``, the models' default): torchvision's computation. ``"efficient"``
(``True``): keeps bottlenecks, recomputes only BN+ReLU. ``"max_saving"``: keeps only the buffers
and recomputes the 1x1 convolution too. Between the two, a block runs with per-layer flags
(``_Plan.keep``): each layer keeps its bottleneck or recomputes it; :mod:`.memory_plan` is the
user-facing form of that dial and :mod:`.planner` its memory model.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..errors import UsageError

NAIVE = "naive"
EFFICIENT = "efficient"
MAX_SAVING = "max_saving"
MODES = (NAIVE, EFFICIENT, MAX_SAVING)

_ALIASES: dict[Any, str] = {
    False: NAIVE,
    None: NAIVE,
    True: EFFICIENT,
    "default": EFFICIENT,
    "max": MAX_SAVING,
}


def resolve_mode(mode: bool | str | None) -> str:
    """Normalise a ``memory_efficient`` value to one of :data:`MODES`.

    >>> resolve_mode(True), resolve_mode(False), resolve_mode("max")
    ('efficient', 'naive', 'max_saving')
    """
    if isinstance(mode, str) and mode in MODES:
        return mode
    if isinstance(mode, (bool, str)) or mode is None:
        try:
            return _ALIASES[mode]
        except KeyError:
            pass
    raise UsageError(
        f"memory_efficient must be False/'naive', True/'efficient' or 'max_saving', got {mode!r}"
    )


# ---------------------------------------------------------------------------------------------
# Batch-norm pieces, each one native kernel call.
# ---------------------------------------------------------------------------------------------


@dataclass
class _Stats:
    """Per-channel statistics a BN applies: batch stats in training, running stats in eval."""

    mean: Tensor
    var: Tensor  # biased batch variance, or the running variance
    train: bool  # batch statistics: the backward includes the gradient through mean/var
    invstd: Tensor | None = None  # 1/sqrt(var + eps) exactly as the forward kernel computed it

    def narrow(self, channels: int) -> _Stats:
        return _Stats(self.mean[:channels], self.var[:channels], self.train)


def _ema_factor(bn: nn.BatchNorm2d) -> float:
    """nn.BatchNorm's running-average factor for this step; counts the batch as nn.BatchNorm does."""
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
    if bn.momentum is None:
        return 1.0 / float(bn.num_batches_tracked)
    return float(bn.momentum)


def _update_running(bn: nn.BatchNorm2d, stats: _Stats, count: int) -> None:
    """One running-statistics update with the unbiased batch variance, exactly once per forward."""
    f = _ema_factor(bn)
    unbiased = stats.var * (count / max(count - 1, 1))
    bn.running_mean.mul_(1 - f).add_(stats.mean.to(bn.running_mean.dtype), alpha=f)
    bn.running_var.mul_(1 - f).add_(unbiased.to(bn.running_var.dtype), alpha=f)


def _batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance in one native pass.

    The kernel returns statistics in the dtype of the running buffers it is given; passing float
    buffers with momentum 0 (left unchanged) keeps bf16/fp16 activations' statistics in float32,
    as nn.BatchNorm does.
    """
    stat_dtype = torch.promote_types(x.dtype, torch.float32)
    c = x.shape[1]
    zeros = torch.zeros(c, dtype=stat_dtype, device=x.device)
    return torch.batch_norm_update_stats(x, zeros, torch.ones_like(zeros), 0.0)


def _layer_stats(bn: nn.BatchNorm2d, batch: _Stats | None) -> _Stats:
    """What ``bn`` normalises with: the given batch stats when training, else its running stats."""
    if batch is not None:
        return batch
    return _Stats(bn.running_mean.detach().clone(), bn.running_var.detach().clone(), False)


def _bn_relu(x: Tensor, bn: nn.BatchNorm2d, stats: _Stats, out: Tensor | None = None) -> Tensor:
    """relu(BN(x)) with fixed statistics, reading ``x`` (a strided view of a block buffer) in place.

    BN with fixed statistics is the per-channel affine map ``x * scale + shift``; one native
    ``addcmul`` applies it to the strided view directly (the inference BN kernel would need a
    contiguous copy first, which costs more than the whole map), then an in-place ReLU.
    """
    invstd = stats.invstd if stats.invstd is not None else torch.rsqrt(stats.var + bn.eps)
    scale = bn.weight * invstd
    shift = bn.bias - stats.mean * scale
    shape = (1, -1, 1, 1)
    if out is None:
        out = torch.addcmul(shift.to(x.dtype).view(shape), x, scale.to(x.dtype).view(shape))
    else:
        torch.addcmul(shift.to(x.dtype).view(shape), x, scale.to(x.dtype).view(shape), out=out)
    return out.relu_()


class _Scratch:
    """One reusable allocation for a block's per-layer temporaries.

    On CPU every fresh large tensor costs a page fault per 4 KiB when first written, which made
    these temporaries as expensive as the arithmetic on them; views into one buffer sized for the
    widest layer avoid that without raising the peak (the temporaries existed anyway).
    """

    def __init__(self, like: Tensor, channels: int, fmt: torch.memory_format) -> None:
        n, _, h, w = like.shape
        self.flat = torch.empty(n * channels * h * w, dtype=like.dtype, device=like.device)
        self.n, self.h, self.w, self.fmt = n, h, w, fmt

    def view(self, channels: int) -> Tensor:
        data = self.flat[: self.n * channels * self.h * self.w]
        if self.fmt == torch.channels_last:
            return data.view(self.n, self.h, self.w, channels).permute(0, 3, 1, 2)
        return data.view(self.n, channels, self.h, self.w)


def _prefix_copy(buf: Tensor, channels: int, out: Tensor) -> Tensor:
    """A dense copy of ``buf[:, :channels]`` into ``out`` for the batch-norm backward kernel (3-5x
    faster on dense input)."""
    return out.copy_(buf[:, :channels])


def _norm_relu(
    x: Tensor, bn: nn.BatchNorm2d, training: bool, fmt: torch.memory_format
) -> tuple[Tensor, _Stats]:
    """relu(BN(x)) as a fresh forward computes it: in training one native kernel computes the batch
    statistics, normalises and updates the running statistics. Returns the output and the stats."""
    if not training:
        stats = _layer_stats(bn, None)
        return _bn_relu(x, bn, stats), stats
    factor = _ema_factor(bn)
    x = x.contiguous(memory_format=fmt)
    out, mean, invstd = torch.native_batch_norm(
        x, bn.weight, bn.bias, bn.running_mean, bn.running_var, True, factor, bn.eps
    )
    var = invstd.reciprocal().square_().sub_(bn.eps)  # what the recompute's inference kernel takes
    return out.relu_(), _Stats(mean, var, True, invstd)


def _bn_backward(
    grad: Tensor, x: Tensor, bn: nn.BatchNorm2d, stats: _Stats, fmt: torch.memory_format
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of BN w.r.t. input, weight and bias (training mode: through the batch stats).

    The kernel wants the weight in the statistics' dtype: with bf16/fp16 parameters the shared
    batch statistics are float32 (see :func:`_batch_stats`), so the weight goes in as float32 (the
    kernels' mixed-precision case, bf16/fp16 activations with float parameters) and its gradients
    come back in the parameter's dtype.
    """
    x = x.contiguous(memory_format=fmt)
    weight = bn.weight.to(stats.mean.dtype)
    if stats.train:
        invstd = stats.invstd if stats.invstd is not None else torch.rsqrt(stats.var + bn.eps)
        dx, dg, db = torch.ops.aten.native_batch_norm_backward(
            grad, x, weight, None, None, stats.mean, invstd, True, bn.eps, [True, True, True]
        )
    else:
        dx, dg, db = torch.ops.aten.native_batch_norm_backward(
            grad, x, weight, stats.mean, stats.var, None, None, False, bn.eps, [True, True, True]
        )
    return dx, dg.to(bn.weight.dtype), db.to(bn.weight.dtype)


def _conv(x: Tensor, conv: nn.Conv2d, dtype: torch.dtype) -> Tensor:
    return F.conv2d(x, conv.weight.to(dtype), None, conv.stride, conv.padding, conv.dilation, conv.groups)


def _conv_backward(
    grad: Tensor, x: Tensor, conv: nn.Conv2d, need_input: bool = True
) -> tuple[Tensor, Tensor]:
    """Native convolution backward: (grad_input, grad_weight in the parameter's dtype)."""
    w = conv.weight.to(x.dtype)
    gx, gw, _ = torch.ops.aten.convolution_backward(
        grad,
        x,
        w,
        None,
        conv.stride,
        conv.padding,
        conv.dilation,
        False,
        [0, 0],
        conv.groups,
        [need_input, True, False],
    )
    return gx, gw.to(conv.weight.dtype)


def _relu_backward_(grad: Tensor, out: Tensor) -> Tensor:
    """ReLU backward written into ``grad`` itself (it is a temporary we own)."""
    return torch.ops.aten.threshold_backward.grad_input(grad, out, 0, grad_input=grad)


# ---------------------------------------------------------------------------------------------
# Execution context shared by the Functions.
# ---------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    """Everything a Function needs besides tensors: the modules, mode and execution settings."""

    modules: list[nn.Module]
    mode: str
    training: bool
    dtype: torch.dtype
    fmt: torch.memory_format
    autocast: tuple[str, bool] = ("cpu", False)
    kind: str = "block"  # "block", "transition" or "stem"
    graph: bool = True  # a backward will follow (autograd is recording)
    keep: tuple[bool, ...] = ()  # blocks: which layers keep their bottleneck output for backward


def _memory_format(x: Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The activation dtype: autocast's low-precision type when active (convolutions run in it)."""
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.is_floating_point():
        return torch.get_autocast_dtype(device)
    return x.dtype


def _check_norms(norms: list[nn.Module]) -> None:
    for bn in norms:
        if isinstance(bn, nn.SyncBatchNorm):
            raise NotImplementedError(
                "SyncBatchNorm is not supported by the memory-efficient engine (its batch statistics are "
                "per process); use memory_efficient=False with SyncBatchNorm, or plain BatchNorm with DDP"
            )
        if not isinstance(bn, nn.BatchNorm2d) or not bn.affine or not bn.track_running_stats:
            raise NotImplementedError(
                f"the memory-efficient engine expects affine nn.BatchNorm2d layers tracking running stats, "
                f"found {bn!r}; use memory_efficient=False"
            )


def _needs_graph(tensors: list[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _plan(
    modules: list[nn.Module], mode: str, x: Tensor, training: bool, kind: str, params: list[Tensor]
) -> _Plan:
    dtype = _compute_dtype(x)
    device = x.device.type
    return _Plan(
        modules,
        mode,
        training,
        dtype,
        _memory_format(x),
        (device, torch.is_autocast_enabled(device)),
        kind,
        _needs_graph([x, *params]),
    )


# ---------------------------------------------------------------------------------------------
# Dense block.
# ---------------------------------------------------------------------------------------------


def _block_forward(x: Tensor, plan: _Plan) -> tuple[Tensor, dict[str, Any]]:
    """Run a dense block into one buffer. Returns the buffer and what backward needs."""
    layers = plan.modules
    n, c0, h, w = x.shape
    k = layers[0].conv2.out_channels
    channels = c0 + k * len(layers)
    buf = torch.empty((n, channels, h, w), dtype=plan.dtype, device=x.device, memory_format=plan.fmt)
    buf[:, :c0].copy_(x)
    count = n * h * w

    batch: _Stats | None = None
    if plan.training:
        stat_dtype = torch.promote_types(plan.dtype, torch.float32)
        mean = torch.empty(channels, dtype=stat_dtype, device=x.device)
        var = torch.empty_like(mean)
        m, v = _batch_stats(buf[:, :c0])
        mean[:c0], var[:c0] = m, v
        batch = _Stats(mean, var, True)

    stats1, stats2, bottlenecks, masks = [], [], [], []
    scratch = _Scratch(buf, channels - k, plan.fmt)
    for i, layer in enumerate(layers):
        c = c0 + i * k
        s1 = _layer_stats(layer.norm1, batch.narrow(c) if batch is not None else None)
        if plan.training:
            _update_running(layer.norm1, s1, count)
        z1 = _bn_relu(buf[:, :c], layer.norm1, s1, out=scratch.view(c))
        bottleneck = _conv(z1, layer.conv1, plan.dtype)
        del z1
        z2, s2 = _norm_relu(bottleneck, layer.norm2, plan.training, plan.fmt)
        y = _conv(z2, layer.conv2, plan.dtype)
        del z2
        mask = None
        if layer.drop_rate > 0 and plan.training:
            y, mask = torch.native_dropout(y, layer.drop_rate, True)
        buf[:, c : c + k].copy_(y)
        if batch is not None and i + 1 < len(layers):  # the last layer's channels feed no later layer
            m, v = _batch_stats(y)
            mean[c : c + k], var[c : c + k] = m, v
        stats1.append(s1)
        stats2.append(s2)
        bottlenecks.append(bottleneck if plan.keep[i] else None)
        masks.append(mask)
    return buf, {
        "stats1": stats1,
        "stats2": stats2,
        "bottlenecks": bottlenecks,
        "masks": masks,
        "c0": c0,
        "k": k,
    }


def _block_backward(
    grad: Tensor, buf: Tensor, plan: _Plan, saved: dict[str, Any]
) -> tuple[Tensor, list[Tensor]]:
    """Reverse walk over the layers; returns the input gradient and per-layer parameter gradients.

    Temporaries are released as soon as they are consumed, so the transient peak is about three
    ``c_l``-channel tensors.
    """
    layers, fmt, c0, k = plan.modules, plan.fmt, saved["c0"], saved["k"]
    bottlenecks = list(saved["bottlenecks"])
    gbuf = grad.to(plan.dtype).clone(memory_format=fmt)  # the one gradient buffer, accumulated in place
    del grad
    param_grads: list[Tensor] = [None] * (6 * len(layers))  # type: ignore[list-item]
    # z1 is dead (after the ReLU backward) before the input copy for BN backward is made: one
    # scratch serves both.
    scratch = _Scratch(buf, c0 + k * (len(layers) - 1), fmt)
    for i in reversed(range(len(layers))):
        layer, c = layers[i], c0 + i * k
        s1, s2 = saved["stats1"][i], saved["stats2"][i]
        dy = gbuf[:, c : c + k].contiguous(memory_format=fmt)
        mask = saved["masks"][i]
        if mask is not None:
            dy = torch.ops.aten.native_dropout_backward(dy, mask, 1.0 / (1.0 - layer.drop_rate))
        z1 = _bn_relu(buf[:, :c], layer.norm1, s1, out=scratch.view(c))
        bottleneck, bottlenecks[i] = bottlenecks[i], None
        if bottleneck is None:  # not kept (max_saving): recompute the 1x1 convolution too
            bottleneck = _conv(z1, layer.conv1, plan.dtype)
        z2 = _bn_relu(bottleneck, layer.norm2, s2)
        dz2, dw2 = _conv_backward(dy, z2, layer.conv2)
        del dy
        _relu_backward_(dz2, z2)
        del z2
        db, dg2, dbeta2 = _bn_backward(dz2, bottleneck, layer.norm2, s2, fmt)
        del dz2, bottleneck
        dz1, dw1 = _conv_backward(db, z1, layer.conv1)
        del db
        _relu_backward_(dz1, z1)
        del z1
        dx, dg1, dbeta1 = _bn_backward(dz1, _prefix_copy(buf, c, scratch.view(c)), layer.norm1, s1, fmt)
        del dz1
        gbuf[:, :c].add_(dx)
        del dx
        param_grads[6 * i : 6 * i + 6] = [dg1, dbeta1, dw1, dg2, dbeta2, dw2]
    return gbuf[:, :c0], param_grads


def _layer_params(layers: list[nn.Module]) -> list[Tensor]:
    """Parameters in the order the block Function receives (and returns gradients for) them."""
    out: list[Tensor] = []
    for layer in layers:
        out += [layer.norm1.weight, layer.norm1.bias, layer.conv1.weight]
        out += [layer.norm2.weight, layer.norm2.bias, layer.conv2.weight]
    return out


class _Bound:
    """A module as backward sees it: the module's settings (eps, stride, drop rate, ...) with the
    tensors that went through ``save_for_backward`` in place of the module's own attributes.

    Backward must compute with the tensors forward used. Reading them from ``ctx.saved_tensors``
    makes autograd check their version counters; reading them from here (not from the module)
    also keeps a parameter that was *replaced* on the module after forward out of the backward.
    """

    def __init__(self, module: nn.Module, **tensors: Any) -> None:
        self._module = module
        self.__dict__.update(tensors)

    def __getattr__(self, name: str) -> Any:  # only reached for what was not bound above
        return getattr(self._module, name)


def _bind_layers(layers: list[nn.Module], params: list[Tensor]) -> list[Any]:
    """Dense layers bound to saved parameters, in the order of :func:`_layer_params`."""
    bound = []
    for i, layer in enumerate(layers):
        g1, b1, w1, g2, b2, w2 = params[6 * i : 6 * i + 6]
        bound.append(
            _Bound(
                layer,
                norm1=_Bound(layer.norm1, weight=g1, bias=b1),
                conv1=_Bound(layer.conv1, weight=w1),
                norm2=_Bound(layer.norm2, weight=g2, bias=b2),
                conv2=_Bound(layer.conv2, weight=w2),
            )
        )
    return bound


class _DenseBlockFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, plan: _Plan, *params: Tensor) -> Tensor:
        with torch.autocast(plan.autocast[0], enabled=False):
            buf, saved = _block_forward(x, plan)
        # Tensors go through save_for_backward so autograd frees them right after this block's
        # backward (and keeps them when retain_graph=True), and so that reading them in backward
        # checks their version counters: a parameter changed in place between forward and
        # backward raises autograd's "modified by an inplace operation" error, as the naive path
        # does, instead of silently giving gradients of the new values. ctx keeps only
        # statistics (fresh tensors nobody else can reach) and layout.
        bottlenecks, masks = saved.pop("bottlenecks"), saved.pop("masks")
        saved["has_bottleneck"] = [b is not None for b in bottlenecks]
        saved["has_mask"] = [m is not None for m in masks]
        ctx.plan, ctx.saved, ctx.input_dtype, ctx.n_params = plan, saved, x.dtype, len(params)
        ctx.save_for_backward(
            buf,
            *params,
            *[b for b in bottlenecks if b is not None],
            *[m for m in masks if m is not None],
        )
        return buf

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        buf, *rest = ctx.saved_tensors
        params, rest = rest[: ctx.n_params], rest[ctx.n_params :]
        saved = dict(ctx.saved)
        saved["bottlenecks"] = _unpack(rest, saved["has_bottleneck"])
        saved["masks"] = _unpack(rest[sum(saved["has_bottleneck"]) :], saved["has_mask"])
        plan = replace(ctx.plan, modules=_bind_layers(ctx.plan.modules, params))
        with torch.autocast(plan.autocast[0], enabled=False):
            gx, param_grads = _block_backward(grad, buf, plan, saved)
        return (gx.to(ctx.input_dtype), None, *param_grads)


def _unpack(tensors: list[Tensor], present: list[bool]) -> list[Tensor | None]:
    """Re-insert ``None`` where a layer saved nothing (inverse of filtering before save_for_backward)."""
    it = iter(tensors)
    return [next(it) if p else None for p in present]


def _empty_block(layers: list[nn.Module], x: Tensor) -> Tensor:
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


def block_keeps(setting: str | tuple[bool, ...], layers: int) -> tuple[bool, ...]:
    """Per-layer "keeps its bottleneck" flags of an engine block setting: ``"efficient"`` keeps
    every one, ``"max_saving"`` none, a tuple says per layer (see :mod:`.memory_plan`).

    >>> block_keeps("max_saving", 3), block_keeps((False, True), 2)
    ((False, False, False), (False, True))
    """
    if isinstance(setting, tuple):
        if len(setting) != layers:
            raise UsageError(f"expected {layers} per-layer flags for this block, got {len(setting)}")
        return setting
    if setting not in (EFFICIENT, MAX_SAVING):
        raise UsageError(
            f"an engine block runs 'efficient', 'max_saving' or per-layer flags, got {setting!r}"
        )
    return (setting == EFFICIENT,) * layers


@torch.compiler.disable
def dense_block(block: nn.Module, x: Tensor, setting: str | tuple[bool, ...]) -> Tensor:
    """Run ``block`` (a torchvision-layout ``_DenseBlock``) with the engine; returns the concatenated
    features. ``setting``: ``"efficient"``, ``"max_saving"`` or per-layer flags (:func:`block_keeps`)."""
    layers = list(block.values())
    _check_norms([m for layer in layers for m in (layer.norm1, layer.norm2)])
    keep = block_keeps(setting, len(layers))
    if x.shape[0] == 0:
        return _empty_block(layers, x)
    params = _layer_params(layers)
    mode = EFFICIENT if all(keep) else MAX_SAVING
    plan = replace(_plan(layers, mode, x, block.training, "block", params), keep=keep)
    if not plan.graph:
        with torch.no_grad(), torch.autocast(plan.autocast[0], enabled=False):
            return _block_forward(x, plan)[0]
    return _DenseBlockFunction.apply(x, plan, *params)


# ---------------------------------------------------------------------------------------------
# Transition (BN-ReLU-[pool, conv1x1]) and ImageNet stem (BN-ReLU-maxpool): keep only the input.
# ---------------------------------------------------------------------------------------------


def _keeps_pool_indices(plan: _Plan) -> bool:
    """The stem in ``"efficient"`` mode saves its max-pool indices instead of recomputing them
    (only when a backward will come: a no-grad forward has nothing to keep them for)."""
    return plan.kind == "stem" and plan.mode == EFFICIENT and plan.training and plan.graph


def _pool_args(pool: nn.MaxPool2d) -> list[Any]:
    return [
        _pair(pool.kernel_size),
        _pair(pool.stride),
        _pair(pool.padding),
        _pair(pool.dilation),
        pool.ceil_mode,
    ]


def _tail_forward(z: Tensor, plan: _Plan) -> tuple[Tensor, list[Tensor]]:
    """The tail's output, and what the stem keeps for backward besides its input (see module doc)."""
    if plan.kind == "transition":
        return _conv(F.avg_pool2d(z, 2, 2), plan.modules[1], plan.dtype), []
    args = _pool_args(plan.modules[1])
    if _keeps_pool_indices(plan):
        out, idx = torch.ops.aten.max_pool2d_with_indices(z, *args)
        return out, [idx, out > 0]  # at the max position relu's mask is the pooled value's sign
    return torch.ops.aten.max_pool2d(z, *args), []


def _tail_backward(grad: Tensor, z: Tensor, plan: _Plan) -> tuple[Tensor, Tensor | None]:
    """Gradient w.r.t. the ReLU output z (and the transition conv's weight)."""
    if plan.kind == "transition":
        pooled = F.avg_pool2d(z, 2, 2)
        dpooled, dw = _conv_backward(grad.contiguous(memory_format=plan.fmt), pooled, plan.modules[1])
        dz = torch.ops.aten.avg_pool2d_backward(dpooled, z, [2, 2], [2, 2], [0, 0], False, True, None)
        return dz, dw
    args = _pool_args(plan.modules[1])
    _, idx = torch.ops.aten.max_pool2d_with_indices(z, *args)
    return torch.ops.aten.max_pool2d_with_indices_backward(grad, z, *args, idx), None


def _pair(v: int | tuple[int, int]) -> list[int]:
    return list(v) if isinstance(v, (tuple, list)) else [v, v]


class _NormReluTailFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, plan: _Plan, *params: Tensor) -> Tensor:
        ctx.plan, ctx.input_dtype, ctx.n_params = plan, x.dtype, len(params)
        with torch.autocast(plan.autocast[0], enabled=False):
            x = x.to(plan.dtype)
            z, ctx.stats = _norm_relu(x, plan.modules[0], plan.training, plan.fmt)
            out, kept = _tail_forward(z, plan)
        # Parameters too, so backward's read of them is version-checked (see _DenseBlockFunction).
        ctx.save_for_backward(x, *params, *kept)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        x, *rest = ctx.saved_tensors
        params, kept = rest[: ctx.n_params], rest[ctx.n_params :]
        plan = replace(ctx.plan, modules=_bind_tail(ctx.plan.modules, params))
        bn = plan.modules[0]
        with torch.autocast(plan.autocast[0], enabled=False):
            grad = grad.to(plan.dtype)
            if kept:  # stem with saved indices: mask by relu's sign, scatter to the max positions
                idx, positive = kept
                dz = torch.ops.aten.max_pool2d_with_indices_backward(
                    grad * positive, x, *_pool_args(plan.modules[1]), idx
                )
                dw = None
            else:
                z = _bn_relu(x, bn, ctx.stats)
                dz, dw = _tail_backward(grad, z, plan)
                _relu_backward_(dz, z)
                del z
            dx, dg, dbeta = _bn_backward(dz, x, bn, ctx.stats, plan.fmt)
        return (dx.to(ctx.input_dtype), None, dg, dbeta) + ((dw,) if dw is not None else ())


def _tail_params(modules: list[nn.Module], kind: str) -> list[Tensor]:
    """The BN's affine parameters, and the transition's convolution weight."""
    return [modules[0].weight, modules[0].bias] + ([modules[1].weight] if kind == "transition" else [])


def _bind_tail(modules: list[nn.Module], params: list[Tensor]) -> list[Any]:
    """``[norm, conv-or-pool]`` bound to the saved parameters (inverse of :func:`_tail_params`)."""
    norm = _Bound(modules[0], weight=params[0], bias=params[1])
    return [norm, _Bound(modules[1], weight=params[2]) if len(params) > 2 else modules[1]]


def _norm_relu_tail(
    x: Tensor, modules: list[nn.Module], kind: str, training: bool, mode: str = EFFICIENT
) -> Tensor:
    _check_norms([modules[0]])
    if x.shape[0] == 0:  # an empty batch: the modules' own forward (see _empty_block)
        z = F.relu(modules[0](x))
        if kind == "transition":
            return F.avg_pool2d(modules[1](z), 2, 2)
        return modules[1](z)
    params = _tail_params(modules, kind)
    plan = _plan(modules, mode, x, training, kind, params)
    if not plan.graph:
        with torch.no_grad(), torch.autocast(plan.autocast[0], enabled=False):
            x = x.to(plan.dtype)
            return _tail_forward(_norm_relu(x, modules[0], plan.training, plan.fmt)[0], plan)[0]
    return _NormReluTailFunction.apply(x, plan, *params)


@torch.compiler.disable
def transition(module: nn.Module, x: Tensor) -> Tensor:
    """``pool(conv(relu(norm(x))))`` of a torchvision ``_Transition``, storing only ``x`` for backward."""
    return _norm_relu_tail(x, [module.norm, module.conv], "transition", module.training)


@torch.compiler.disable
def stem(norm: nn.BatchNorm2d, pool: nn.MaxPool2d, x: Tensor, mode: str = EFFICIENT) -> Tensor:
    """``pool0(relu0(norm0(x)))`` of the ImageNet stem (x is conv0's output) for backward storing
    ``x`` and, in ``"efficient"`` mode, the pooling indices and the sign of the output."""
    return _norm_relu_tail(x, [norm, pool], "stem", norm.training, resolve_mode(mode))
