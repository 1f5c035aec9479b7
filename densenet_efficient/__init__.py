"""Memory-efficient DenseNets with torchvision's exact ``state_dict`` layout.

>>> import densenet_efficient as de
>>> model = de.densenet121(memory_efficient=True)   # torchvision's weights load unchanged
"""

from .engine import MODES
from .hub import from_pretrained, save_hub_folder
from .memory import MemoryEstimate, estimate_memory, max_batch_size
from .models import (
    DenseNet,
    create_model,
    densenet121,
    densenet161,
    densenet169,
    densenet201,
    densenet_bc,
    densenet_bc_100,
)
from .registry import ARCHITECTURES, ArchConfig, densenet_bc_config, get_config, list_architectures
from .state_dict import StateDictMismatchError, remap_keys
from .weights import (
    DenseNet121_Weights,
    DenseNet161_Weights,
    DenseNet169_Weights,
    DenseNet201_Weights,
    WeightsIntegrityError,
    WeightsNotAvailableError,
    WeightsSpec,
    get_weights,
    list_weights,
)

__version__ = "0.1.0"

__all__ = [
    "ARCHITECTURES",
    "ArchConfig",
    "DenseNet",
    "MODES",
    "StateDictMismatchError",
    "create_model",
    "densenet121",
    "densenet161",
    "densenet169",
    "densenet201",
    "densenet_bc",
    "densenet_bc_100",
    "densenet_bc_config",
    "get_config",
    "list_architectures",
    "remap_keys",
    "DenseNet121_Weights",
    "DenseNet161_Weights",
    "DenseNet169_Weights",
    "DenseNet201_Weights",
    "WeightsIntegrityError",
    "WeightsNotAvailableError",
    "WeightsSpec",
    "get_weights",
    "list_weights",
    "from_pretrained",
    "save_hub_folder",
    "MemoryEstimate",
    "estimate_memory",
    "max_batch_size",
]

# Conversion (issue 6). Note: this binds ``densenet_efficient.convert`` to the function; the module
# stays reachable as ``importlib.import_module("densenet_efficient.convert")`` (the CLI does that).
from .checkpoint import CheckpointError, read_checkpoint  # noqa: E402
from .convert import ConversionError, ConvertResult, convert, infer_config  # noqa: E402

__all__ += [
    "CheckpointError",
    "ConversionError",
    "ConvertResult",
    "convert",
    "infer_config",
    "read_checkpoint",
]
