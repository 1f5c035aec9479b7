"""The time side of the dial: recomputation a plan adds, as a fraction of a training step's work
(counted in multiply-adds; what :func:`~.search.fit_memory` minimises)."""

from __future__ import annotations

import itertools

from ..config import ArchConfig
from ..engine import MAX_SAVING, NAIVE
from ..memory_plan import BlockSetting, MemoryPlan
from ..parameters import block_inputs, width_sum

__all__ = ["ELEMENTWISE_MACS", "extra_time", "runs"]

#: Cost of one elementwise pass over one element, in multiply-adds: what recomputing BN/ReLU/pooling
#: costs next to convolutions (about 40 on a 2-core CPU and on an H100 alike, within 2x).
ELEMENTWISE_MACS = 40


def extra_time(config: ArchConfig, plan: MemoryPlan, image_size: int) -> float:
    """Recomputation a plan adds over ``"efficient"``, as a fraction of a training step's work.

    Counted in multiply-adds (a training step is three times the forward's: forward, input
    gradients, weight gradients): each layer that does not keep its bottleneck recomputes its 1x1
    convolution (``c_l * B`` per pixel); a ``"max_saving"`` stem recomputes norm0, relu0 and the
    max-pool's indices (four elementwise passes). Naive blocks count 0: they recompute nothing.
    Independent of the batch size.

    >>> from densenet_efficient.models.config import get_config
    >>> cfg = get_config("densenet121")
    >>> round(extra_time(cfg, MemoryPlan.uniform("max_saving", 4), 224), 3)
    0.166
    """
    k, bn, c0 = config.growth_rate, config.bn_size * config.growth_rate, config.num_init_features
    stem = config.stem_size(image_size)  # conv0's output (the CIFAR stem's 3x3 keeps the size)
    forward = config.in_chans * c0 * (9 if config.small_inputs else 49) * stem * stem
    max_saving_stem = not config.small_inputs and plan.stem == MAX_SAVING
    extra = 4 * ELEMENTWISE_MACS * c0 * stem * stem if max_saving_stem else 0
    sizes = config.block_sizes(image_size)
    for b, (layers, c, h) in enumerate(zip(config.block_config, block_inputs(config), sizes, strict=True)):
        s = h * h
        forward += (width_sum(c, k, 0, layers) * bn + layers * 9 * bn * k) * s
        setting, first = plan.blocks[b], 0
        for kept, count in runs(setting, layers) if setting != NAIVE else []:
            extra += 0 if kept else width_sum(c, k, first, count) * bn * s
            first += count
        if b + 1 < len(sizes):  # the engine's transition pools before its 1x1 conv
            end = c + layers * k
            forward += end * (end // 2) * sizes[b + 1] ** 2
    return extra / (3 * forward)


def runs(setting: BlockSetting, layers: int) -> list[tuple[bool, int]]:
    """An engine block's layers as runs of (keeps its bottleneck, how many layers)."""
    if isinstance(setting, str):
        return [(setting != MAX_SAVING, layers)]
    return [(kept, len(list(run))) for kept, run in itertools.groupby(setting)]
