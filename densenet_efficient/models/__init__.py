"""The architecture: configs as data, the nn.Modules, the memory-efficient engine, the builders.

* :mod:`.config` - :class:`ArchConfig` and the model table (each named architecture and its published weights).
* :mod:`.engine` - how dense blocks, transitions and the stem execute in each memory mode.
* :mod:`.densenet` - the module tree (torchvision's names, key order and initialisation).
* :mod:`.hub` - the Hugging Face folder format and the mixin the model class inherits.
* :mod:`.weights` - published weights: the manifest and torchvision-style enums made from the table, ``weights=``.
* :mod:`.registry` - the one list of model names: ``@register_model``, ``list_models``, ``get_model``.
* :mod:`.builders` - ``densenet121(weights=...)`` and friends, ``create_model``, ``from_pretrained``.
* :mod:`.reference` - torchvision's own DenseNet for any config (the baseline everything is checked against).
"""

from . import builders
from .builders import *  # noqa: F403  every registered builder (densenet121, ...), create_model, get_model, ...
from .config import ARCHITECTURES, ArchConfig, densenet_bc_config, get_config, list_architectures
from .densenet import DenseNet, DenseNetFeatures

__all__ = [
    "ARCHITECTURES",
    "ArchConfig",
    "DenseNet",
    "DenseNetFeatures",
    "densenet_bc_config",
    "get_config",
    "list_architectures",
    *builders.__all__,
]
