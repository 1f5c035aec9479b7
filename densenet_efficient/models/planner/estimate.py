"""The estimate: bytes one training step needs, split the way a budget is spent; no model is run.

>>> est = estimate_memory("densenet121", batch_size=32, mode="efficient", amp="bf16")
>>> est.total < 8 * 2**30
True
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ...errors import check_int
from ..config import ArchConfig, resolve_arch
from ..engine import EFFICIENT, NAIVE
from ..memory_plan import MemorySetting
from .options import (
    DEFAULT_OPTIMIZER,
    OPTIMIZER_STATES,
    TORCHVISION,
    Dial,
    check_image_size,
    check_options,
    dtype_bytes,
    resolve_setting,
)
from .parameters import count_parameters
from .recompute import extra_time
from .timeline import peak, timeline

__all__ = [
    "CPU_FIRST_STEP_OVERHEAD",
    "CPU_FIRST_STEP_PER_LAYER",
    "ENGINE_FIXED_MARGIN_PERCENT",
    "PER_IMAGE_MARGIN_PERCENT",
    "CUDA_CONTEXT",
    "LOWEST_RATIO",
    "MemoryEstimate",
    "estimate_memory",
]

#: The planner's promise, checked on a measured grid (docs/planner.md, scripts/planner_grid.py):
#: a measured whole step is at most ``total`` and at least this share of it.
LOWEST_RATIO = 0.90
#: The calibrated margins (docs/planner.md), on settings that run the engine anywhere; none for
#: all-naive settings, which measured as counted. In percent of the per-image part of the peak
#: (activations + workspace), and of the fixed part of the engine's workspace (its blocks'
#: parameter gradients and autocast weight copies): what the engine's backward holds beyond the
#: tensors the timeline counts varies with the CPU (oneDNN's convolution scratch and reorders
#: depend on its instruction set), calibrated on the grid of docs/planner.md.
PER_IMAGE_MARGIN_PERCENT = 8
ENGINE_FIXED_MARGIN_PERCENT = 30

_MIB = 1 << 20
#: One-time allocations of the first training step on CPU (oneDNN kernels and their per-shape
#: primitives, thread pools, the autograd engine, heap the allocator keeps): they grow with the
#: number of layers. Measured (fresh process - the same step again, peak RSS; docs/planner.md):
#: 37-39 MiB at 18 dense layers, 53-60 MiB at 48-58, 63-72 MiB at 82-98, 84-86 MiB at 93
#: (DenseNet-BC-190); this base plus the per-layer figure is an upper envelope of them.
CPU_FIRST_STEP_OVERHEAD = 32 * _MIB
CPU_FIRST_STEP_PER_LAYER = 563 * (1 << 10)  # 0.55 MiB per dense layer
#: CUDA context + cuBLAS/cuDNN handles: device memory that ``max_memory_allocated`` never sees
#: but a budget must leave room for (typically 300-600 MiB, depending on card and driver).
CUDA_CONTEXT = 512 * _MIB


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one training step needs, split the way the budget is spent.

    ``activations``: tensors autograd keeps for backward, at the end of forward.
    ``workspace``: extra live at the peak of backward (gradient buffers, recomputed tensors).
    ``overhead``: the first step's one-time allocations on CPU (:data:`CPU_FIRST_STEP_OVERHEAD`
    plus :data:`CPU_FIRST_STEP_PER_LAYER` per dense layer).
    ``margin``: the calibrated headroom of settings that run the engine, for what no tensor count
    sees (:data:`PER_IMAGE_MARGIN_PERCENT`, :data:`ENGINE_FIXED_MARGIN_PERCENT`, docs/planner.md).
    ``peak``: ``activations + workspace + overhead + margin``, the figure the measurement protocol and
    the benchmark report. ``total`` adds parameters, gradients, optimizer state, the input batch
    and (CUDA) the context: what must fit the device. ``breakdown``: bytes kept per stage, a dense
    block's layers together as one entry (``block1.layer1-16``), so its size does not grow with depth.
    ``extra_time``: recomputation beyond the ``"efficient"`` mode's, as a fraction of the step
    (:func:`~.recompute.extra_time`). ``image_size``: the input's height and width.
    """

    arch: str
    mode: str
    batch_size: int
    image_size: int
    device: str
    activation_dtype: str
    activations: int
    workspace: int
    overhead: int
    parameters: int
    gradients: int
    optimizer_state: int
    inputs: int
    context: int
    breakdown: dict[str, int] = field(default_factory=dict, compare=False)
    extra_time: float = 0.0
    margin: int = 0

    @property
    def peak(self) -> int:
        return self.activations + self.workspace + self.overhead + self.margin

    @property
    def total(self) -> int:
        return (
            self.parameters + self.gradients + self.optimizer_state + self.inputs + self.context + self.peak
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields with ``peak`` and ``total``."""
        d = asdict(self)
        d.update(peak=self.peak, total=self.total)
        return d


def estimate_memory(
    arch: str | ArchConfig,
    *,
    batch_size: int,
    image_size: int | None = None,
    mode: MemorySetting = EFFICIENT,
    dtype: str = "fp32",
    amp: str | None = None,
    device: str = "cuda",
    optimizer: str = DEFAULT_OPTIMIZER,
) -> MemoryEstimate:
    """Analytic peak memory of one training step (forward, loss, backward); no model is run.

    Args:
        arch: an architecture name (``"densenet121"``), ``"densenet_bc_<depth>"`` or an :class:`ArchConfig`.
        batch_size: images per step.
        image_size: input height and width (default: 32 for CIFAR configs, 224 otherwise).
        mode: anything the model's ``memory_efficient`` takes (``"naive"``, ``"efficient"``,
            ``"max_saving"``, ``False``/``True``, per-block settings, a :class:`MemoryPlan`), or
            ``"torchvision"``/``"torchvision_efficient"`` for torchvision's own DenseNet.
        dtype: parameter and activation dtype when not using autocast (``fp32``, ``bf16``, ...).
        amp: ``"bf16"``/``"fp16"``: autocast, so activations are half precision, parameters fp32.
        device: ``"cuda"`` (adds the CUDA context to ``total``) or ``"cpu"`` (adds the one-time
            first-step allocations that peak RSS shows).
        optimizer: ``"momentum"`` (SGD with momentum: one buffer, the default), ``"sgd"`` (plain
            SGD: none), ``"adam"``/``"adamw"`` (two buffers) or ``"none"``.

    The activations are counted per stage from what each implementation saves for backward (see
    :func:`~.timeline.timeline`); the workspace is the largest excess over them while backward
    frees stages in reverse. Every term is proportional to the batch, so memory is affine in
    ``batch_size``.

    >>> est = estimate_memory("densenet_bc_100", batch_size=64, mode="naive", device="cpu")
    >>> round(est.peak / 2**20)  # measured: 2159 MB on a 2-core CPU (docs/benchmarks.md)
    2194
    """
    config = resolve_arch(arch)
    name = arch if isinstance(arch, str) else config.name
    setting = resolve_setting(mode, config)
    batch_size = check_int(batch_size, "batch_size")
    image_size = check_image_size(config, image_size, name)
    amp = check_options(dtype, amp, optimizer, device)
    label = setting if isinstance(setting, str) else (setting.mode or str(setting))
    dial = setting if isinstance(setting, str) else Dial.of(setting)
    return estimate(config, name, label, dial, batch_size, image_size, dtype, amp, device, optimizer)


def estimate(
    config: ArchConfig,
    name: str,
    label: str,
    setting: str | Dial,
    batch_size: int,
    image_size: int,
    dtype: str,
    amp: str | None,
    device: str,
    optimizer: str,
) -> MemoryEstimate:
    """:func:`estimate_memory` on checked arguments (what the plan search calls, many times)."""
    param_bytes = dtype_bytes(dtype)
    act_bytes = 2 if amp else param_bytes
    n_params = count_parameters(config)
    stages = timeline(config, setting, batch_size, image_size, image_size, act_bytes, param_bytes)
    activations, workspace = peak(stages)
    # The margin (docs/planner.md): a share of the per-image part of the peak (activations +
    # workspace) of every setting, and of the fixed part of the engine's workspace (its blocks'
    # parameter gradients and weight copies, none for all-naive settings). The two parts are read
    # off batches 1 and 2 (every term is affine in the batch), which keeps the estimate affine.
    one, two = (
        peak(timeline(config, setting, b, image_size, image_size, act_bytes, param_bytes)) for b in (1, 2)
    )
    per_image = sum(two) - sum(one)
    engine = not (setting in (NAIVE, TORCHVISION) or (isinstance(setting, Dial) and setting.all_naive))
    fixed_workspace = max(2 * one[1] - two[1], 0) if engine else 0
    margin = (
        batch_size * (per_image * PER_IMAGE_MARGIN_PERCENT // 100)
        + fixed_workspace * ENGINE_FIXED_MARGIN_PERCENT // 100
        if engine
        else 0
    )
    overhead = CPU_FIRST_STEP_OVERHEAD + CPU_FIRST_STEP_PER_LAYER * sum(config.block_config)
    return MemoryEstimate(
        arch=name,
        mode=label,
        batch_size=batch_size,
        image_size=image_size,
        device=device,
        activation_dtype=amp or dtype,
        activations=activations,
        workspace=workspace,
        overhead=overhead if device == "cpu" else 0,
        parameters=n_params * param_bytes,
        gradients=n_params * param_bytes,
        optimizer_state=OPTIMIZER_STATES[optimizer] * n_params * param_bytes,
        inputs=batch_size * (3 * image_size * image_size * param_bytes + 8),
        context=CUDA_CONTEXT if device == "cuda" else 0,
        breakdown={st.name: st.saved for st in stages},
        extra_time=0.0 if isinstance(setting, str) else extra_time(config, setting, image_size),
        margin=max(margin, 0),
    )
