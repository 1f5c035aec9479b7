"""Reference models and input sizes shared by the test modules."""

from __future__ import annotations

import dataclasses

import torchvision

from densenet_efficient.models.config import ArchConfig, get_config
from densenet_efficient.models.reference import torchvision_densenet as torchvision_reference
from densenet_efficient.models.registry import list_models

__all__ = [
    "ALL_ARCHS",
    "FULL_WIDTH",
    "IMAGENET_ARCHS",
    "input_size",
    "numerics_config",
    "torchvision_reference",
    "train_size",
]

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


#: The architectures whose registry-wide numerics checks (float64 training steps against naive and
#: torchvision, traced graphs) run at full size: one ImageNet and one CIFAR model.
FULL_WIDTH = ("densenet121", "densenet_bc_100")


def numerics_config(arch: str) -> ArchConfig:
    """``arch`` as the registry-wide numerics checks run it: its own depth, block layout, stem and
    head, at full width for :data:`FULL_WIDTH` and at growth rate 4 with 8 stem features for the
    others. Width changes no code path (every block, layer, transition and stem runs the same
    loops); it changes the cost, which for densenet264 in float64 is minutes."""
    config = get_config(arch)
    return config if arch in FULL_WIDTH else dataclasses.replace(config, growth_rate=4, num_init_features=8)

