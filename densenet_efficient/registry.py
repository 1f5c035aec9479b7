"""Architecture configurations as data.

Every named architecture is one :class:`ArchConfig` in :data:`ARCHITECTURES`; builders, the
hubs, conversion and the memory planner all read the same entries, so adding a variant means
adding one line here, never a new builder body.

>>> from densenet_efficient.registry import get_config, densenet_bc_config
>>> get_config("densenet121").block_config
(6, 12, 24, 16)
>>> densenet_bc_config(40).block_config
(6, 6, 6)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any


@dataclass(frozen=True)
class ArchConfig:
    """The constructor arguments of :class:`~densenet_efficient.DenseNet` that fix its tensors."""

    growth_rate: int
    block_config: tuple[int, ...]
    num_init_features: int
    bn_size: int = 4
    num_classes: int = 1000
    small_inputs: bool = False

    def to_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``DenseNet(**kwargs)``."""
        kwargs = asdict(self)
        kwargs["block_config"] = tuple(self.block_config)
        return kwargs

    def with_classes(self, num_classes: int) -> ArchConfig:
        return replace(self, num_classes=num_classes)


def densenet_bc_config(depth: int, growth_rate: int = 12, num_classes: int = 10) -> ArchConfig:
    """The CIFAR DenseNet-BC of a given depth, as the original efficient-DenseNet demo built it.

    Depth counts the convolutions and the classifier: 3 dense blocks of n bottleneck layers
    (2 convs each), 2 transitions, the stem conv and the classifier, so depth = 6n + 4.
    """
    if not isinstance(depth, int) or isinstance(depth, bool):
        raise TypeError(f"depth must be an int, got {type(depth).__name__}")
    if depth < 10 or (depth - 4) % 6 != 0:
        lo = max(10, (depth - 4) // 6 * 6 + 4)
        raise ValueError(
            f"DenseNet-BC depth must be of the form 6n+4 with n >= 1 (e.g. {lo}, {lo + 6}), got {depth}"
        )
    if growth_rate < 1:
        raise ValueError(f"growth_rate must be >= 1, got {growth_rate}")
    n = (depth - 4) // 6
    return ArchConfig(
        growth_rate=growth_rate,
        block_config=(n, n, n),
        num_init_features=2 * growth_rate,
        bn_size=4,
        num_classes=num_classes,
        small_inputs=True,
    )


#: Named architectures. ImageNet configs are torchvision's; DenseNet-BC-100 is the CIFAR model of
#: the original memory-efficient DenseNet report (k=12, 769,162 parameters).
ARCHITECTURES: dict[str, ArchConfig] = {
    "densenet121": ArchConfig(32, (6, 12, 24, 16), 64),
    "densenet161": ArchConfig(48, (6, 12, 36, 24), 96),
    "densenet169": ArchConfig(32, (6, 12, 32, 32), 64),
    "densenet201": ArchConfig(32, (6, 12, 48, 32), 64),
    "densenet_bc_100": densenet_bc_config(100),
}


def list_architectures() -> list[str]:
    return sorted(ARCHITECTURES)


def get_config(name: str) -> ArchConfig:
    """The registered config called ``name`` (clear error listing the known names otherwise)."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ValueError(
            f"unknown architecture {name!r}; expected one of {', '.join(list_architectures())} "
            "(or densenet_bc(depth) for any DenseNet-BC depth)"
        ) from None
