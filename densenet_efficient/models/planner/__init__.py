"""Training-step memory, read off the step itself simulated on phantom tensors, and what follows from it.

One job per module, each importing only those before it:

* :mod:`.units` - ``"8GiB"`` -> bytes and back (:func:`parse_memory`, :func:`format_bytes`).
* :mod:`.bisection` - the one search every question below reduces to.
* :mod:`.options` - what the functions accept, checked once.
* :mod:`.parameters` - parameter counts and channel widths from a config.
* :mod:`.recompute` - the time side: recomputation a plan adds (:func:`extra_time`).
* :mod:`.phantom` - tensors that say they are on the CPU and hold a meta tensor: the ops' meta kernels.
* :mod:`.shortcut` - outputs of the ops whose meta kernels are Python (or missing), from small real calls.
* :mod:`.simulate` - the training step on phantom tensors, live bytes counted per op.
* :mod:`.allocator` - what a device holds beyond the tensors (CPU runtime, CUDA rounding, context).
* :mod:`.estimate` - :class:`MemoryEstimate` and :func:`estimate_memory`.
* :mod:`.compose` - a plan priced from the segments of two simulated steps.
* :mod:`.search` - :func:`max_batch_size`, :func:`fit_memory`, :func:`deepest_densenet_bc`.
* :mod:`.report` - :func:`plan`, the rows ``densenet-efficient plan`` prints.
* :mod:`.verify` - ``model.fit_memory(..., verify=True)``: the real peak of a step on CUDA.

docs/planner.md says how the figures compare with measured steps.

>>> est = estimate_memory("densenet_bc_40", batch_size=32, mode="efficient", amp="bf16")
>>> est.total < parse_memory("8GiB")
True
"""

from ..parameters import count_parameters
from .allocator import CPU_RUNTIME, CUDA_CONTEXT
from .estimate import LOWEST_RATIO, MemoryEstimate, estimate_memory
from .options import (
    DEFAULT_OPTIMIZER,
    ESTIMABLE,
    OPTIMIZER_STATES,
    TORCHVISION,
    TORCHVISION_EFFICIENT,
    check_image_size,
)
from .recompute import ELEMENTWISE_MACS, extra_time
from .report import plan
from .search import MemoryBudgetError, deepest_densenet_bc, fit_memory, max_batch_size
from .units import MAX_BUDGET, format_bytes, parse_memory

__all__ = [
    "CPU_RUNTIME",
    "CUDA_CONTEXT",
    "DEFAULT_OPTIMIZER",
    "ELEMENTWISE_MACS",
    "ESTIMABLE",
    "LOWEST_RATIO",
    "MAX_BUDGET",
    "OPTIMIZER_STATES",
    "TORCHVISION",
    "TORCHVISION_EFFICIENT",
    "MemoryBudgetError",
    "MemoryEstimate",
    "check_image_size",
    "count_parameters",
    "deepest_densenet_bc",
    "estimate_memory",
    "extra_time",
    "fit_memory",
    "format_bytes",
    "max_batch_size",
    "parse_memory",
    "plan",
]
