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
* One autograd Function per block (under ``torch.compile``: one custom op, :mod:`.ops`) saves the buffer, the per-channel statistics and, per mode,
  each layer's bottleneck output ``b_l`` (``"efficient"``) or nothing (``"max_saving"``, which
  recomputes the 1x1 convolution). Backward walks the layers in reverse, recomputes
  ``relu(BN(.))`` from the buffer with the saved statistics, and accumulates every slice's
  gradient into one gradient buffer in place: the gradient of ``y_l`` is complete when layer
  ``l`` is reached because only later layers read it.
* The batch-norm input gradient is linear in its upstream gradient, so each layer's BN backward
  (``native_batch_norm_backward`` with the shared ``mean`` and ``invstd``, the latter computed
  once per block) can be computed on its own
  and summed into the gradient buffer; the sum equals the gradient of the concatenated model.
* Transitions (BN-ReLU-conv1x1-avgpool) keep only their input and recompute BN+ReLU in backward;
  the final ``norm5`` + ReLU keeps its output, as naive's in-place ReLU does.
  The transition pools before its 1x1 convolution: both are linear maps acting on different
  axes, so they commute, and the convolution runs on a quarter of the pixels. The ImageNet stem
  (BN-ReLU-maxpool after conv0) does the same in ``"max_saving"``; in ``"efficient"`` it also
  keeps the max-pool indices and the sign of the pooled output (a quarter-size int64 and bool
  tensor), so its backward is one masked scatter and the BN backward, with no recompute of the
  largest activation of the network.

Every kernel is a native ATen op, and a block issues no more of them than torchvision's layers
(on a GPU the step is bound by how fast they are issued; docs/measurement.md, "Ops per step"):

* statistics of new channels: ``batch_norm_update_stats``, written into the block's statistics
  by one ``stack``; BN with fixed statistics: the inference kernel (``native_batch_norm.out``
  into a reusable scratch; on CPU on a dense copy of the view, 2-3x faster than the strided read);
* BN with its own batch statistics (``norm2``, transitions, stem, ``norm5``) and its backward:
  ``_batch_norm_with_update`` and ``batch_norm_backward`` with the forward's reserve, the pair
  that selects cuDNN on CUDA as ``F.batch_norm`` does; the recompute in backward runs it again
  (running statistics go to stand-in buffers) rather than saving its statistics;
* running statistics and ``num_batches_tracked`` of a whole block: one ``_foreach_lerp_`` and one
  ``_foreach_add_`` (exact: nothing reads them in between), with the cumulative factor
  ``1 / num_batches_tracked`` computed on the device, so a step never reads a tensor on the host;
* autocast's weight casts and their gradients' casts back: one ``_foreach_copy_`` per block.

Per-layer temporaries live in one reusable scratch allocation. The engine does the naive path's
work minus the concatenation copies and the per-layer statistics passes, plus one elementwise
BN+ReLU recompute per layer in backward.

Modes
-----
``"naive"`` (``False``, the models' default): torchvision's computation. ``"efficient"``
(``True``): keeps bottlenecks, recomputes only BN+ReLU. ``"max_saving"``: keeps only the buffers
and recomputes the 1x1 convolution too. Between the two, a block runs with per-layer flags
(``_Plan.keep``): each layer keeps its bottleneck or recomputes it; :mod:`.memory_plan` is the
user-facing form of that dial and :mod:`.planner` its memory model.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
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

_aten = torch.ops.aten
_ALL_GRADS = [True, True, True]


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Batch statistics are kept in float32 at least (bf16/fp16 activations), as nn.BatchNorm does."""
    return torch.promote_types(dtype, torch.float32)


def _param(t: Tensor, dtype: torch.dtype) -> Tensor:
    """A BN parameter in the dtype the kernels want beside ``dtype`` statistics (a no-op unless the
    model's own parameters are bf16/fp16)."""
    return t if t.dtype == dtype else t.to(dtype)


def _apply_bn(x: Tensor, bn: nn.BatchNorm2d, stats: _Stats, out: Tensor, unused: Tensor) -> Tensor:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` with fixed statistics, written into ``out``
    (which may be ``x``): the inference batch-norm kernel, one native call. ``unused``: an empty
    tensor for the kernel's statistics outputs, which inference leaves untouched."""
    dtype = stats.mean.dtype
    if unused.numel():  # meta and fake kernels resize the statistics outputs the real one leaves alone
        unused.resize_(0)
    _aten.native_batch_norm.out(
        x, _param(bn.weight, dtype), _param(bn.bias, dtype), stats.mean, _param(stats.var, dtype), False,
        0.0, bn.eps, out=out, save_mean=unused, save_invstd=unused,
    )
    return out


class _Dummies:
    """Stand-in running buffers for batch-norm kernels that must not touch the real ones.

    ``_batch_norm_with_update`` (the op that selects cuDNN on CUDA, like ``F.batch_norm``) always
    updates the running buffers it is given; a recompute in backward passes these with momentum 0.
    """

    def __init__(self, like: Tensor, channels: int, dtype: torch.dtype) -> None:
        self.mean = torch.empty(channels, dtype=dtype, device=like.device)
        self.var = torch.empty(channels, dtype=dtype, device=like.device)

    def narrow(self, channels: int) -> tuple[Tensor, Tensor]:
        return self.mean[:channels], self.var[:channels]


def _bn_train(x: Tensor, bn: nn.BatchNorm2d, dummies: _Dummies | None, updates: _RunningUpdates | None):
    """Training batch norm of ``x`` with its own batch statistics: ``(out, mean, invstd, reserve)``.

    With ``updates`` the running statistics are updated exactly once: inside the kernel when the
    momentum is a number, else (``momentum=None``, the cumulative average, whose factor lives on the
    device; or buffers in bf16/fp16, which the kernel refuses beside float statistics) queued in
    ``updates``. Without, ``dummies`` absorb the kernel's update (a recompute).
    """
    dtype = _stat_dtype(x.dtype)
    weight, bias = _param(bn.weight, dtype), _param(bn.bias, dtype)
    c = x.shape[1]
    target = updates.kernel_target(bn, dtype) if updates is not None else None
    if target is not None:
        return _aten._batch_norm_with_update.default(x, weight, bias, *target, bn.eps)
    if dummies is None:
        dummies = _Dummies(x, c, dtype)
    rm, rv = dummies.narrow(c)
    out, mean, invstd, reserve = _aten._batch_norm_with_update.default(x, weight, bias, rm, rv, 0.0, bn.eps)
    if updates is not None:  # momentum None, low-precision buffers or deferred: queue the update
        updates.add(bn, mean, invstd.pow(-2).sub_(bn.eps).mul_(updates.bessel))
    return out, mean, invstd, reserve


def _bn_train_backward(
    grad: Tensor, x: Tensor, bn: nn.BatchNorm2d, mean: Tensor, invstd: Tensor, reserve: Tensor, dummies: _Dummies
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of :func:`_bn_train` through ``batch_norm_backward``: on CUDA it runs cuDNN's kernel
    where ``F.batch_norm`` would (``reserve`` is what the forward kernel returned), else ATen's."""
    rm, rv = dummies.narrow(x.shape[1])
    dx, dg, db = _aten.batch_norm_backward.default(
        grad, x, _param(bn.weight, mean.dtype), rm, rv, mean, invstd, True, bn.eps, _ALL_GRADS, reserve
    )
    return dx, dg.to(bn.weight.dtype), db.to(bn.weight.dtype)


def _bn_fixed_backward(
    grad: Tensor, x: Tensor, bn: nn.BatchNorm2d, stats: _Stats
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of a BN applied with fixed statistics: the block's shared batch statistics
    (training: the gradient flows through mean and variance) or the running ones (eval)."""
    weight = _param(bn.weight, stats.mean.dtype)
    if stats.invstd is not None:
        dx, dg, db = _aten.native_batch_norm_backward.default(
            grad, x, weight, None, None, stats.mean, stats.invstd, True, bn.eps, _ALL_GRADS
        )
    else:
        dx, dg, db = _aten.native_batch_norm_backward.default(
            grad, x, weight, stats.mean, stats.var, None, None, False, bn.eps, _ALL_GRADS
        )
    return dx, dg.to(bn.weight.dtype), db.to(bn.weight.dtype)


def _bn_eval(x: Tensor, bn: nn.BatchNorm2d) -> Tensor:
    """Inference batch norm with the running statistics (one kernel)."""
    dtype = _stat_dtype(x.dtype)
    w, b = _param(bn.weight, dtype), _param(bn.bias, dtype)
    rm, rv = _param(bn.running_mean, dtype), _param(bn.running_var, dtype)
    return torch.native_batch_norm(x, w, b, rm, rv, False, 0.0, bn.eps)[0]


@dataclass
class _Stats:
    """Fixed per-channel statistics a layer's ``norm1`` applies: a prefix of the block's shared batch
    statistics in training (``invstd`` set in backward), the layer's running statistics in eval."""

    mean: Tensor
    var: Tensor  # biased batch variance, or the running variance
    invstd: Tensor | None = None  # training only: 1/sqrt(var + eps), for the backward kernel


class _RunningUpdates:
    """Running-statistics updates of a block, applied together at its end (one ``_foreach`` kernel per
    kind instead of several ops per BN). Exact: nothing reads a running statistic in between.

    nn.BatchNorm's rule: ``running = (1 - f) * running + f * batch`` with the unbiased batch variance,
    ``f = momentum``, or ``1 / num_batches_tracked`` when ``momentum is None`` (computed on the
    device, so a training step never synchronises with the host).
    """

    def kernel_target(self, bn: Any, dtype: torch.dtype) -> tuple[Tensor, Tensor, float] | None:
        """The running buffers and momentum a BN kernel applies ``bn``'s update to itself (see
        :func:`_bn_train`), or ``None`` when the update must be queued (``momentum=None``, whose
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


class _DeferredUpdates(_RunningUpdates):
    """The batch statistics a running-statistics update needs, collected instead of applied: a
    custom op (:mod:`.ops`) must not mutate its inputs, so it returns them and its caller, which
    the compiler traces, applies them with :class:`_RunningUpdates`.

    Each BN kernel writes its batch mean and unbiased variance itself, into a zeroed slot of
    ``batch`` (``[2, slots, channels]``) with momentum 1 (``1 * batch + 0 * 0``: exact), so
    collecting them costs no kernel.
    """

    def __init__(self, count: int, batch: Tensor) -> None:
        super().__init__(count)
        self.slots = batch.view(2, -1, batch.shape[-1])  # [2, C] (a tail) or [2, layers, C] (a block)
        self.used = 0
        self.shared: Tensor | None = None

    def kernel_target(self, bn: Any, dtype: torch.dtype) -> tuple[Tensor, Tensor, float]:
        i, self.used = self.used, self.used + 1
        return self.slots[0, i], self.slots[1, i], 1.0

    def add(self, bn: Any, mean: Tensor, var: Tensor) -> None:
        raise RuntimeError("deferred statistics are written by the kernels (kernel_target)")

    def add_shared(self, norms: list[Any], mean: Tensor, var: Tensor) -> None:
        self.shared = var  # the mean is the block statistics' own row

    def flush(self) -> None:
        raise RuntimeError("deferred running-statistics updates are applied by the caller")


def _count_batches(norms: list[nn.BatchNorm2d]) -> None:
    """``num_batches_tracked += 1`` for every BN of a block, as one kernel."""
    counters = [bn.num_batches_tracked for bn in norms if bn.num_batches_tracked is not None]
    if counters:
        torch._foreach_add_(counters, 1)


class _Scratch:
    """One reusable allocation for per-layer temporaries of up to ``channels`` channels.

    On CPU every fresh large tensor costs a page fault per 4 KiB when first written, which made
    these temporaries as expensive as the arithmetic on them; views into one buffer sized for the
    widest layer avoid that without raising the peak (the temporaries existed anyway).
    """

    def __init__(self, like: Tensor, channels: int, fmt: torch.memory_format) -> None:
        n, _, h, w = like.shape
        self.flat = torch.empty(n * channels * h * w, dtype=like.dtype, device=like.device)
        self.n, self.h, self.w, self.fmt = n, h, w, fmt
        self.unused = torch.empty(0, dtype=_stat_dtype(like.dtype), device=like.device)

    def view(self, channels: int) -> Tensor:
        data = self.flat[: self.n * channels * self.h * self.w]
        if self.fmt == torch.channels_last:
            return data.view(self.n, self.h, self.w, channels).permute(0, 3, 1, 2)
        return data.view(self.n, channels, self.h, self.w)


def _cast_all(tensors: list[Tensor], dtypes: list[torch.dtype]) -> list[Tensor]:
    """``[t.to(d) for t, d in zip(tensors, dtypes)]`` as one kernel: autocast's weight casts (and
    their gradients' casts back) a block at a time instead of one op per convolution."""
    if all(t.dtype == d for t, d in zip(tensors, dtypes, strict=True)):
        return list(tensors)
    out = [torch.empty_like(t, dtype=d) for t, d in zip(tensors, dtypes, strict=True)]
    torch._foreach_copy_(out, tensors)
    return out


def _conv_weights(layers: list[Any], dtype: torch.dtype) -> list[Tensor]:
    """Every convolution weight of a block (conv1, conv2 per layer) in the compute dtype."""
    params = [p for layer in layers for p in (layer.conv1.weight, layer.conv2.weight)]
    return _cast_all(params, [dtype] * len(params))


def _conv(x: Tensor, conv: nn.Conv2d, weight: Tensor) -> Tensor:
    return F.conv2d(x, weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)


def _conv_backward(grad: Tensor, x: Tensor, conv: nn.Conv2d, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Native convolution backward: (grad_input, grad_weight in ``weight``'s dtype)."""
    gx, gw, _ = _aten.convolution_backward.default(
        grad, x, weight, None, conv.stride, conv.padding, conv.dilation, False, [0, 0], conv.groups,
        [True, True, False],
    )
    return gx, gw


def _relu_backward_(grad: Tensor, out: Tensor) -> Tensor:
    """ReLU backward written into ``grad`` itself (it is a temporary we own)."""
    return _aten.threshold_backward.grad_input(grad, out, 0, grad_input=grad)


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
    graph: bool = True  # a backward will follow (autograd is recording)
    keep: tuple[bool, ...] = ()  # blocks: which layers keep their bottleneck output for backward
    dense_copy: bool = False  # BN with fixed statistics on a dense copy (CPU), see _copies_for_dense_kernel


class _BN(NamedTuple):
    """A BatchNorm2d as the kernels read it, taken from the module once per call: module attribute
    reads go through ``nn.Module.__getattr__`` in Python, which at small batches cost more than the
    kernels themselves. Backward swaps in the saved parameters (:meth:`_Layer.bind`)."""

    weight: Tensor
    bias: Tensor
    running_mean: Tensor
    running_var: Tensor
    num_batches_tracked: Tensor | None
    momentum: float | None
    eps: float

    @classmethod
    def of(cls, bn: nn.BatchNorm2d) -> _BN:
        return cls(bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked, bn.momentum, bn.eps)

    @property
    def num_features(self) -> int:
        return self.weight.shape[0]


class _Conv(NamedTuple):
    """A Conv2d's weight and settings (see :class:`_BN`)."""

    weight: Tensor
    stride: Any
    padding: Any
    dilation: Any
    groups: int

    @classmethod
    def of(cls, conv: nn.Conv2d) -> _Conv:
        return cls(conv.weight, conv.stride, conv.padding, conv.dilation, conv.groups)


class _Layer(NamedTuple):
    """A torchvision ``_DenseLayer`` as the engine reads it (see :class:`_BN`)."""

    norm1: _BN
    conv1: _Conv
    norm2: _BN
    conv2: _Conv
    drop_rate: float

    @classmethod
    def of(cls, layer: nn.Module) -> _Layer:
        return cls(
            _BN.of(layer.norm1), _Conv.of(layer.conv1), _BN.of(layer.norm2), _Conv.of(layer.conv2),
            float(layer.drop_rate),
        )

    def params(self) -> list[Tensor]:
        """The parameters in the order the block Function receives (and returns gradients for) them."""
        n1, n2 = self.norm1, self.norm2
        return [n1.weight, n1.bias, self.conv1.weight, n2.weight, n2.bias, self.conv2.weight]

    def bind(self, p: list[Tensor]) -> _Layer:
        """The layer with the tensors that went through ``save_for_backward`` as its parameters.

        Backward must compute with the tensors forward used: reading them from
        ``ctx.saved_tensors`` makes autograd check their version counters, and a parameter
        *replaced* on the module after forward stays out of the backward.
        """
        return self._replace(
            norm1=self.norm1._replace(weight=p[0], bias=p[1]),
            conv1=self.conv1._replace(weight=p[2]),
            norm2=self.norm2._replace(weight=p[3], bias=p[4]),
            conv2=self.conv2._replace(weight=p[5]),
        )


def _memory_format(x: Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _autocast_on(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (never where it does not exist: ``meta``)."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def no_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast off for ``device_type`` inside (a no-op where autocast does not exist: ``meta``)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The activation dtype: autocast's low-precision type when active (convolutions run in it)."""
    device = x.device.type
    if _autocast_on(device) and x.is_floating_point():
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


def _plan(modules: list[nn.Module], mode: str, x: Tensor, training: bool, params: list[Tensor]) -> _Plan:
    dtype = _compute_dtype(x)
    device = x.device.type
    return _Plan(
        modules,
        mode,
        training,
        dtype,
        _memory_format(x),
        (device, _autocast_on(device)),
        _needs_graph([x, *params]),
        dense_copy=_copies_for_dense_kernel(x.device),
    )


# ---------------------------------------------------------------------------------------------
# Dense block.
# ---------------------------------------------------------------------------------------------


class _BlockStats:
    """The batch statistics of a block's channels, each measured once, when its channel is written.

    ``rows[0]`` is the mean and ``rows[1]`` the biased variance of every channel a later layer
    normalises; layer ``l``'s ``norm1`` reads the prefix ``[:c_l]`` of both (views, no copies).
    """

    def __init__(self, like: Tensor, channels: int, dummies: int, dtype: torch.dtype) -> None:
        self.rows = torch.empty(2, channels, dtype=dtype, device=like.device)
        self.mean, self.var = self.rows.unbind(0)
        self.dummies = _Dummies(like, max(channels, dummies), dtype)  # also serve norm2's kernels

    @classmethod
    def of_rows(cls, rows: Tensor, like: Tensor, dummies: int) -> _BlockStats:
        """Statistics measured earlier (``rows`` from a forward), for a backward."""
        stats = cls.__new__(cls)
        stats.rows = rows
        stats.mean, stats.var = rows.unbind(0)
        stats.dummies = _Dummies(like, max(rows.shape[1], dummies), rows.dtype)
        return stats

    def measure(self, x: Tensor, start: int) -> None:
        """Mean and biased variance of ``x``'s channels into ``[start, start + x.shape[1])``: the native
        statistics kernel, its two results written into place by one stack."""
        if is_fake(x) or x.is_meta:  # a fake or meta kernel (ops.py): the kernel has no meta; values unused
            return
        c = x.shape[1]
        rm, rv = self.dummies.narrow(c)  # float buffers keep bf16/fp16 inputs' statistics in float32
        mean, var = torch.batch_norm_update_stats(x, rm, rv, 0.0)
        torch.stack([mean, var], out=self.rows.narrow(1, start, c))

    def prefix(self, channels: int) -> _Stats:
        return _Stats(self.mean.narrow(0, 0, channels), self.var.narrow(0, 0, channels))


@dataclass
class _BlockSaved:
    """What a block's backward needs besides the buffer and the parameters (which are saved)."""

    c0: int  # block input channels
    k: int  # growth rate
    stats: _BlockStats | None  # training: the shared batch statistics
    bottlenecks: list[Tensor | None]  # per layer: the kept bottleneck output, or None (recompute)
    masks: list[Tensor | None]  # per layer: the dropout mask, or None
    running: list[Tensor]  # eval: every BN's running statistics (saved, so version-checked)


def _norm1_stats(layer: nn.Module, stats: _BlockStats | None, c: int) -> _Stats:
    if stats is not None:
        return stats.prefix(c)
    return _running_stats(layer.norm1)


def _running_stats(bn: nn.BatchNorm2d) -> _Stats:
    """``bn``'s running statistics, in float32 at least (a no-op for float32/float64 models)."""
    dtype = _stat_dtype(bn.running_mean.dtype)
    return _Stats(_param(bn.running_mean, dtype), _param(bn.running_var, dtype))


def _copies_for_dense_kernel(device: torch.device) -> bool:
    """Whether BN with fixed statistics runs on a dense copy of the strided prefix (CPU) rather than
    on the view itself (CUDA). tests/perf/test_opcount.py counts the CUDA path on a CPU by
    switching this off."""
    return device.type == "cpu"


def _norm1_forward(
    buf: Tensor, layer: nn.Module, s: _Stats, c: int, scratch: _Scratch, copy: bool, dense: Tensor | None = None
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
    return _apply_bn(x, layer.norm1, s, out, scratch.unused).relu_()


def _block_forward(x: Tensor, plan: _Plan, updates: _RunningUpdates | None) -> tuple[Tensor, _BlockSaved]:
    """Run a dense block into one buffer. Returns the buffer and what backward needs. Training
    queues every BN's running-statistics update in ``updates`` (a norm2's may happen in its kernel);
    the caller flushes them and counts the batch."""
    layers = plan.modules
    n, c0, h, w = x.shape
    k = layers[0].conv2.weight.shape[0]
    channels = c0 + k * len(layers)
    buf = torch.empty((n, channels, h, w), dtype=plan.dtype, device=x.device, memory_format=plan.fmt)
    buf[:, :c0].copy_(x)
    dense = x if x.dtype == plan.dtype and x.is_contiguous(memory_format=plan.fmt) else None
    weights = _conv_weights(layers, plan.dtype)

    stats = None
    if plan.training:
        stats = _BlockStats(x, channels - k, layers[0].norm2.num_features, _stat_dtype(plan.dtype))
        stats.measure(dense if dense is not None else buf.narrow(1, 0, c0), 0)

    bottlenecks: list[Tensor | None] = []
    masks: list[Tensor | None] = []
    scratch = _Scratch(buf, channels - k, plan.fmt)
    for i, layer in enumerate(layers):
        c = c0 + i * k
        s1 = _norm1_stats(layer, stats, c)
        z1 = _norm1_forward(buf, layer, s1, c, scratch, plan.dense_copy, dense if i == 0 else None)
        bottleneck = _conv(z1, layer.conv1, weights[2 * i])
        del z1
        if plan.training:
            z2 = _bn_train(bottleneck, layer.norm2, stats.dummies, updates)[0]
        else:
            z2 = _bn_eval(bottleneck, layer.norm2)
        y = _conv(z2.relu_(), layer.conv2, weights[2 * i + 1])
        del z2
        mask = None
        if layer.drop_rate > 0 and plan.training:
            y, mask = torch.native_dropout(y, layer.drop_rate, True)
        buf.narrow(1, c, k).copy_(y)
        if stats is not None and i + 1 < len(layers):  # the last layer's channels feed no later layer
            stats.measure(y, c)
        bottlenecks.append(bottleneck if plan.keep[i] else None)
        masks.append(mask)
    if plan.training:
        # every norm1 normalised a prefix of the block's statistics: one Bessel correction for all
        updates.add_shared([layer.norm1 for layer in layers], stats.rows[0], stats.rows[1] * updates.bessel)
    running = [] if plan.training else [t for layer in layers for t in _running_of(layer)]
    return buf, _BlockSaved(c0, k, stats, bottlenecks, masks, running)


def _run_block(x: Tensor, plan: _Plan) -> tuple[Tensor, _BlockSaved]:
    """:func:`_block_forward` with the running statistics updated in place: one ``_foreach_add_``
    for the block's ``num_batches_tracked``, then the kernels' and the queued updates."""
    updates = None
    if plan.training:
        n, _, h, w = x.shape
        _count_batches([bn for layer in plan.modules for bn in (layer.norm1, layer.norm2)])
        updates = _RunningUpdates(n * h * w)
    with no_autocast(plan.autocast[0]):
        buf, saved = _block_forward(x, plan, updates)
    if updates is not None:
        updates.flush()
    return buf, saved


def _running_of(layer: nn.Module) -> list[Tensor]:
    return [layer.norm1.running_mean, layer.norm1.running_var, layer.norm2.running_mean, layer.norm2.running_var]


def _invstd(stats: _BlockStats, layers: list[Any]) -> Tensor:
    """1/sqrt(var + eps) of every channel, once per block (per layer only if the layers' eps differ)."""
    eps = {layer.norm1.eps for layer in layers}
    if len(eps) == 1:
        return torch.rsqrt(stats.rows[1] + eps.pop())
    return torch.stack([torch.rsqrt(stats.rows[1] + layer.norm1.eps) for layer in layers])  # [layer, channel]


def _block_backward(
    grad: Tensor, buf: Tensor, plan: _Plan, saved: _BlockSaved
) -> tuple[Tensor, list[Tensor]]:
    """Reverse walk over the layers; returns the input gradient and per-layer parameter gradients.

    Temporaries are released as soon as they are consumed, so the transient peak is about three
    ``c_l``-channel tensors.
    """
    layers, fmt, c0, k = plan.modules, plan.fmt, saved.c0, saved.k
    bottlenecks = list(saved.bottlenecks)
    gbuf = grad.to(plan.dtype).clone(memory_format=fmt)  # the one gradient buffer, accumulated in place
    del grad
    weights = _conv_weights(layers, plan.dtype)
    conv_grads: list[Tensor] = [None] * (2 * len(layers))  # type: ignore[list-item]
    bn_grads: list[Tensor] = [None] * (4 * len(layers))  # type: ignore[list-item]
    invstd = _invstd(saved.stats, layers) if saved.stats is not None else None
    dummies = saved.stats.dummies if saved.stats is not None else None
    # z1 is dead (after its ReLU backward) before the dense copy of the input that BN backward
    # reads (2x faster than the strided view on CPU, the fused kernel on CUDA): one scratch serves both.
    scratch = _Scratch(buf, c0 + k * (len(layers) - 1), fmt)
    for i in reversed(range(len(layers))):
        layer, c = layers[i], c0 + i * k
        dy = gbuf.narrow(1, c, k)
        mask = saved.masks[i]
        if mask is not None:
            dy = _aten.native_dropout_backward.default(dy, mask, 1.0 / (1.0 - layer.drop_rate))
        s1 = _norm1_stats(layer, saved.stats, c)
        if invstd is not None:
            s1.invstd = invstd[:c] if invstd.dim() == 1 else invstd[i, :c]
        z1 = _norm1_forward(buf, layer, s1, c, scratch, plan.dense_copy)
        bottleneck, bottlenecks[i] = bottlenecks[i], None
        if bottleneck is None:  # not kept (max_saving): recompute the 1x1 convolution too
            bottleneck = _conv(z1, layer.conv1, weights[2 * i])
        if plan.training:
            z2, mean2, invstd2, reserve = _bn_train(bottleneck, layer.norm2, dummies, None)
        else:
            z2 = _bn_eval(bottleneck, layer.norm2)
        z2 = z2.relu_()
        dz2, conv_grads[2 * i + 1] = _conv_backward(dy, z2, layer.conv2, weights[2 * i + 1])
        del dy
        _relu_backward_(dz2, z2)
        del z2
        if plan.training:
            db, dg2, dbeta2 = _bn_train_backward(dz2, bottleneck, layer.norm2, mean2, invstd2, reserve, dummies)
        else:
            db, dg2, dbeta2 = _bn_fixed_backward(dz2, bottleneck, layer.norm2, _running_stats(layer.norm2))
        del dz2, bottleneck
        dz1, conv_grads[2 * i] = _conv_backward(db, z1, layer.conv1, weights[2 * i])
        del db
        _relu_backward_(dz1, z1)
        del z1
        dx, dg1, dbeta1 = _bn_fixed_backward(dz1, scratch.view(c).copy_(buf.narrow(1, 0, c)), layer.norm1, s1)
        del dz1
        gbuf.narrow(1, 0, c).add_(dx)
        del dx
        bn_grads[4 * i : 4 * i + 4] = [dg1, dbeta1, dg2, dbeta2]
    conv_grads = _cast_all(conv_grads, [p.dtype for layer in layers for p in (layer.conv1.weight, layer.conv2.weight)])
    param_grads: list[Tensor] = []
    for i in range(len(layers)):
        dg1, dbeta1, dg2, dbeta2 = bn_grads[4 * i : 4 * i + 4]
        param_grads += [dg1, dbeta1, conv_grads[2 * i], dg2, dbeta2, conv_grads[2 * i + 1]]
    return gbuf[:, :c0], param_grads


def _pack(tensors: list[Tensor | None]) -> tuple[list[Tensor], list[bool]]:
    """The present tensors and where they were (``save_for_backward`` takes no ``None``)."""
    return [t for t in tensors if t is not None], [t is not None for t in tensors]


def _unpack(tensors: list[Tensor], present: list[bool]) -> list[Tensor | None]:
    """Re-insert ``None`` where a layer saved nothing (inverse of :func:`_pack`)."""
    it = iter(tensors)
    return [next(it) if p else None for p in present]


class _DenseBlockFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, plan: _Plan, *params: Tensor) -> Tensor:
        buf, saved = _run_block(x, plan)
        # Tensors go through save_for_backward so autograd frees them right after this block's
        # backward (and keeps them when retain_graph=True), and so that reading them in backward
        # checks their version counters: a parameter changed in place between forward and
        # backward raises autograd's "modified by an inplace operation" error, as the naive path
        # does, instead of silently giving gradients of the new values. ctx keeps only
        # statistics (fresh tensors nobody else can reach) and layout.
        bottlenecks, ctx.has_bottleneck = _pack(saved.bottlenecks)
        masks, ctx.has_mask = _pack(saved.masks)
        ctx.plan, ctx.input_dtype = plan, x.dtype
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
            ctx.saved, bottlenecks=_unpack(kept, ctx.has_bottleneck), masks=_unpack(masks, ctx.has_mask)
        )
        layers = ctx.plan.modules
        plan = replace(ctx.plan, modules=[layer.bind(params[6 * i : 6 * i + 6]) for i, layer in enumerate(layers)])
        with no_autocast(plan.autocast[0]):
            gx, param_grads = _block_backward(grad, buf, plan, saved)
        return (gx.to(ctx.input_dtype), None, *param_grads)


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


def eager_block(modules: list[nn.Module], x: Tensor, keep: tuple[bool, ...], training: bool) -> Tensor:
    """A dense block's layers (torchvision ``_DenseLayer``s) on a non-empty batch, eagerly: one autograd
    Function, or a plain forward when no backward follows. ``keep``: :func:`block_keeps`."""
    _check_norms([m for layer in modules for m in (layer.norm1, layer.norm2)])
    layers = [_Layer.of(layer) for layer in modules]
    params = [p for layer in layers for p in layer.params()]
    mode = EFFICIENT if all(keep) else MAX_SAVING
    plan = replace(_plan(layers, mode, x, training, params), keep=keep)
    if not plan.graph:
        with torch.no_grad():
            return _run_block(x, plan)[0]
    return _DenseBlockFunction.apply(x, plan, *params)


# ---------------------------------------------------------------------------------------------
# Transition (BN-ReLU-[pool, conv1x1]) and ImageNet stem (BN-ReLU-maxpool): keep only the input.
# ---------------------------------------------------------------------------------------------


class _Tail:
    """What follows a tail's BN-ReLU: the transition's pool-then-conv, or the stem's max-pool."""

    def params(self, modules: list[nn.Module]) -> list[Tensor]:
        return []

    def bind(self, module: nn.Module, params: list[Tensor]) -> Any:
        return module

    def keeps(self, mode: str) -> bool:
        """Whether forward keeps what its backward needs instead of recomputing relu(norm(x))."""
        return False

    def forward(self, z: Tensor, module: Any, plan: _Plan, keep: bool) -> tuple[Tensor, list[Tensor]]:
        raise NotImplementedError

    def kept_backward(self, grad: Tensor, kept: list[Tensor], x: Tensor, module: Any) -> Tensor:
        """Gradient w.r.t. the BN output from what :meth:`forward` kept (ReLU's backward included)."""
        raise NotImplementedError

    def backward(self, grad: Tensor, z: Tensor, module: Any, plan: _Plan) -> tuple[Tensor, list[Tensor]]:
        raise NotImplementedError


class _TransitionTail(_Tail):
    """avg-pool then 1x1 conv: both linear maps on different axes, so they commute, and the
    convolution runs on a quarter of the pixels."""

    def params(self, modules: list[nn.Module]) -> list[Tensor]:
        return [modules[1].weight]

    def bind(self, module: Any, params: list[Tensor]) -> Any:
        return module._replace(weight=params[0])

    def forward(self, z, module, plan, keep):
        (weight,) = _cast_all([module.weight], [plan.dtype])
        return _conv(F.avg_pool2d(z, 2, 2), module, weight), []

    def backward(self, grad, z, module, plan):
        (weight,) = _cast_all([module.weight], [plan.dtype])
        pooled = F.avg_pool2d(z, 2, 2)
        dpooled, dw = _conv_backward(grad, pooled, module, weight)
        dz = _aten.avg_pool2d_backward.default(dpooled, z, [2, 2], [2, 2], [0, 0], False, True, None)
        return dz, _cast_all([dw], [module.weight.dtype])


class _StemTail(_Tail):
    """max-pool. In ``"efficient"`` mode it keeps the max-pool indices and the sign of the pooled
    output (a quarter-size int64 and bool tensor): backward is then one masked scatter and the BN
    backward, with no recompute of the largest activation of the network."""

    def keeps(self, mode):
        return mode == EFFICIENT

    def kept_backward(self, grad, kept, x, module):
        idx, positive = kept  # mask by relu's sign, scatter to the max positions
        return _aten.max_pool2d_with_indices_backward.default(grad * positive, x, *_pool_args(module), idx)

    def forward(self, z, module, plan, keep):
        args = _pool_args(module)
        if keep:
            out, idx = _aten.max_pool2d_with_indices.default(z, *args)
            return out, [idx, out > 0]  # at the max position relu's mask is the pooled value's sign
        return _aten.max_pool2d.default(z, *args), []

    def backward(self, grad, z, module, plan):
        args = _pool_args(module)
        _, idx = _aten.max_pool2d_with_indices.default(z, *args)
        return _aten.max_pool2d_with_indices_backward.default(grad, z, *args, idx), []


class _IdentityTail(_Tail):
    """Nothing: the network's final BN-ReLU (``norm5``). It keeps its output, as naive's in-place
    ReLU does (the final map, the smallest of the network): no recompute in backward."""

    def keeps(self, mode):
        return True

    def kept_backward(self, grad, kept, x, module):
        return _aten.threshold_backward.default(grad, kept[0], 0)

    def forward(self, z, module, plan, keep):
        return z, [z] if keep else []

    def backward(self, grad, z, module, plan):
        return grad.clone(memory_format=plan.fmt), []  # relu's backward writes into it


def _pool_args(pool: nn.MaxPool2d) -> list[Any]:
    return [_pair(pool.kernel_size), _pair(pool.stride), _pair(pool.padding), _pair(pool.dilation), pool.ceil_mode]


def _pair(v: int | tuple[int, int]) -> list[int]:
    return list(v) if isinstance(v, (tuple, list)) else [v, v]


def _tail_forward(
    x: Tensor, plan: _Plan, tail: _Tail, updates: _RunningUpdates | None, keep: bool
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """``tail(relu(norm(x)))`` in ``plan.dtype``: ``(out, kept, stats)``, ``kept`` what the tail keeps
    for its backward (``keep``), ``stats`` the batch statistics and reserve it then needs too."""
    bn = plan.modules[0]
    with no_autocast(plan.autocast[0]):
        x = x.to(plan.dtype)
        if plan.training:
            z, mean, invstd, reserve = _bn_train(x, bn, None, updates)
            stats = [mean, invstd, reserve] if keep else []
        else:
            z, stats = _bn_eval(x, bn), []
        out, kept = tail.forward(z.relu_(), plan.modules[1], plan, keep)
    return out, kept, stats


def _tail_backward(
    grad: Tensor, x: Tensor, plan: _Plan, tail: _Tail, kept: list[Tensor], stats: list[Tensor]
) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """Gradients of :func:`_tail_forward` (``x`` in ``plan.dtype``, ``plan.modules`` holding the saved
    parameters): ``(dx, dweight, dbias, the tail's own parameter gradients)``, ``dx`` in ``x``'s dtype."""
    bn, module = plan.modules
    extra: list[Tensor] = []
    with no_autocast(plan.autocast[0]):
        grad = grad.to(plan.dtype)
        dummies = _Dummies(x, x.shape[1], _stat_dtype(x.dtype))
        if kept:
            dz = tail.kept_backward(grad, kept, x, module)
            if plan.training:
                mean, invstd, reserve = stats
        else:
            if plan.training:
                z, mean, invstd, reserve = _bn_train(x, bn, dummies, None)
            else:
                z = _bn_eval(x, bn)
            z = z.relu_()
            dz, extra = tail.backward(grad, z, module, plan)
            _relu_backward_(dz, z)
            del z
        if plan.training:
            dx, dg, dbeta = _bn_train_backward(dz, x, bn, mean, invstd, reserve, dummies)
        else:
            dx, dg, dbeta = _bn_fixed_backward(dz, x, bn, _running_stats(bn))
    return dx, dg, dbeta, extra


class _NormReluTailFunction(torch.autograd.Function):
    """``tail(relu(norm(x)))`` saving ``x`` (and the stem's pool indices in ``"efficient"``)."""

    @staticmethod
    def forward(ctx, x: Tensor, plan: _Plan, tail: _Tail, *params: Tensor) -> Tensor:
        ctx.plan, ctx.tail, ctx.input_dtype, ctx.n_params = plan, tail, x.dtype, len(params)
        bn = plan.modules[0]
        updates = None
        if plan.training:
            _count_batches([bn])
            updates = _RunningUpdates(x.numel() // x.shape[1])
        x = x.to(plan.dtype)  # once: the tail computes in it and backward reads it
        out, kept, stats = _tail_forward(x, plan, tail, updates, plan.graph and tail.keeps(plan.mode))
        if updates is not None:
            updates.flush()
        running = [] if plan.training else [bn.running_mean, bn.running_var]
        # Parameters too, so backward's read of them is version-checked (see _DenseBlockFunction).
        ctx.n_kept = len(kept)
        ctx.save_for_backward(x, *params, *kept, *stats, *running)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        x, *rest = ctx.saved_tensors
        params, rest = rest[: ctx.n_params], rest[ctx.n_params :]
        plan, tail = ctx.plan, ctx.tail
        bn = plan.modules[0]._replace(weight=params[0], bias=params[1])  # the saved parameters
        plan = replace(plan, modules=[bn, tail.bind(plan.modules[1], params[2:])])
        kept, stats = rest[: ctx.n_kept], rest[ctx.n_kept :]
        dx, dg, dbeta, extra = _tail_backward(grad, x, plan, tail, kept, stats[:3] if plan.training else [])
        return (dx.to(ctx.input_dtype), None, None, dg, dbeta, *extra)


def _norm_relu_tail(x: Tensor, modules: list[nn.Module], tail: _Tail, training: bool, mode: str) -> Tensor:
    _check_norms([modules[0]])
    if x.shape[0] == 0:  # an empty batch: the modules' own forward (see _empty_block)
        z = F.relu(modules[0](x))
        if isinstance(tail, _TransitionTail):
            return F.avg_pool2d(modules[1](z), 2, 2)
        return z if modules[1] is None else modules[1](z)
    specs = [_BN.of(modules[0]), _Conv.of(modules[1]) if isinstance(tail, _TransitionTail) else modules[1]]
    params = [modules[0].weight, modules[0].bias, *tail.params(modules)]
    plan = _plan(specs, mode, x, training, params)
    if not plan.graph:
        with torch.no_grad():
            return _NormReluTailFunction.forward(_NoCtx(), x, plan, tail, *params)
    return _NormReluTailFunction.apply(x, plan, tail, *params)


class _NoCtx:
    """A throwaway ``ctx`` for running a Function's forward outside autograd (nothing is kept)."""

    def save_for_backward(self, *tensors: Tensor) -> None:
        pass


_TRANSITION, _STEM, _IDENTITY = _TransitionTail(), _StemTail(), _IdentityTail()
