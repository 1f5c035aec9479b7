"""What the planner's functions accept, checked once: dtypes, autocast, optimizer, device, input
and memory settings.

>>> from densenet_efficient.models.config import resolve_arch
>>> check_image_size(resolve_arch("densenet121"), None)
224
"""

from __future__ import annotations

from typing import Any

from ...errors import UsageError, check_int
from ..config import ArchConfig
from ..engine import MODES
from ..memory_plan import MemoryPlan, resolve_memory_plan

__all__ = [
    "DEFAULT_OPTIMIZER",
    "ESTIMABLE",
    "OPTIMIZER_STATES",
    "TORCHVISION",
    "TORCHVISION_EFFICIENT",
    "check_image_size",
    "check_options",
    "resolve_setting",
]

#: torchvision's DenseNet, naive and with its own ``memory_efficient=True`` (checkpointing): the
#: baselines the planner models besides this package's settings.
TORCHVISION = "torchvision"
TORCHVISION_EFFICIENT = "torchvision_efficient"
#: What :func:`~densenet_efficient.models.planner.estimate_memory` can model.
ESTIMABLE = (*MODES, TORCHVISION, TORCHVISION_EFFICIENT)

_DTYPE_BYTES = {
    "fp32": 4,
    "float32": 4,
    "bf16": 2,
    "bfloat16": 2,
    "fp16": 2,
    "float16": 2,
    "fp64": 8,
    "float64": 8,
}
_AMP = {None: None, "none": None, "bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16"}
#: Optimizer state per parameter, in parameter-sized tensors: ``"momentum"`` (SGD with momentum,
#: what DenseNet recipes and ``densenet-efficient train`` use, and every planner function's
#: default) keeps one buffer, plain ``"sgd"`` none, Adam two.
OPTIMIZER_STATES = {"none": 0, "sgd": 0, "momentum": 1, "adam": 2, "adamw": 2}
#: The optimizer every planner entry point (and ``model.fit_memory``) assumes unless told.
DEFAULT_OPTIMIZER = "momentum"


def check_image_size(
    config: ArchConfig, image_size: int | None, name: str | None = None, option: str = "image_size"
) -> int:
    """``image_size``, or the architecture's default when None, checked to be a size the model
    accepts (a :class:`UsageError` says the smallest one otherwise; 0 is not "the default").
    ``option``: what the caller's user calls the size (a command line's ``--image-size``).

    >>> from densenet_efficient.models.config import densenet_bc_config
    >>> check_image_size(densenet_bc_config(40), None)
    32
    """
    if image_size is None:
        return config.default_resolution
    image_size = check_int(image_size, option)
    least = config.min_input_size()
    if image_size < least:
        raise UsageError(
            f"{option} {image_size} is too small for {name or config.name}: it needs at least {least}x{least}"
        )
    return image_size


def check_options(dtype: str, amp: str | None, optimizer: str, device: str) -> str | None:
    """Refuse unknown settings by name; return ``amp`` normalised (``"bf16"``, ``"fp16"`` or None)."""
    if not isinstance(dtype, str) or dtype not in _DTYPE_BYTES:
        raise UsageError(f"dtype must be one of {', '.join(sorted(_DTYPE_BYTES))}, got {dtype!r}")
    if not (amp is None or isinstance(amp, str)) or amp not in _AMP:
        raise UsageError(f"amp must be None, 'bf16' or 'fp16', got {amp!r}")
    if not isinstance(optimizer, str) or optimizer not in OPTIMIZER_STATES:
        raise UsageError(f"optimizer must be one of {', '.join(OPTIMIZER_STATES)}, got {optimizer!r}")
    if device not in ("cuda", "cpu"):
        raise UsageError(f"device must be 'cuda' or 'cpu', got {device!r}")
    return _AMP[amp]


def resolve_setting(mode: Any, config: ArchConfig) -> MemoryPlan | str:
    """A torchvision baseline's name as it is, anything else as the model would resolve it."""
    if isinstance(mode, str) and mode in (TORCHVISION, TORCHVISION_EFFICIENT):
        return mode
    if isinstance(mode, str) and mode not in MODES and mode not in ("default", "max"):
        raise UsageError(
            f"memory_efficient must be one of {', '.join(ESTIMABLE)} or per-block settings, got {mode!r}"
        )
    return resolve_memory_plan(mode, config)
