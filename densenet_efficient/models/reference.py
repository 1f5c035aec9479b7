"""torchvision's own DenseNet for any :class:`~densenet_efficient.models.config.ArchConfig`.

The benchmark compares against it and the tests check equivalence with it. torchvision has no
CIFAR DenseNet, so for ``small_inputs`` configs its stem is swapped exactly as the original
efficient-DenseNet benchmark did (docs/measurement.md): a 3x3 stride-1 ``conv0`` and no
``norm0``/``relu0``/``pool0``; everything after the stem is torchvision's code.

>>> from densenet_efficient.models.config import get_config
>>> model = torchvision_densenet(get_config("densenet_bc_100"), memory_efficient=True)
>>> sum(p.numel() for p in model.parameters())
769162
"""

from __future__ import annotations

from collections import OrderedDict

import torch.nn as nn
import torchvision

from ..errors import UsageError
from .config import ArchConfig

__all__ = ["torchvision_densenet"]


def torchvision_densenet(
    config: ArchConfig, memory_efficient: bool = False, drop_rate: float = 0.0
) -> torchvision.models.DenseNet:
    """torchvision's ``DenseNet`` for ``config`` (CIFAR configs get the 3x3 stride-1 stem)."""
    if config.in_chans != 3:
        raise UsageError(f"torchvision's DenseNet takes 3 input channels, the config has {config.in_chans}")
    model = torchvision.models.DenseNet(
        growth_rate=config.growth_rate,
        block_config=tuple(config.block_config),
        num_init_features=config.num_init_features,
        bn_size=config.bn_size,
        num_classes=config.num_classes,
        memory_efficient=memory_efficient,
        drop_rate=drop_rate,
    )
    if config.small_inputs:
        rest = [
            (n, m)
            for n, m in model.features.named_children()
            if n not in ("conv0", "norm0", "relu0", "pool0")
        ]
        conv0 = nn.Conv2d(3, config.num_init_features, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(conv0.weight)
        model.features = nn.Sequential(OrderedDict([("conv0", conv0), *rest]))
    return model
