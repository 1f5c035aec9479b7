"""Performance: how much memory and time a training step takes.

* :mod:`.measure` - one figure per fresh process (the protocol of docs/measurement.md).
* :mod:`..models.planner` (re-exported here) - the simulated estimate: peak memory per mode, largest batch, deepest model.
* :mod:`.benchmark` - implementations side by side, ratios to torchvision, sweeps.
"""

from ..models.planner import MemoryEstimate, estimate_memory, format_bytes, max_batch_size, parse_memory
from .measure import IMPLEMENTATIONS, StepSpec, measure

__all__ = [
    "IMPLEMENTATIONS",
    "MemoryEstimate",
    "StepSpec",
    "estimate_memory",
    "format_bytes",
    "max_batch_size",
    "measure",
    "parse_memory",
]
