"""The architecture: configs as data, the nn.Modules, the memory-efficient engine, the builders.

* :mod:`.config` - :class:`ArchConfig` and the table of named architectures.
* :mod:`.engine` - how dense blocks, transitions and the stem execute in each memory mode.
* :mod:`.densenet` - the module tree (torchvision's names, key order and initialisation).
* :mod:`.hub` - the Hugging Face folder format and the mixin the model class inherits.
* :mod:`.weights` - published weights (manifest as data, torchvision-style enums).
* :mod:`.builders` - ``densenet121(weights=...)`` and friends, ``create_model``, ``from_pretrained``.
* :mod:`.reference` - torchvision's own DenseNet for any config (the baseline everything is checked against).
"""

from .builders import (
    create_model,
    densenet121,
    densenet161,
    densenet169,
    densenet201,
    densenet_bc,
    densenet_bc_100,
    from_pretrained,
    get_model,
    list_models,
)
from .config import ARCHITECTURES, ArchConfig, densenet_bc_config, get_config, list_architectures
from .densenet import DenseNet, DenseNetFeatures

__all__ = [
    "ARCHITECTURES",
    "ArchConfig",
    "DenseNet",
    "DenseNetFeatures",
    "create_model",
    "densenet121",
    "densenet161",
    "densenet169",
    "densenet201",
    "densenet_bc",
    "densenet_bc_100",
    "densenet_bc_config",
    "from_pretrained",
    "get_config",
    "get_model",
    "list_architectures",
    "list_models",
]
