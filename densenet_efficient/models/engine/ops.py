"""The engine as ``torch.library`` custom ops: what the C++ loops and the compiler run.

A dense block, transition, stem or ``norm5`` runs as one op (``densenet_efficient::dense_block``,
``norm_relu_tail``, and their backwards). Their kernels are the C++ loops of ``csrc/engine.cpp``
when :mod:`.native` could build them, else the Python engine (:mod:`.block`, :mod:`.tails`);
their fake kernels run the Python engine on fake tensors, so shapes and strides agree by
construction. Under ``torch.compile`` (``fullgraph=True`` included) each op stays opaque in the
graph: the engine's memory layout and kernels are kept, and CUDA graphs
(``mode="reduce-overhead"``) replay them with the rest of the step.

A custom op with an autograd formula must be functional, so the ops never touch the running
statistics: they return each BN's batch mean and unbiased variance, and their caller (traced when
compiled) applies ``nn.BatchNorm``'s update (:mod:`.running`).

>>> import torch, densenet_efficient as de
>>> model = de.densenet_bc_100(memory_efficient=True)
>>> step = torch.compile(model, fullgraph=True)  # one graph, engine blocks included
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn as nn
from torch import Tensor

from . import context, native, sync
from .block import BlockSaved, BlockStats, block_backward, block_forward, unpack
from .context import (
    BN,
    BlockTensors,
    Call,
    Conv,
    Layer,
    check_norms,
    compute_dtype,
    memory_format,
    needs_graph,
    no_autocast,
    stat_dtype,
)
from .kernels import pool_args
from .plan import Keep
from .running import DeferredUpdates, update_block_stats, update_tail_stats
from .tails import TAILS, tail_backward, tail_forward

_LIB = "densenet_efficient"
#: torchvision's dense layer: conv1 1x1 and conv2 3x3 "same", stride 1, no bias (what the ops assume)
_LAYER_CONVS = (((1, 1), (1, 1), (0, 0), (1, 1), 1), ((3, 3), (1, 1), (1, 1), (1, 1), 1))
_TRANSITION_CONV = _LAYER_CONVS[0]


class _Pool(NamedTuple):
    """A square max-pool's settings, as the stem tail reads them (``nn.MaxPool2d``'s names)."""

    kernel_size: int
    stride: int
    padding: int
    dilation: int
    ceil_mode: bool


def _square_pool(pool: nn.MaxPool2d) -> _Pool:
    args = pool_args(pool)
    if any(a[0] != a[1] for a in args[:4]):
        raise NotImplementedError(
            f"the compiled engine runs a square stem max-pool (torchvision's), found kernel, stride, "
            f"padding, dilation = {args[:4]}; use memory_efficient=False"  # no repr: see _check_convs
        )
    return _Pool(args[0][0], args[1][0], args[2][0], args[3][0], bool(args[4]))


def _conv_spec(conv: nn.Conv2d) -> tuple:
    return (tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation), conv.groups)


def _check_convs(convs: list[nn.Conv2d], expected: tuple, where: str, fast: bool = False) -> None:
    for conv in convs:
        found = _conv_spec(conv)
        bias = conv._parameters.get("bias") if fast else conv.bias
        if found != expected or bias is not None or conv.padding_mode != "zeros":
            # no repr(conv) here: dynamo traces this message (it cannot trace Module.__repr__)
            raise NotImplementedError(
                f"the compiled engine runs torchvision's {where} convolutions (kernel, stride, padding, "
                f"dilation, groups = {expected}, no bias, zero padding), found {found}, bias "
                f"{bias is not None}, padding_mode {conv.padding_mode!r}; use memory_efficient=False"
            )


# ---------------------------------------------------------------------------------------------
# Dense block.
# ---------------------------------------------------------------------------------------------


def _layers(params: list[Tensor], running: list[Tensor], eps: list[float], drop: list[float]) -> list[Layer]:
    """The engine's view of a block's layers, rebuilt from the op's flat arguments."""
    out = []
    for i, rate in enumerate(drop):
        p, r = params[6 * i : 6 * i + 6], running[4 * i : 4 * i + 4]
        conv1, conv2 = (Conv(w, spec[1], spec[2], spec[3], spec[4]) for w, spec in zip((p[2], p[5]), _LAYER_CONVS, strict=True))
        out.append(
            Layer(
                BN(p[0], p[1], r[0], r[1], None, None, eps[2 * i]), conv1,
                BN(p[3], p[4], r[2], r[3], None, None, eps[2 * i + 1]), conv2, rate,
            )
        )  # fmt: skip
    return out


def _block_call(
    layers: list[Layer], x: Tensor, keep: list[bool], training: bool, graph: bool, dense_copy: bool,
    dtype: torch.dtype, group: str | None = None,
) -> Call:  # fmt: skip
    return Call(
        layers, training, dtype, memory_format(x), (x.device.type, False), graph, tuple(keep), dense_copy,
        sync.resolve_group(group),
    )  # fmt: skip


def _block_forward(
    x: Tensor, params: list[Tensor], running: list[Tensor], eps: list[float], drop: list[float], keep: list[bool],
    training: bool, graph: bool, dense_copy: bool, dtype: torch.dtype, group: str | None = None,
) -> tuple[Tensor, BlockSaved, DeferredUpdates | None, list[Tensor], list[Tensor]]:  # fmt: skip
    """The Python engine's block forward on the op's arguments: ``(buffer, saved, the deferred
    running-statistics updates (training), kept bottlenecks, dropout masks)``."""
    call = _block_call(_layers(params, running, eps, drop), x, keep, training, graph, dense_copy, dtype, group)
    n, _, h, w = x.shape
    updates = None
    if training:
        norm2 = x.new_zeros((2, len(drop), params[3].shape[0]), dtype=stat_dtype(dtype))
        updates = DeferredUpdates(n * h * w, norm2)
    with no_autocast(x.device.type):
        buf, saved = block_forward(x, call, updates)
    kept = [b for b in saved.bottlenecks if b is not None]
    masks = [m for m in saved.masks if m is not None]
    return buf, saved, updates, kept, masks


def _block_impl(
    x: Tensor,
    params: list[Tensor],
    running: list[Tensor],
    eps: list[float],
    drop: list[float],
    keep: list[bool],
    training: bool,
    graph: bool,
    dense_copy: bool,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor, list[Tensor], list[Tensor]]:
    """``(buffer, statistics rows (mean and biased variance of the channels later layers read),
    their unbiased variances, norm2's batch means and unbiased variances [2, layers, k2], kept
    bottlenecks, dropout masks)``; the statistics are empty in eval."""
    buf, saved, updates, kept, masks = _block_forward(
        x, params, running, eps, drop, keep, training, graph, dense_copy, dtype
    )
    if updates is not None:
        rows, unbiased, norm2 = saved.stats.rows, updates.shared, updates.batch
    else:
        rows, unbiased, norm2 = (x.new_empty(0, dtype=stat_dtype(dtype)) for _ in range(3))
    return buf, rows, unbiased, norm2, kept, masks


_SCHEMAS = {
    "dense_block": (
        "(Tensor x, Tensor[] params, Tensor[] running, float[] eps, float[] drop, bool[] keep, bool training, "
        "bool graph, bool dense_copy, ScalarType dtype) -> (Tensor, Tensor, Tensor, Tensor, Tensor[], Tensor[])"
    ),
    "dense_block_backward": (
        "(Tensor grad, Tensor buf, Tensor rows, Tensor[] params, Tensor[] running, Tensor[] kept, Tensor[] masks, "
        "float[] eps, float[] drop, bool[] keep, bool training, bool dense_copy, ScalarType dtype, "
        "ScalarType input_dtype) "
        "-> (Tensor, Tensor[])"
    ),
    "norm_relu_tail": (
        "(Tensor x, Tensor[] bn, Tensor? conv_weight, str kind, int pool_kernel, int pool_stride, "
        "int pool_padding, int pool_dilation, bool pool_ceil, float eps, bool training, bool keep, "
        "ScalarType dtype) -> (Tensor, Tensor[], Tensor[])"
    ),
    "norm_relu_tail_backward": (
        "(Tensor grad, Tensor x, Tensor[] bn, Tensor? conv_weight, Tensor[] kept, Tensor[] stats, str kind, "
        "int pool_kernel, int pool_stride, int pool_padding, int pool_dilation, bool pool_ceil, float eps, "
        "bool training, ScalarType dtype) -> (Tensor, Tensor, Tensor, Tensor[])"
    ),
}
_lib = torch.library.Library(_LIB, "DEF")
for _name, _schema in _SCHEMAS.items():
    _lib.define(_name + _schema)
_block_op = torch.ops.densenet_efficient.dense_block.default
torch.library.register_fake(f"{_LIB}::dense_block", _block_impl)  # the Python engine on fake tensors


def _block_backward_impl(
    grad: Tensor,
    buf: Tensor,
    rows: Tensor,
    params: list[Tensor],
    running: list[Tensor],
    kept: list[Tensor],
    masks: list[Tensor],
    eps: list[float],
    drop: list[float],
    keep: list[bool],
    training: bool,
    dense_copy: bool,
    dtype: torch.dtype,
    input_dtype: torch.dtype,
    synchronised: tuple[Tensor, Tensor, str] | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """``(input gradient, parameter gradients in the op's parameter order)``. ``synchronised``:
    norm2's group statistics ``[2, layers, k2]`` (mean, invstd), the group's count and its name."""
    layers = _layers(params, running, eps, drop)
    group = synchronised[2] if synchronised is not None else None
    call = _block_call(layers, buf, keep, training, True, dense_copy, dtype, group)
    k = params[5].shape[0]
    stats = BlockStats.of_rows(rows, buf, params[3].shape[0]) if training else None
    if synchronised is not None:
        norm2, stats.count, _ = synchronised
        stats.group, stats.norm2 = call.group, list(zip(norm2[0].unbind(0), norm2[1].unbind(0), strict=True))
    saved = BlockSaved(
        buf.shape[1] - k * len(layers), k, stats,
        unpack(kept, list(keep)), unpack(masks, [rate > 0 and training for rate in drop]), [],
    )  # fmt: skip
    with no_autocast(buf.device.type):
        gx, grads = block_backward(grad, buf, call, saved)
    return gx.to(input_dtype), grads


_block_backward_op = torch.ops.densenet_efficient.dense_block_backward.default
torch.library.register_fake(f"{_LIB}::dense_block_backward", _block_backward_impl)


def _block_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, params, running, eps, drop, keep, training, graph, dense_copy, dtype = inputs
    buf, rows, unbiased, norm2, kept, masks = output
    ctx.mark_non_differentiable(rows, unbiased, norm2, *kept, *masks)
    ctx.args = (eps, drop, keep, training, dense_copy, dtype, x.dtype)
    ctx.counts = (len(params), len(running) if not training else 0, len(kept))
    # eval: the running statistics are what backward normalises with (saved: version-checked)
    ctx.save_for_backward(buf, rows, *params, *(running if not training else []), *kept, *masks)


def _block_grad(ctx: Any, grad: Tensor, *unused: Any) -> tuple:
    buf, rows, *rest = ctx.saved_tensors
    n_params, n_running, n_kept = ctx.counts
    params, rest = rest[:n_params], rest[n_params:]
    running, rest = rest[:n_running], rest[n_running:]
    kept, masks = rest[:n_kept], rest[n_kept:]
    eps, drop, keep, training, dense_copy, dtype, input_dtype = ctx.args
    if training:  # stand-ins: training backward never reads the running statistics
        running = [rows] * (4 * len(drop))
    gx, grads = _block_backward_op(
        grad, buf, rows, list(params), list(running), list(kept), list(masks), eps, drop, keep, training,
        dense_copy, dtype, input_dtype,
    )  # fmt: skip
    # one entry per input (x, params, running, eps, drop, keep, training, graph, dense_copy, dtype):
    # tensor and int lists mirror the input list (autograd flattens them), float and bool lists are one leaf
    return gx, grads, [None] * len(running), None, None, None, None, None, None, None


class _Attrs:
    """``module.<name>`` read as ``[name]``: how :func:`_block_tensors` reads a module whose tensors
    are not plain dict entries (a parametrization's computed weight) and what the compiler traces."""

    __slots__ = ("module",)

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __getitem__(self, name: str) -> Any:
        return getattr(self.module, name)

    def get(self, name: str) -> Any:
        return getattr(self.module, name, None)


def _block_tensors(modules: list[nn.Module]) -> BlockTensors:
    """Read a block's layers. Eagerly through the modules' own dicts: ``module.name`` goes through
    ``nn.Module.__getattr__`` in Python, which for a 24-layer block costs about as much as its
    small kernels; a module without plain entries (parametrized) and the compiler read attributes."""
    if not torch.compiler.is_compiling():
        try:
            return _read_block(modules, fast=True)
        except KeyError:
            pass
    return _read_block(modules, fast=False)


def _read_block(modules: list[nn.Module], fast: bool) -> BlockTensors:
    out = BlockTensors([], [], [], [], [], [], [])
    for layer in modules:
        children = layer._modules if fast else _Attrs(layer)
        norm1, conv1, norm2, conv2 = children["norm1"], children["conv1"], children["norm2"], children["conv2"]
        check_norms([norm1, norm2])
        _check_convs([conv1], _LAYER_CONVS[0], "dense layers' 1x1", fast)
        _check_convs([conv2], _LAYER_CONVS[1], "dense layers' 3x3", fast)
        (p1, b1), (p2, b2) = ((bn._parameters, bn._buffers) if fast else (_Attrs(bn),) * 2 for bn in (norm1, norm2))
        w1, w2 = ((c._parameters if fast else _Attrs(c))["weight"] for c in (conv1, conv2))
        out.params.extend((p1["weight"], p1["bias"], w1, p2["weight"], p2["bias"], w2))
        out.running.extend((b1["running_mean"], b1["running_var"], b2["running_mean"], b2["running_var"]))
        out.counters.extend((b1["num_batches_tracked"], b2["num_batches_tracked"]))
        out.eps.extend((norm1.eps, norm2.eps))
        out.momenta.extend((norm1.momentum, norm2.momentum))
        out.drop.append(float(layer.drop_rate))
        out.norms.extend((norm1, norm2))
    return out


def block_op_args(
    modules: list[nn.Module], x: Tensor, keep: Keep, training: bool, tensors: BlockTensors | None = None
) -> tuple:
    """The ``densenet_efficient::dense_block`` arguments that run ``modules`` (a block's layers) on ``x``."""
    t = tensors if tensors is not None else _block_tensors(modules)
    graph = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in t.params))
    keep = [k and graph for k in keep]
    dense_copy = context.copies_for_dense_kernel(x.device)
    return x, t.params, t.running, t.eps, t.drop, keep, training, graph, dense_copy, compute_dtype(x)


def op_block(modules: list[nn.Module], x: Tensor, keep: Keep, training: bool) -> Tensor:
    """The block as one custom op; the running-statistics updates around it (traced when compiled)."""
    tensors = _block_tensors(modules)
    args = block_op_args(modules, x, keep, training, tensors)
    buf, rows, unbiased, norm2, _, _ = _block_op(*args)
    if training:  # no_grad: the statistics are op outputs, and a buffer must not join the graph
        with torch.no_grad():
            update_block_stats(tensors, x, args[-1], rows, unbiased, norm2)
    return buf


# ---------------------------------------------------------------------------------------------
# Transition, ImageNet stem, norm5: BN-ReLU and what follows.
# ---------------------------------------------------------------------------------------------


def _tail_call(
    kind: str, bn: list[Tensor], conv_weight: Tensor | None, pool: _Pool, eps: float, x: Tensor,
    training: bool, dtype: torch.dtype, group: str | None = None,
) -> Call:  # fmt: skip
    norm = BN(bn[0], bn[1], bn[2], bn[3], None, None, eps)
    if kind == "transition":
        spec = _TRANSITION_CONV
        module: Any = Conv(conv_weight, spec[1], spec[2], spec[3], spec[4])
    else:
        module = pool if kind == "stem" else None
    fmt, autocast = memory_format(x), (x.device.type, False)
    return Call([norm, module], training, dtype, fmt, autocast, group=sync.resolve_group(group))


def _tail_impl(
    x: Tensor,
    bn: list[Tensor],
    conv_weight: Tensor | None,
    kind: str,
    pool_kernel: int,
    pool_stride: int,
    pool_padding: int,
    pool_dilation: int,
    pool_ceil: bool,
    eps: float,
    training: bool,
    keep: bool,
    dtype: torch.dtype,
    group: str | None = None,
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """``(output, kept, statistics)``: ``bn`` is ``[weight, bias, running_mean, running_var]``;
    training statistics are ``[batch mean and unbiased variance [2, C]]`` and, when kept, the
    backward kernel's ``[mean, invstd, reserve]`` (synchronised over ``group``: always the
    group's ``[mean, invstd, count]``)."""
    pool = _Pool(pool_kernel, pool_stride, pool_padding, pool_dilation, pool_ceil)
    call = _tail_call(kind, bn, conv_weight, pool, eps, x, training, dtype, group)
    updates = None
    if training:
        batch = x.new_zeros((2, x.shape[1]), dtype=stat_dtype(dtype))
        updates = DeferredUpdates(x.numel() // x.shape[1], batch)
    out, kept, stats = tail_forward(x.to(dtype), call, TAILS[kind], updates, keep)
    if kind == "identity":
        kept = []  # it keeps its output, which an op may not return twice: setup saves the output
    if updates is not None:
        stats = [batch, *stats]
    return out, kept, stats


_tail_op = torch.ops.densenet_efficient.norm_relu_tail.default
torch.library.register_fake(f"{_LIB}::norm_relu_tail", _tail_impl)


def _tail_backward_impl(
    grad: Tensor,
    x: Tensor,
    bn: list[Tensor],
    conv_weight: Tensor | None,
    kept: list[Tensor],
    stats: list[Tensor],
    kind: str,
    pool_kernel: int,
    pool_stride: int,
    pool_padding: int,
    pool_dilation: int,
    pool_ceil: bool,
    eps: float,
    training: bool,
    dtype: torch.dtype,
    group: str | None = None,
) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """``(dx in x's dtype, dweight, dbias, [dconv_weight] for a transition)``."""
    pool = _Pool(pool_kernel, pool_stride, pool_padding, pool_dilation, pool_ceil)
    call = _tail_call(kind, bn, conv_weight, pool, eps, x, training, dtype, group)
    dx, dg, dbeta, extra = tail_backward(grad, x.to(dtype), call, TAILS[kind], kept, stats)
    return dx.to(x.dtype), dg, dbeta, extra


_tail_backward_op = torch.ops.densenet_efficient.norm_relu_tail_backward.default
torch.library.register_fake(f"{_LIB}::norm_relu_tail_backward", _tail_backward_impl)


def _tail_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    """Of ``norm_relu_tail`` and of ``sync_norm_relu_tail``, whose one more input is the group."""
    x, bn, conv_weight, kind, *pool, eps, training, keep, dtype = inputs[:13]
    group = inputs[13] if len(inputs) > 13 else None
    out, kept, stats = output
    ctx.mark_non_differentiable(*kept, *stats)
    ctx.args = (kind, pool, eps, training, dtype, conv_weight is not None, group)
    if kind == "identity" and keep:
        kept = [out]
    # training, when kept: the backward kernel's mean, invstd and reserve (synchronised: always the
    # group's mean, invstd and count); eval: the running statistics
    saved_stats = (stats[1:] if keep or group is not None else []) if training else bn[2:]
    ctx.n_kept = len(kept)
    weights = [conv_weight] if conv_weight is not None else []
    ctx.save_for_backward(x, bn[0], bn[1], *weights, *kept, *saved_stats)


def _tail_grad(ctx: Any, grad: Tensor, *unused: Any) -> tuple:
    kind, pool, eps, training, dtype, has_conv, group = ctx.args
    x, weight, bias, *rest = ctx.saved_tensors
    conv_weight = rest.pop(0) if has_conv else None
    kept, stats = rest[: ctx.n_kept], rest[ctx.n_kept :]
    running = stats if not training else [weight, weight]  # stand-ins: training never reads them
    op, synchronised = (_tail_backward_op, ()) if group is None else (_sync_tail_backward_op, (group,))
    dx, dg, dbeta, extra = op(
        grad, x, [weight, bias, *running], conv_weight, list(kept), list(stats) if training else [],
        kind, *pool, eps, training, dtype, *synchronised,
    )  # fmt: skip
    # one entry per input (x, bn, conv_weight, kind, 5 pool settings, eps, training, keep, dtype[, group])
    return dx, [dg, dbeta, None, None], extra[0] if has_conv else None, *[None] * (10 + len(synchronised))


_PYTHON_KERNELS = (
    ("dense_block", _block_impl), ("dense_block_backward", _block_backward_impl),
    ("norm_relu_tail", _tail_impl), ("norm_relu_tail_backward", _tail_backward_impl),
)  # fmt: skip
for _name, _impl in _PYTHON_KERNELS:
    # the meta device (shape inference, FLOP counting) runs the fake kernels' code: some ATen
    # kernels the C++ loops call (batch_norm_update_stats) have no meta implementation
    _lib.impl(_name, _impl, "Meta")


def _register_kernels(status: native.EngineStatus) -> None:
    """The ops' kernels and derivative formulas: the C++ ones (registered by loading the library),
    or the Python engine's and these formulas."""
    if status.engine == "python":
        for name, impl in _PYTHON_KERNELS:
            _lib.impl(name, impl, "CompositeExplicitAutograd")
        torch.library.register_autograd(f"{_LIB}::dense_block", _block_grad, setup_context=_block_setup)
        torch.library.register_autograd(f"{_LIB}::norm_relu_tail", _tail_grad, setup_context=_tail_setup)


native.on_choice(_register_kernels)


def tail_op_args(x: Tensor, norm: nn.BatchNorm2d, module: nn.Module | None, kind: str, keep: bool) -> tuple:
    """The ``densenet_efficient::norm_relu_tail`` arguments: BN-ReLU of ``x``, then ``module`` (a
    transition's conv, the stem's max-pool or ``None``; ``kind``: ``"transition"``, ``"stem"``,
    ``"identity"``); ``keep``: the tail's flag (:class:`.plan.ExecutionPlan`)."""
    check_norms([norm])
    if kind == "transition":
        _check_convs([module], _TRANSITION_CONV, "transitions' 1x1")
    conv_weight = module.weight if kind == "transition" else None
    pool = _square_pool(module) if kind == "stem" else _Pool(0, 0, 0, 0, False)
    bn = [norm.weight, norm.bias, norm.running_mean, norm.running_var]
    params = [norm.weight, norm.bias] + ([conv_weight] if conv_weight is not None else [])
    keep = keep and needs_graph([x, *params])
    return x, bn, conv_weight, kind, *pool, norm.eps, norm.training, keep, compute_dtype(x)


def op_tail(x: Tensor, norm: nn.BatchNorm2d, module: nn.Module | None, kind: str, keep: bool) -> Tensor:
    """A tail as one custom op; its running-statistics update after it (see :func:`op_block`)."""
    args = tail_op_args(x, norm, module, kind, keep)
    out, _, stats = _tail_op(*args)
    if norm.training:
        with torch.no_grad():  # see op_block
            update_tail_stats(norm, x, args[-1], stats[0])
    return out


# ---------------------------------------------------------------------------------------------
# Synchronised batch norm under the compiler: the same ops with the process group's name, whose
# kernels are always the Python engine's synchronised path (:mod:`.sync`: functional collectives
# inside the opaque op, so the compiled graph keeps the engine's memory and every rank issues the
# same collectives in the same order). Training only: in eval a synchronised BN is a plain one.
# ---------------------------------------------------------------------------------------------

_SYNC_SCHEMAS = {
    "sync_dense_block": (
        "(Tensor x, Tensor[] params, Tensor[] running, float[] eps, float[] drop, bool[] keep, bool graph, "
        "bool dense_copy, ScalarType dtype, str group) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor[], Tensor[])"
    ),
    "sync_dense_block_backward": (
        "(Tensor grad, Tensor buf, Tensor rows, Tensor norm2, Tensor count, Tensor[] params, Tensor[] kept, "
        "Tensor[] masks, float[] eps, float[] drop, bool[] keep, bool dense_copy, ScalarType dtype, "
        "ScalarType input_dtype, str group) -> (Tensor, Tensor[])"
    ),
    "sync_norm_relu_tail": _SCHEMAS["norm_relu_tail"].replace("ScalarType dtype)", "ScalarType dtype, str group)"),
    "sync_norm_relu_tail_backward": _SCHEMAS["norm_relu_tail_backward"].replace(
        "ScalarType dtype)", "ScalarType dtype, str group)"
    ),
}


def _sync_block_impl(
    x: Tensor, params: list[Tensor], running: list[Tensor], eps: list[float], drop: list[float], keep: list[bool],
    graph: bool, dense_copy: bool, dtype: torch.dtype, group: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, list[Tensor], list[Tensor]]:  # fmt: skip
    """:func:`_block_impl`'s outputs (training) with the group's statistics, plus what backward
    reads instead of a second collective: norm2's ``[2, layers, k2]`` (mean, invstd) and the
    group's batch x H x W (0-d)."""
    buf, saved, updates, kept, masks = _block_forward(
        x, params, running, eps, drop, keep, True, graph, dense_copy, dtype, group
    )
    stats = saved.stats
    norm2 = torch.stack([torch.stack(pair) for pair in stats.norm2], 1)
    return buf, stats.rows, updates.shared, updates.batch, norm2, stats.count, kept, masks


def _sync_block_backward_impl(
    grad: Tensor, buf: Tensor, rows: Tensor, norm2: Tensor, count: Tensor, params: list[Tensor],
    kept: list[Tensor], masks: list[Tensor], eps: list[float], drop: list[float], keep: list[bool],
    dense_copy: bool, dtype: torch.dtype, input_dtype: torch.dtype, group: str,
) -> tuple[Tensor, list[Tensor]]:  # fmt: skip
    running = [rows] * (4 * len(drop))  # stand-ins: training backward never reads them
    return _block_backward_impl(
        grad, buf, rows, params, running, kept, masks, eps, drop, keep, True, dense_copy, dtype, input_dtype,
        (norm2, count, group),
    )  # fmt: skip


def _sync_block_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, params, running, eps, drop, keep, graph, dense_copy, dtype, group = inputs
    buf, rows, unbiased, norm2, saved2, count, kept, masks = output
    ctx.mark_non_differentiable(rows, unbiased, norm2, saved2, count, *kept, *masks)
    ctx.args = (eps, drop, keep, dense_copy, dtype, x.dtype, group)
    ctx.counts = (len(params), len(kept))
    ctx.save_for_backward(buf, rows, saved2, count, *params, *kept, *masks)


def _sync_block_grad(ctx: Any, grad: Tensor, *unused: Any) -> tuple:
    buf, rows, norm2, count, *rest = ctx.saved_tensors
    n_params, n_kept = ctx.counts
    params, kept, masks = rest[:n_params], rest[n_params : n_params + n_kept], rest[n_params + n_kept :]
    eps, drop, keep, dense_copy, dtype, input_dtype, group = ctx.args
    gx, grads = _sync_block_backward_op(
        grad, buf, rows, norm2, count, list(params), list(kept), list(masks), eps, drop, keep, dense_copy,
        dtype, input_dtype, group,
    )  # fmt: skip
    # one entry per input (x, params, running, eps, drop, keep, graph, dense_copy, dtype, group)
    return gx, grads, [None] * (4 * len(drop)), *[None] * 7


for _name, _schema in _SYNC_SCHEMAS.items():
    _lib.define(_name + _schema)
_SYNC_KERNELS = (
    ("sync_dense_block", _sync_block_impl), ("sync_dense_block_backward", _sync_block_backward_impl),
    ("sync_norm_relu_tail", _tail_impl), ("sync_norm_relu_tail_backward", _tail_backward_impl),
)  # fmt: skip
for _name, _impl in _SYNC_KERNELS:
    _lib.impl(_name, _impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{_LIB}::{_name}", _impl)
torch.library.register_autograd(f"{_LIB}::sync_dense_block", _sync_block_grad, setup_context=_sync_block_setup)
torch.library.register_autograd(f"{_LIB}::sync_norm_relu_tail", _tail_grad, setup_context=_tail_setup)
_sync_block_op = torch.ops.densenet_efficient.sync_dense_block.default
_sync_block_backward_op = torch.ops.densenet_efficient.sync_dense_block_backward.default
_sync_tail_op = torch.ops.densenet_efficient.sync_norm_relu_tail.default
_sync_tail_backward_op = torch.ops.densenet_efficient.sync_norm_relu_tail_backward.default


def op_sync_block(modules: list[nn.Module], x: Tensor, keep: Keep, group: Any) -> Tensor:
    """:func:`op_block` in training with the batch norms synchronised over ``group``."""
    tensors = _block_tensors(modules)
    x, params, running, eps, drop, keep, _, graph, dense_copy, dtype = block_op_args(modules, x, keep, True, tensors)
    buf, rows, unbiased, norm2, *_ = _sync_block_op(
        x, params, running, eps, drop, keep, graph, dense_copy, dtype, sync.group_name(group)
    )
    with torch.no_grad():
        update_block_stats(tensors, x, dtype, rows, unbiased, norm2)
    return buf


def op_sync_tail(x: Tensor, norm: nn.BatchNorm2d, module: nn.Module | None, kind: str, keep: bool, group: Any) -> Tensor:
    """:func:`op_tail` in training with the batch norm synchronised over ``group``."""
    args = tail_op_args(x, norm, module, kind, keep)
    out, _, stats = _sync_tail_op(*args, sync.group_name(group))
    with torch.no_grad():
        update_tail_stats(norm, x, args[-1], stats[0])
    return out
