"""Memory-efficient DenseNets with torchvision's exact ``state_dict`` layout.

>>> import densenet_efficient as de
>>> model = de.densenet_bc_100(memory_efficient=True)   # torchvision's weights load unchanged too
>>> sum(p.numel() for p in model.parameters())
769162

The package reads top-down, each layer importing only the ones above it in this list:
:mod:`.io` (files) <- :mod:`.models` (configs, modules, engine, weights, builders) <-
:mod:`.conversion` (any checkpoint -> verified Hub folder) <- :mod:`.perf` (measurement,
benchmark) <- :mod:`.training` <- :mod:`.cli`; the memory planner is :mod:`.models.planner`.
See docs/architecture.md.
"""

from .conversion import ConversionError, ConvertResult, convert, infer_config
from .io.checkpoint import CheckpointError, read_checkpoint
from .io.download import WeightsIntegrityError
from .io.state_dict import StateDictMismatchError, remap_keys
from .models import ARCHITECTURES, ArchConfig, DenseNet, densenet_bc_config, get_config, list_architectures
from .models import builders as _builders
from .models.builders import *  # noqa: F403  every registered builder (densenet121, ...), create_model, get_model, ...
from .models.engine import MODES, EngineStatus, NativeBuildError, engine_status
from .models.hub import save_hub_folder
from .models.memory_plan import MemoryPlan
from .models.planner import (
    MemoryBudgetError,
    MemoryEstimate,
    estimate_memory,
    fit_memory,
    max_batch_size,
    parse_memory,
)
from .models.sync_batchnorm import SyncBatchNorm2d, convert_sync_batchnorm
from .models.weights import ENUM_NAMES as _ENUM_NAMES
from .models.weights import WeightsNotAvailableError, WeightsSpec, get_weights, list_weights

__version__ = "0.1.0"


def __getattr__(name: str):
    """``de.DenseNet121_Weights`` and the other weights enums: made on first use, because they
    subclass torchvision's ``WeightsEnum`` and importing torchvision is slow (models/weights.py)."""
    from .models import weights

    if name in weights.LAZY_ENUMS and name != "WeightsEnum":
        return getattr(weights, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    # architectures and models
    "ARCHITECTURES",
    "ArchConfig",
    "DenseNet",
    "MODES",
    "EngineStatus",
    "NativeBuildError",
    "engine_status",
    "SyncBatchNorm2d",
    "convert_sync_batchnorm",
    "densenet_bc_config",
    "get_config",
    "list_architectures",
    # the builders: create_model, densenet_bc, from_pretrained, get_model, list_models and every
    # registered model (densenet121, ...), which @register_model adds to builders.__all__
    *_builders.__all__,
    # weights and hubs: every published architecture's enum (DenseNet121_Weights, ...), made on first use
    *_ENUM_NAMES.values(),
    "WeightsIntegrityError",
    "WeightsNotAvailableError",
    "WeightsSpec",
    "get_weights",
    "list_weights",
    "save_hub_folder",
    # checkpoints and conversion
    "CheckpointError",
    "ConversionError",
    "ConvertResult",
    "StateDictMismatchError",
    "convert",
    "infer_config",
    "read_checkpoint",
    "remap_keys",
    # memory planning and the dial
    "MemoryBudgetError",
    "MemoryEstimate",
    "MemoryPlan",
    "estimate_memory",
    "fit_memory",
    "max_batch_size",
    "parse_memory",
]
