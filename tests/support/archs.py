"""Reference models and input sizes shared by the test modules."""

from __future__ import annotations

import torchvision

from densenet_efficient.models.config import ArchConfig
from densenet_efficient.models.reference import torchvision_densenet as torchvision_reference
from densenet_efficient.models.registry import list_models

__all__ = ["ALL_ARCHS", "IMAGENET_ARCHS", "input_size", "torchvision_reference", "train_size"]

#: every registered model, and those torchvision builds too (its ImageNet DenseNets, whose
#: parameters, seeds and published weights the tests compare with torchvision's)
ALL_ARCHS = list_models()
IMAGENET_ARCHS = [name for name in ALL_ARCHS if name in torchvision.models.list_models()]


def input_size(config: ArchConfig) -> int:
    """A small spatial size that still exercises every block (CIFAR: 8, ImageNet: 32)."""
    return 8 if config.small_inputs else 32


def train_size(config: ArchConfig) -> int:
    """Large enough that the last block sees 2x2 maps: batch-norm over 2 values per channel has an
    identically zero input gradient, so comparisons there would compare rounding noise."""
    return 8 if config.small_inputs else 64
