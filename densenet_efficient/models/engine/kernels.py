"""The engine's other single-kernel pieces: convolutions, ReLU's backward, casts, pooling settings,
and the scratch allocation per-layer temporaries live in."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .context import stat_dtype

_aten = torch.ops.aten


class Scratch:
    """One reusable allocation for per-layer temporaries of up to ``channels`` channels.

    On CPU every fresh large tensor costs a page fault per 4 KiB when first written, which made
    these temporaries as expensive as the arithmetic on them; views into one buffer sized for the
    widest layer avoid that without raising the peak (the temporaries existed anyway).
    """

    def __init__(self, like: Tensor, channels: int, fmt: torch.memory_format) -> None:
        n, _, h, w = like.shape
        self.flat = torch.empty(n * channels * h * w, dtype=like.dtype, device=like.device)
        self.n, self.h, self.w, self.fmt = n, h, w, fmt
        self.unused = torch.empty(0, dtype=stat_dtype(like.dtype), device=like.device)

    def view(self, channels: int) -> Tensor:
        """A dense ``(n, channels, h, w)`` tensor in the block's memory format at the scratch's start.

        One ``as_strided`` rather than a slice and a view: the same tensor, one op instead of two
        (three for channels_last), and on fake tensors (the compiler's tracing, the planner's
        simulation) 0.3 ms instead of 2.5: the view's Python meta function checks every dimension.
        """
        n, h, w = self.n, self.h, self.w
        if n * channels * h * w > self.flat.numel():  # as_strided checks no bounds on fake tensors
            raise RuntimeError(f"scratch of {self.flat.numel()} elements asked for {channels} channels")
        if self.fmt == torch.channels_last:
            return self.flat.as_strided((n, channels, h, w), (h * w * channels, 1, w * channels, channels))
        return self.flat.as_strided((n, channels, h, w), (channels * h * w, h * w, w, 1))


def cast_all(tensors: list[Tensor], dtypes: list[torch.dtype]) -> list[Tensor]:
    """``[t.to(d) for t, d in zip(tensors, dtypes)]`` as one kernel: autocast's weight casts (and
    their gradients' casts back) a block at a time instead of one op per convolution."""
    if all(t.dtype == d for t, d in zip(tensors, dtypes, strict=True)):
        return list(tensors)
    out = [torch.empty_like(t, dtype=d) for t, d in zip(tensors, dtypes, strict=True)]
    torch._foreach_copy_(out, tensors)
    return out


def conv_weights(layers: list[Any], dtype: torch.dtype) -> list[Tensor]:
    """Every convolution weight of a block (conv1, conv2 per layer) in the compute dtype."""
    params = [p for layer in layers for p in (layer.conv1.weight, layer.conv2.weight)]
    return cast_all(params, [dtype] * len(params))


def conv(x: Tensor, conv: nn.Conv2d, weight: Tensor) -> Tensor:
    return F.conv2d(x, weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)


def conv_backward(grad: Tensor, x: Tensor, conv: nn.Conv2d, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Native convolution backward: (grad_input, grad_weight in ``weight``'s dtype)."""
    gx, gw, _ = _aten.convolution_backward.default(
        grad, x, weight, None, conv.stride, conv.padding, conv.dilation, False, [0, 0], conv.groups,
        [True, True, False],
    )
    return gx, gw


def relu_backward_(grad: Tensor, out: Tensor) -> Tensor:
    """ReLU backward written into ``grad`` itself (it is a temporary we own)."""
    return _aten.threshold_backward.grad_input(grad, out, 0, grad_input=grad)


def pool_args(pool: nn.MaxPool2d) -> list[Any]:
    return [pair(pool.kernel_size), pair(pool.stride), pair(pool.padding), pair(pool.dilation), pool.ceil_mode]


def pair(v: int | tuple[int, int]) -> list[int]:
    return list(v) if isinstance(v, (tuple, list)) else [v, v]

