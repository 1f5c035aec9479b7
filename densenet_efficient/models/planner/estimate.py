"""The estimate: bytes one training step needs, read off the simulated step (:mod:`.simulate`)
plus what the device holds beyond its tensors (:mod:`.allocator`).

>>> est = estimate_memory("densenet_bc_40", batch_size=32, mode="efficient", amp="bf16")
>>> est.total < 8 * 2**30
True
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field
from typing import Any

from ...errors import check_int
from ..config import ArchConfig, resolve_arch
from ..engine import EFFICIENT
from ..memory_plan import MemoryPlan, MemorySetting
from .allocator import CUDA_CONTEXT, CUDA_WORKSPACE, device_overhead, regime
from .options import (
    DEFAULT_OPTIMIZER,
    check_image_size,
    check_options,
    resolve_setting,
)
from .recompute import extra_time
from .simulate import Simulation, check_sync_world, simulate

__all__ = ["LOWEST_RATIO", "MemoryEstimate", "estimate_memory", "simulation"]

#: The planner's promise, checked on a measured grid (docs/planner.md, scripts/planner_grid.py):
#: a step fitted to a budget measures at most the budget and at least this share of it.
LOWEST_RATIO = 0.92


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one training step needs, split the way the budget is spent.

    Every figure but ``overhead``, ``margin`` and ``context`` is read off the simulated step.
    ``activations``: what is alive more at the end of forward (the loss computed) than before it.
    ``workspace``: what is alive beyond that at the step's peak.
    ``overhead``: on CPU, what the process holds beyond tensors (:mod:`.allocator`).
    ``margin``: the CPU backends' scratch no tensor shows (:mod:`.allocator`), 0 on CUDA.
    ``peak``: ``activations + workspace + overhead + margin``. ``total`` adds parameters (and
    buffers), gradients, optimizer state, the input batch and, on CUDA, the context and cuDNN's
    workspace: what must fit the device. ``breakdown``: what each dense block and transition adds
    to the bytes alive by the end of its forward.
    ``extra_time``: recomputation beyond the ``"efficient"`` mode's, as a fraction of the step
    (:func:`~.recompute.extra_time`). ``image_size``: the input's height and width.
    ``sync_bn_world_size``: the processes the batch norms synchronise over (1: plain batch norm).
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
    sync_bn_world_size: int = 1

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
    channels_last: bool = False,
    sync_bn_world_size: int = 1,
) -> MemoryEstimate:
    """Peak memory of one training step (forward, loss, backward, the optimizer's step), simulated.

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

    ``channels_last``: model and batch in ``torch.channels_last``.
    ``sync_bn_world_size``: the processes of a ``torchrun`` job whose batch norms synchronise
    (``convert_sync_batchnorm``, ``train --sync-bn``); 1 (the default) is plain batch norm. The
    synchronised step runs the engine's synchronised path with simulated collectives: its
    gathered statistics and its backward's temporaries are counted, per process.

    The step runs on fake tensors (:func:`~.simulate.simulate`, cached per setting: one
    simulation answers every batch size).

    >>> est = estimate_memory("densenet_bc_100", batch_size=64, mode="naive", device="cpu")
    >>> est.total > est.peak > est.activations > 0
    True
    >>> estimate_memory("densenet_bc_100", batch_size=64, mode="naive", device="cpu",
    ...                 sync_bn_world_size=4).total > est.total
    True
    """
    config = resolve_arch(arch)
    name = arch if isinstance(arch, str) else config.name
    setting = resolve_setting(mode, config)
    batch_size = check_int(batch_size, "batch_size")
    image_size = check_image_size(config, image_size, name)
    amp = check_options(dtype, amp, optimizer, device)
    world = check_sync_world(sync_bn_world_size)
    label = setting if isinstance(setting, str) else (setting.mode or str(setting))
    return estimate(
        config,
        name,
        label,
        setting,
        batch_size,
        image_size,
        dtype,
        amp,
        device,
        optimizer,
        channels_last,
        world,
    )


def _key(setting: MemoryPlan | str) -> Any:
    return setting if isinstance(setting, str) else (setting.blocks, setting.stem)


@functools.lru_cache(maxsize=256)
def _simulation(config: ArchConfig, key: Any, image_size: int, dtype: str, amp: str | None,
                optimizer: str, channels_last: bool, device: str, batches: int, world: int) -> Simulation:  # fmt: skip
    setting = key if isinstance(key, str) else MemoryPlan(*key)
    return simulate(
        config, setting, image_size=image_size, dtype=dtype, amp=amp, optimizer=optimizer,
        channels_last=channels_last, device=device, regime=batches, sync_bn_world_size=world,
    )  # fmt: skip


def simulation(config: ArchConfig, setting: MemoryPlan | str, image_size: int, dtype: str = "fp32",
               amp: str | None = None, optimizer: str = DEFAULT_OPTIMIZER, channels_last: bool = False,
               device: str = "cpu", batch: int = 16, sync_bn_world_size: int = 1) -> Simulation:  # fmt: skip
    """The simulated step of a setting, cached per process: every batch size ATen runs alike
    (:func:`~.allocator.regime`) reads the same one (per ``sync_bn_world_size``: the gathered
    statistics grow with the ranks)."""
    batches = regime(batch) if device == "cpu" else 16
    return _simulation(
        config, _key(setting), image_size, dtype, amp, optimizer, channels_last, device, batches,
        sync_bn_world_size,
    )  # fmt: skip


def estimate(
    config: ArchConfig,
    name: str,
    label: str,
    setting: MemoryPlan | str,
    batch_size: int,
    image_size: int,
    dtype: str,
    amp: str | None,
    device: str,
    optimizer: str,
    channels_last: bool = False,
    sync_bn_world_size: int = 1,
) -> MemoryEstimate:
    """:func:`estimate_memory` on checked arguments."""
    sim = simulation(
        config,
        setting,
        image_size,
        dtype,
        amp,
        optimizer,
        channels_last,
        device,
        batch_size,
        sync_bn_world_size,
    )
    b = batch_size
    persistent, activations = sim.persistent.at(b), sim.activations.at(b)
    inputs = sim.inputs.at(b)
    return MemoryEstimate(
        arch=name,
        mode=label,
        batch_size=b,
        image_size=image_size,
        device=device,
        activation_dtype=amp or dtype,
        activations=activations,
        workspace=sim.peak(b) - persistent - activations,
        overhead=device_overhead(config, device, amp, b) if device == "cpu" else 0,
        parameters=persistent - sim.gradients - sim.optimizer_state - inputs,
        gradients=sim.gradients,
        optimizer_state=sim.optimizer_state,
        inputs=inputs,
        context=CUDA_CONTEXT + CUDA_WORKSPACE if device == "cuda" else 0,
        breakdown={sg.name: sg.kept.at(b) for sg in sim.segments},
        extra_time=0.0 if isinstance(setting, str) else extra_time(config, setting, image_size),
        margin=0,
        sync_bn_world_size=sync_bn_world_size,
    )
