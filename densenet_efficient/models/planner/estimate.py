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

from ...errors import UsageError, check_fraction, check_int, shown
from ..config import ArchConfig, resolve_arch
from ..engine import EFFICIENT, MAX_SAVING
from ..memory_plan import MemoryPlan, MemorySetting
from ..parameters import count_parameters, largest_map
from .allocator import CUDA_CONTEXT, CUDA_WORKSPACE, device_overhead, regime
from .options import (
    DEFAULT_OPTIMIZER,
    check_image_size,
    check_options,
    resolve_setting,
)
from .recompute import extra_time
from .simulate import Simulation, check_sync_world, simulate, simulation_batch, simulation_batch_floor
from .units import format_bytes

__all__ = ["LOWEST_RATIO", "MAX_SIMULATED_LAYERS", "MemoryEstimate", "Step", "estimate_memory", "simulation"]

#: The planner's promise, checked on a measured grid (docs/planner.md, scripts/planner_grid.py):
#: a step fitted to a budget measures at most the budget and at least this share of it.
LOWEST_RATIO = 0.92

#: The most dense layers a model the planner simulates may have: the simulation runs every op of
#: the step, so its time grows with the depth (about two seconds per hundred layers).
MAX_SIMULATED_LAYERS = 6000

#: The most bytes one tensor of a simulated step may span: torch sizes a storage in 64-bit
#: integers, and the simulation's batch (a prime above every width, :func:`.simulate.simulation_batch`)
#: multiplies every map.
MAX_SIMULATED_TENSOR = 1 << 62


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
    (:func:`~.recompute.extra_time`; 0 with frozen features). ``image_size``: the input's height and width.
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
    drop_rate: float = 0.0,
    freeze_features: bool = False,
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
    ``drop_rate``: the model's dropout after each dense layer (``DenseNet(drop_rate=...)``): the
    step keeps a mask per layer for backward. ``freeze_features``: only the classifier trains, as
    ``train --freeze-features`` runs it (the features take no gradient and keep their batch
    statistics, so backward stops at the classifier and the memory setting changes little).

    The step runs on phantom tensors (:func:`~.simulate.simulate`, cached per setting: one
    simulation answers every batch size); a model of more than :data:`MAX_SIMULATED_LAYERS` dense
    layers is refused with a :class:`~densenet_efficient.errors.UsageError`.

    >>> est = estimate_memory("densenet_bc_100", batch_size=64, mode="naive", device="cpu")
    >>> est.total > est.peak > est.activations > 0
    True
    >>> estimate_memory("densenet_bc_100", batch_size=64, mode="naive", device="cpu",
    ...                 sync_bn_world_size=4).total > est.total
    True
    """
    options = {
        "mode": mode, "dtype": dtype, "amp": amp, "device": device, "optimizer": optimizer,
        "channels_last": channels_last, "sync_bn_world_size": sync_bn_world_size, "drop_rate": drop_rate,
        "freeze_features": freeze_features,
    }  # fmt: skip
    step = Step(arch, image_size, options, "estimate_memory")
    return step.estimate(check_int(batch_size, "batch_size"))


@functools.lru_cache(maxsize=256)
def _simulation(config: ArchConfig, key: Any, image_size: int, dtype: str, amp: str | None,
                optimizer: str, channels_last: bool, device: str, batches: int, world: int,
                drop_rate: float, frozen: bool) -> Simulation:  # fmt: skip
    # the arguments are the whole key: the thread count acts only through ``batches`` (allocator.regime)
    setting = key if isinstance(key, str) else MemoryPlan(*key)
    return simulate(
        config, setting, image_size=image_size, dtype=dtype, amp=amp, optimizer=optimizer,
        channels_last=channels_last, device=device, regime=batches, sync_bn_world_size=world,
        drop_rate=drop_rate, freeze_features=frozen,
    )  # fmt: skip


def simulation(config: ArchConfig, setting: MemoryPlan | str, image_size: int, dtype: str = "fp32",
               amp: str | None = None, optimizer: str = DEFAULT_OPTIMIZER, channels_last: bool = False,
               device: str = "cpu", batch: int = 16, sync_bn_world_size: int = 1,
               drop_rate: float = 0.0, freeze_features: bool = False) -> Simulation:  # fmt: skip
    """The simulated step of a setting, cached per process: every batch size ATen runs alike
    (:func:`~.allocator.regime`) reads the same one (per ``sync_bn_world_size``: the gathered
    statistics grow with the ranks)."""
    batches = regime(batch) if device == "cpu" else 16
    key = setting if isinstance(setting, str) else (setting.blocks, setting.stem)
    return _simulation(
        config, key, image_size, dtype, amp, optimizer, channels_last, device, batches, sync_bn_world_size,
        drop_rate, freeze_features,
    )  # fmt: skip


class Step:
    """One training step's settings (:func:`estimate_memory`'s ``options``), checked once;
    :meth:`estimate` is its estimate at a batch, in its own setting or another one.
    ``where``: the public function a refusal names."""

    OPTIONS = frozenset(
        {"mode", "dtype", "amp", "device", "optimizer", "channels_last", "sync_bn_world_size", "drop_rate",
         "freeze_features"}
    )

    def __init__(self, arch: str | ArchConfig, image_size: int | None, options: dict[str, Any], where: str):
        unknown = set(options) - self.OPTIONS
        if unknown:
            raise TypeError(f"{where}() got unexpected keyword arguments: {', '.join(sorted(unknown))}")
        self.config = resolve_arch(arch)
        self.name = arch if isinstance(arch, str) else self.config.name
        layers = sum(self.config.block_config)
        if layers > MAX_SIMULATED_LAYERS:
            raise UsageError(
                f"{self.name} has {layers} dense layers: the planner simulates the step op by op, "
                f"at most {MAX_SIMULATED_LAYERS} layers"
            )
        self.image_size = check_image_size(self.config, image_size, self.name)
        self.dtype = options.get("dtype", "fp32")
        self.device = options.get("device", "cuda")
        self.optimizer = options.get("optimizer", DEFAULT_OPTIMIZER)
        self.amp = check_options(self.dtype, options.get("amp"), self.optimizer, self.device)
        self.channels_last, self.frozen = options.get("channels_last", False), options.get("freeze_features", False)
        for name, flag in (("channels_last", self.channels_last), ("freeze_features", self.frozen)):
            if not isinstance(flag, bool):
                raise UsageError(f"{name} must be True or False, found {shown(flag)}")
        self.sync_world = check_sync_world(options.get("sync_bn_world_size", 1))
        self.drop_rate = check_fraction(options.get("drop_rate", 0.0), "drop_rate")
        self._check_size()
        self.setting = resolve_setting(options.get("mode", EFFICIENT), self.config)
        self.label = self.setting if isinstance(self.setting, str) else (self.setting.mode or str(self.setting))

    def _check_size(self) -> None:
        """Refuse a model whose tensors the simulation cannot make, said before it tries: its
        largest map at the simulation's batch, or all its parameters, beyond 64-bit sizes (8 bytes
        an element: a bound for every dtype)."""
        per_image = largest_map(self.config, self.image_size) * 8
        # the batch's floor first: a model far too large is refused without searching for its prime
        batch = simulation_batch_floor(self.config, self.image_size, self.sync_world)
        too_large = per_image * batch > MAX_SIMULATED_TENSOR or count_parameters(self.config) * 8 > MAX_SIMULATED_TENSOR
        if not too_large:
            batch = simulation_batch(self.config, self.image_size, self.sync_world)
            too_large = per_image * batch > MAX_SIMULATED_TENSOR
        if too_large:
            raise UsageError(
                f"{self.name} at {self.image_size}x{self.image_size} is too large to plan: its largest map "
                f"holds up to {format_bytes(per_image)} per image, and the simulation holds at most "
                f"{format_bytes(MAX_SIMULATED_TENSOR // batch)}; give a smaller image_size or growth rate"
            )

    def simulation(self, setting: MemoryPlan | str, batch: int) -> Simulation:
        return simulation(
            self.config, setting, self.image_size, self.dtype, self.amp, self.optimizer,
            self.channels_last, self.device, batch, self.sync_world, self.drop_rate, self.frozen,
        )  # fmt: skip

    def estimate(self, batch: int, setting: MemoryPlan | str | None = None) -> MemoryEstimate:
        """The step's estimate at ``batch`` images, in ``setting`` (default: the step's own)."""
        setting = self.setting if setting is None else setting
        sim, b = self.simulation(setting, batch), batch
        persistent, activations, inputs = sim.persistent.at(b), sim.activations.at(b), sim.inputs.at(b)
        cpu = self.device == "cpu"
        # torchvision's modes; frozen features: no backward runs through them, nothing is recomputed
        static = isinstance(setting, str) or self.frozen
        return MemoryEstimate(
            arch=self.name,
            mode=self.label if setting is self.setting else "plan",
            batch_size=b,
            image_size=self.image_size,
            device=self.device,
            activation_dtype=self.amp or self.dtype,
            activations=activations,
            workspace=sim.peak(b) - persistent - activations,
            overhead=device_overhead(self.config, self.device, self.amp, b) if cpu else 0,
            parameters=persistent - sim.gradients - sim.optimizer_state - inputs,
            gradients=sim.gradients,
            optimizer_state=sim.optimizer_state,
            inputs=inputs,
            context=0 if cpu else CUDA_CONTEXT + CUDA_WORKSPACE,
            breakdown={sg.name: sg.kept.at(b) for sg in sim.segments},
            extra_time=0.0 if static else extra_time(self.config, setting, self.image_size),
            sync_bn_world_size=self.sync_world,
        )

    def total(self, batch: int, setting: MemoryPlan | str | None = None) -> int:
        return self.estimate(batch, setting).total

    def uniform(self, mode: str) -> MemoryPlan:
        return MemoryPlan.uniform(mode, len(self.config.block_config))

    def beyond_peak(self, batch: int) -> int:
        """What ``total`` adds to a simulated peak (the device's overhead; the same for every plan)."""
        plan = self.uniform(MAX_SAVING)
        return self.estimate(batch, plan).total - self.simulation(plan, batch).peak(batch)
