"""Parameter counts and channel widths of a DenseNet, from its config alone (O(blocks) at any depth).

>>> from densenet_efficient.models.config import resolve_arch
>>> count_parameters(resolve_arch("densenet121")), block_inputs(resolve_arch("densenet121"))
(7978856, [64, 128, 256, 512])
"""

from __future__ import annotations

import os

import torch

from ..errors import UsageError
from .config import ArchConfig

__all__ = ["block_inputs", "check_model_size", "count_parameters", "device_memory", "largest_map", "width_sum"]


def count_parameters(config: ArchConfig) -> int:
    """Trainable parameters of ``config``, computed from the architecture alone.

    >>> from densenet_efficient.models.config import densenet_bc_config
    >>> count_parameters(densenet_bc_config(100))
    769162
    """
    k, bn, c = config.growth_rate, config.bn_size * config.growth_rate, config.num_init_features
    total = 3 * c * (9 if config.small_inputs else 49) + (0 if config.small_inputs else 2 * c)
    for b, layers in enumerate(config.block_config):
        # layer i (c_i = c + i k inputs): norm1 2 c_i, conv1 c_i B, norm2 2B, conv2 9Bk; summed
        # over the block in closed form (any depth in O(1))
        inputs = layers * c + k * (layers * (layers - 1) // 2)  # sum of c_i
        total += (2 + bn) * inputs + layers * (2 * bn + 9 * bn * k)
        c += layers * k
        if b < len(config.block_config) - 1:
            total += 2 * c + c * (c // 2)
            c //= 2
    return total + 2 * c + c * config.num_classes + config.num_classes


def block_inputs(config: ArchConfig) -> list[int]:
    """The channels entering each dense block (layer ``i`` of block ``b`` reads ``c_b + i k``)."""
    out, c = [], config.num_init_features
    for layers in config.block_config:
        out.append(c)
        c = (c + layers * config.growth_rate) // 2
    return out


def largest_map(config: ArchConfig, size: int) -> int:
    """Values per image of the largest map a training step of ``config`` makes at ``size`` pixels:
    its input, the stem's output, a block's widest concatenation or a bottleneck (or the logits).

    >>> from densenet_efficient.models.config import get_config
    >>> largest_map(get_config("densenet121"), 224) == 64 * 112 * 112
    True
    """
    stem = config.stem_size(size)
    largest = max(config.in_chans * size * size, config.num_init_features * stem * stem, config.num_classes)
    bottleneck = config.bn_size * config.growth_rate
    for c, layers, s in zip(block_inputs(config), config.block_config, config.block_sizes(size), strict=True):
        largest = max(largest, max(c + layers * config.growth_rate, bottleneck) * s * s)
    return largest


def width_sum(c: int, k: int, first: int, count: int) -> int:
    """Channels read by layers ``first .. first+count-1`` of a block entered with ``c``: sum of ``c + i k``."""
    return count * c + k * (count * (2 * first + count - 1) // 2)


def device_memory(device: torch.device) -> int | None:
    """Bytes of memory ``device`` has in all (CPU: the machine's physical memory; CUDA: the card's),
    or ``None`` where that is not known (a meta device, another backend, no ``sysconf``)."""
    if device.type == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (AttributeError, ValueError, OSError):  # not POSIX
            return None
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device).total_memory
    return None


def check_model_size(
    config: ArchConfig, dtype: torch.dtype | None = None, device: torch.device | None = None
) -> int:
    """The parameter count of ``config``; a :class:`UsageError` when its parameters alone would not
    fit the memory of the device they are made on (``torch.get_default_device()`` and
    ``torch.get_default_dtype()`` unless given), said before anything is allocated.

    ``densenet_bc(40, growth_rate=10**6)`` used to allocate until the machine ran out of memory:
    the count is closed form (O(blocks)), so the refusal costs nothing at any size.

    >>> from densenet_efficient.models.config import densenet_bc_config
    >>> check_model_size(densenet_bc_config(100))
    769162
    """
    n = count_parameters(config)
    dtype = dtype or torch.get_default_dtype()
    device = device or torch.get_default_device()
    need = n * torch.empty((), dtype=dtype, device="meta").element_size()
    have = device_memory(device)
    if have is not None and need > have:
        raise UsageError(
            f"this DenseNet would have {n:,} parameters, {_gib(need)} in {str(dtype).removeprefix('torch.')} "
            f"before any gradient or activation, more than the {_gib(have)} of memory of "
            f"{device.type}; choose a smaller growth_rate, block_config, num_init_features, bn_size "
            "or num_classes"
        )
    return n


def _gib(n: int) -> str:
    return f"{n / 2**30:.3g} GiB"
