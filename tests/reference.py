"""Reference models and input sizes shared by the test modules."""

from __future__ import annotations

from collections import OrderedDict

import torch.nn as nn
import torchvision

from densenet_efficient.registry import ARCHITECTURES, ArchConfig

IMAGENET_ARCHS = ["densenet121", "densenet161", "densenet169", "densenet201"]
ALL_ARCHS = sorted(ARCHITECTURES)


def torchvision_reference(config: ArchConfig, memory_efficient: bool = False) -> torchvision.models.DenseNet:
    """torchvision's DenseNet for ``config``; for CIFAR configs its stem is swapped as MEASURE.md does."""
    model = torchvision.models.DenseNet(
        growth_rate=config.growth_rate,
        block_config=tuple(config.block_config),
        num_init_features=config.num_init_features,
        bn_size=config.bn_size,
        num_classes=config.num_classes,
        memory_efficient=memory_efficient,
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


def input_size(config: ArchConfig) -> int:
    """A small spatial size that still exercises every block (CIFAR: 8, ImageNet: 32)."""
    return 8 if config.small_inputs else 32


def train_size(config: ArchConfig) -> int:
    """Large enough that the last block sees 2x2 maps: batch-norm over 2 values per channel has an
    identically zero input gradient, so comparisons there would compare rounding noise."""
    return 8 if config.small_inputs else 64
