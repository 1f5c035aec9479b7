"""What an engine call reads besides tensors: its settings (:class:`Call`) and the modules' specs.

The specs (:class:`BN`, :class:`Conv`, :class:`Layer`) are a module's tensors and settings taken
once per call, so the loops read tuples instead of going through ``nn.Module.__getattr__``; the
custom ops (:mod:`.ops`) rebuild the same specs from their flat arguments.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn as nn
from torch import Tensor

from .plan import Keep


@dataclass
class Call:
    """What one engine call needs besides tensors: the modules (as :class:`BN`, :class:`Conv`,
    :class:`Layer` specs) and how this call executes."""

    modules: list[Any]
    training: bool
    dtype: torch.dtype
    fmt: torch.memory_format
    autocast: tuple[str, bool] = ("cpu", False)
    graph: bool = True  # a backward will follow (autograd is recording)
    keep: Keep = ()  # a block's layers, a tail's one flag: keeps what backward needs (ExecutionPlan)
    dense_copy: bool = False  # BN with fixed statistics on a dense copy (CPU), see copies_for_dense_kernel
    group: Any = None  # training with synchronised batch norm: the process group (.sync)


class BN(NamedTuple):
    """A BatchNorm2d as the kernels read it, taken from the module once per call: module attribute
    reads go through ``nn.Module.__getattr__`` in Python, which at small batches cost more than the
    kernels themselves. Backward swaps in the saved parameters (:meth:`Layer.bind`)."""

    weight: Tensor
    bias: Tensor
    running_mean: Tensor
    running_var: Tensor
    num_batches_tracked: Tensor | None
    momentum: float | None
    eps: float

    @classmethod
    def of(cls, bn: nn.BatchNorm2d) -> BN:
        return cls(bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked, bn.momentum, bn.eps)

    @property
    def num_features(self) -> int:
        return self.weight.shape[0]


class Conv(NamedTuple):
    """A Conv2d's weight and settings (see :class:`BN`)."""

    weight: Tensor
    stride: Any
    padding: Any
    dilation: Any
    groups: int

    @classmethod
    def of(cls, conv: nn.Conv2d) -> Conv:
        return cls(conv.weight, conv.stride, conv.padding, conv.dilation, conv.groups)


class Layer(NamedTuple):
    """A torchvision ``_DenseLayer`` as the engine reads it (see :class:`BN`)."""

    norm1: BN
    conv1: Conv
    norm2: BN
    conv2: Conv
    drop_rate: float

    @classmethod
    def of(cls, layer: nn.Module) -> Layer:
        return cls(
            BN.of(layer.norm1), Conv.of(layer.conv1), BN.of(layer.norm2), Conv.of(layer.conv2),
            float(layer.drop_rate),
        )

    def params(self) -> list[Tensor]:
        """The parameters in the order the block Function receives (and returns gradients for) them."""
        n1, n2 = self.norm1, self.norm2
        return [n1.weight, n1.bias, self.conv1.weight, n2.weight, n2.bias, self.conv2.weight]

    def bind(self, p: list[Tensor]) -> Layer:
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


def memory_format(x: Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def autocast_on(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (never where it does not exist: ``meta``)."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def no_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast off for ``device_type`` inside (a no-op where autocast does not exist: ``meta``)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Batch statistics are kept in float32 at least (bf16/fp16 activations), as nn.BatchNorm does."""
    return torch.promote_types(dtype, torch.float32)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The activation dtype: autocast's low-precision type when active (convolutions run in it)."""
    device = x.device.type
    if autocast_on(device) and x.is_floating_point():
        return torch.get_autocast_dtype(device)
    return x.dtype


def check_norms(norms: list[nn.Module]) -> None:
    """The engine runs affine batch norms that track running statistics: ``nn.BatchNorm2d``, this
    package's synchronised one (a subclass) and torch's ``nn.SyncBatchNorm``."""
    for bn in norms:
        plain = isinstance(bn, (nn.BatchNorm2d, nn.SyncBatchNorm))
        if not plain or not bn.affine or not bn.track_running_stats:
            raise NotImplementedError(
                f"the memory-efficient engine expects affine nn.BatchNorm2d layers tracking running stats, "
                f"found {bn!r}; use memory_efficient=False"
            )


def needs_graph(tensors: list[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def copies_for_dense_kernel(device: torch.device) -> bool:
    """Whether BN with fixed statistics runs on a dense copy of the strided prefix (CPU) rather than
    on the view itself (CUDA). tests/perf/test_opcount.py counts the CUDA path on a CPU by
    switching this off."""
    return device.type == "cpu"


def make_call(
    modules: list[Any], keep: Keep, x: Tensor, training: bool, params: list[Tensor], group: Any = None
) -> Call:
    """The call's settings from its input: the compute dtype (autocast's), the memory format, and
    whether a backward will follow (else nothing is kept)."""
    dtype = compute_dtype(x)
    device = x.device.type
    graph = needs_graph([x, *params])
    return Call(
        modules,
        training,
        dtype,
        memory_format(x),
        (device, autocast_on(device)),
        graph,
        tuple(k and graph for k in keep),  # no backward follows: nothing to keep (as the native op folds it)
        copies_for_dense_kernel(x.device),
        group if training else None,
    )


class BlockTensors(NamedTuple):
    """A block's tensors and BN settings in the op's order, read once per call."""

    params: list[Tensor]  # per layer: norm1 weight, bias, conv1 weight, norm2 weight, bias, conv2 weight
    running: list[Tensor]  # per layer: norm1 mean, var, norm2 mean, var
    counters: list[Tensor]  # every BN's num_batches_tracked
    eps: list[float]  # per layer: norm1, norm2
    drop: list[float]
    momenta: list[float | None]  # per layer: norm1, norm2
    norms: list[nn.Module]
