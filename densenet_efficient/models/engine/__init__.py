r"""The memory-efficient execution engine for dense blocks, transitions, the ImageNet stem and norm5.

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
* One autograd Function per block (the custom op of :mod:`.ops`) saves the buffer, the per-channel
  statistics and, per its flags,
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

Parts
-----
:mod:`.plan`: the one form of the memory setting (:class:`ExecutionPlan`: per block, which layers
keep their bottleneck; per tail, whether it keeps what its backward needs; ``None``: naive).
:mod:`.context`: a call's settings and the modules' specs. :mod:`.batchnorm`, :mod:`.kernels`:
the single-kernel pieces. :mod:`.running`: running-statistics updates. :mod:`.block`,
:mod:`.tails`: the Python engine's loops and autograd Functions (the reference). :mod:`.ops`: the
engine as custom ops, for the C++ loops and the compiler. :mod:`.native`: builds and loads the
C++ loops (``csrc/engine.cpp``). This module: the entry points the model's modules call.

Modes
-----
``"naive"`` (``False``, the models' default): torchvision's computation. ``"efficient"``
(``True``): every layer keeps its bottleneck, backward recomputes only BN+ReLU. ``"max_saving"``:
no layer keeps it, backward recomputes the 1x1 convolution too. Per-layer flags reach every point
between; :mod:`..memory_plan` is the user-facing form of that dial, :mod:`..planner` picks one.
"""


from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from . import native, ops, sync
from .block import eager_block, empty_block
from .context import check_norms, no_autocast
from .native import EngineStatus, NativeBuildError, engine_status, reference_engine
from .plan import EFFICIENT, MAX_SAVING, MODES, NAIVE, ExecutionPlan, Keep, resolve_mode
from .running import batched_running_updates
from .tails import TAILS, eager_tail

__all__ = [
    "EFFICIENT",
    "MAX_SAVING",
    "MODES",
    "NAIVE",
    "EngineStatus",
    "ExecutionPlan",
    "Keep",
    "NativeBuildError",
    "batched_running_updates",
    "dense_block",
    "engine_status",
    "no_autocast",
    "norm_relu",
    "reference_engine",
    "resolve_mode",
    "stem",
    "transition",
]


def dense_block(block: nn.Module, x: Tensor, keep: Keep) -> Tensor:
    """Run ``block`` (a torchvision-layout ``_DenseBlock``) with the engine; returns the concatenated
    features. ``keep``: per layer, whether it keeps its bottleneck output (:class:`ExecutionPlan`)."""
    modules = list(block.values())
    if len(keep) != len(modules):
        raise ValueError(f"expected {len(modules)} per-layer flags for this block, got {len(keep)}")
    group = _sync_group([m for layer in modules for m in (layer.norm1, layer.norm2)])
    if group is not None and torch.compiler.is_compiling():
        return ops.op_sync_block(modules, sync.check_compiled_batch(x), keep, group)
    if x.shape[0] == 0 and group is None:  # a synchronised rank takes part in the collectives
        check_norms([m for layer in modules for m in (layer.norm1, layer.norm2)])
        return empty_block(modules, x)
    if group is None and _through_ops():
        return ops.op_block(modules, x, keep, block.training)
    return eager_block(modules, x, keep, block.training)


def transition(module: nn.Module, x: Tensor) -> Tensor:
    """``pool(conv(relu(norm(x))))`` of a torchvision ``_Transition``, storing only ``x`` for backward."""
    return _tail(x, module.norm, module.conv, "transition", False)


def stem(norm: nn.BatchNorm2d, pool: nn.MaxPool2d, x: Tensor, keep: bool) -> Tensor:
    """``pool0(relu0(norm0(x)))`` of the ImageNet stem (``x`` is conv0's output), storing ``x`` for
    backward and, with ``keep``, the pooling indices and the sign of the output."""
    return _tail(x, norm, pool, "stem", keep)


def norm_relu(norm: nn.BatchNorm2d, x: Tensor) -> Tensor:
    """``relu(norm(x))`` (the network's ``norm5`` and its ReLU), keeping its output for backward."""
    return _tail(x, norm, None, "identity", True)


def _through_ops() -> bool:
    """Whether a call runs the custom ops: always under the compiler (their kernels were chosen when
    the model's memory setting was applied, :func:`.native.ensure`), and eagerly when those kernels
    are the C++ loops; else the Python engine's autograd Functions run it eagerly."""
    return torch.compiler.is_compiling() or native.eager_native()


def _sync_group(norms: list[nn.Module]) -> Any | None:
    """The process group ``norms`` (one call's) synchronise their training statistics over, or
    ``None``. Eagerly the Python engine runs a synchronised call with the collectives (:mod:`.sync`);
    under the compiler, the synchronised ops, whose kernels are that same Python engine
    (:func:`.ops.op_sync_block`)."""
    if not norms[0].training:
        return None
    return sync.process_group(norms)


def _tail(x: Tensor, norm: nn.BatchNorm2d, module: nn.Module | None, kind: str, keep: bool) -> Tensor:
    group = _sync_group([norm])
    if group is not None and torch.compiler.is_compiling():
        return ops.op_sync_tail(sync.check_compiled_batch(x), norm, module, kind, keep, group)
    if group is not None or x.shape[0] == 0 or not _through_ops():
        return eager_tail(x, [norm, module], TAILS[kind], norm.training, keep)
    return ops.op_tail(x, norm, module, kind, keep)
