"""Training-step memory, estimated analytically: no model is run.

An analytic model of the tensors autograd keeps for backward in each mode, plus the transient
workspace at the backward peak (see :func:`estimate_memory` for the accounting), and what follows
from it: the largest batch that fits a budget, the deepest DenseNet-BC that fits. The tests keep
it within 15% of :mod:`.measure`'s figures.

    >>> est = estimate_memory("densenet121", batch_size=32, mode="efficient", amp="bf16")
    >>> est.total < parse_memory("8GiB")
    True
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import UsageError
from .config import ArchConfig, densenet_bc_config, resolve_arch
from .engine import EFFICIENT, MAX_SAVING, MODES, NAIVE, block_keeps
from .memory_plan import MemoryPlan, MemorySetting, resolve_memory_plan

#: torchvision's DenseNet, naive and with its own ``memory_efficient=True`` (checkpointing): the
#: baselines the planner models besides this package's settings.
TORCHVISION = "torchvision"
TORCHVISION_EFFICIENT = "torchvision_efficient"

__all__ = [
    "ESTIMABLE",
    "TORCHVISION",
    "TORCHVISION_EFFICIENT",
    "MemoryBudgetError",
    "MemoryEstimate",
    "check_resolution",
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

# -- analytic estimate --------------------------------------------------------------------------

#: What :func:`estimate_memory` can model: our modes plus torchvision's two paths.
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
#: Optimizer state per parameter, in parameter-sized tensors (SGD momentum: 1, Adam: 2).
OPTIMIZER_STATES = {"none": 0, "sgd": 0, "momentum": 1, "adam": 2, "adamw": 2}
_MIB = 1 << 20
#: One-time allocations of the first training step on CPU (oneDNN kernels, thread pools, autograd
#: engine): 20-56 MiB on torch 2.14's CPU build (first step - warm step, peak RSS; varies by machine).
CPU_FIRST_STEP_OVERHEAD = 30 * _MIB
#: CUDA context + cuBLAS/cuDNN handles: device memory that ``max_memory_allocated`` never sees
#: but a budget must leave room for (typically 300-600 MiB, depending on card and driver).
CUDA_CONTEXT = 512 * _MIB


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one training step needs, split the way the budget is spent.

    ``activations``: tensors autograd keeps for backward, at the end of forward.
    ``workspace``: extra live at the peak of backward (gradient buffers, recomputed tensors).
    ``overhead``: fixed framework allocations counted by the measurement (CPU first step).
    ``peak``: ``activations + workspace + overhead``, the figure the measurement protocol and
    the benchmark report. ``total`` adds parameters, gradients, optimizer state, the input batch
    and (CUDA) the context: what must fit the device. ``breakdown``: bytes kept per stage, a dense
    block's layers together as one entry (``block1.layer1-16``), so its size does not grow with depth.
    ``extra_time``: recomputation beyond the ``"efficient"`` mode's, as a fraction of the step
    (:func:`extra_time`).
    """

    arch: str
    mode: str
    batch_size: int
    resolution: int
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

    @property
    def peak(self) -> int:
        return self.activations + self.workspace + self.overhead

    @property
    def total(self) -> int:
        return (
            self.parameters + self.gradients + self.optimizer_state + self.inputs + self.context + self.peak
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(peak=self.peak, total=self.total)
        return d


@dataclass(frozen=True)
class _Stage:
    """Bytes one part of the network keeps for backward, and what it needs briefly beyond that."""

    name: str
    saved: int
    forward_extra: int
    backward_extra: int

    def forward_peak(self) -> int:
        """Bytes above those kept before it while this stage runs forward."""
        return self.saved + self.forward_extra

    def backward_peak(self) -> int:
        """Bytes above those kept before it while this stage runs backward."""
        return self.saved + self.backward_extra


@dataclass(frozen=True)
class _Layers:
    """The ``count`` layers of a dense block as one item, in closed form (O(1), not O(layers)).

    Layer ``i`` (0-based) keeps ``saved0 + saved1 * i`` bytes; while it runs forward (backward)
    it needs, beyond what is kept, the largest of ``forward(i)`` (``backward(i)``): exact integer
    functions of ``i`` that, added to the running total of kept bytes, are quadratics in ``i``
    (linear, convex or concave). The peaks are then maxima of quadratics over ``0..count-1``: at an
    end, or where a concave one stops rising, found by bisection. The result is exactly what the
    per-layer sum gives (tests/perf/test_planner.py compares them).
    """

    name: str
    count: int
    saved0: int
    saved1: int
    forward: tuple[Callable[[int], int], ...]
    backward: tuple[Callable[[int], int], ...]

    def saved_through(self, i: int) -> int:
        """Bytes kept by layers ``0..i``."""
        return (i + 1) * self.saved0 + self.saved1 * (i * (i + 1) // 2)

    @property
    def saved(self) -> int:
        return self.saved_through(self.count - 1)

    def forward_peak(self) -> int:
        return max(
            _max_quadratic(lambda i, f=f: self.saved_through(i) + f(i), self.count) for f in self.forward
        )

    def backward_peak(self) -> int:
        # backward reaches layer i with layers 0..i still kept (later layers have been freed)
        return max(
            _max_quadratic(lambda i, f=f: self.saved_through(i) + f(i), self.count) for f in self.backward
        )


def _max_quadratic(f: Callable[[int], int], n: int) -> int:
    """The maximum of a quadratic ``f`` over the integers ``0..n-1`` (``n >= 1``).

    Convex or linear: at an end. Concave: where it stops rising, i.e. the first ``i`` with
    ``f(i + 1) <= f(i)`` (its differences never increase), found by bisection. Trying the ends and
    that point covers every case with O(log n) evaluations."""
    lo, hi = 0, n - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if f(mid + 1) > f(mid):
            lo = mid + 1
        else:
            hi = mid
    return max(f(0), f(n - 1), f(lo))


def _conv_out(size: int, kernel: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - kernel) // stride + 1


def _timeline(
    config: ArchConfig, mode: str | MemoryPlan, n: int, height: int, width: int, e: int, pe: int = 4
) -> list[_Stage | _Layers]:
    """The stages of one training step in forward order, with the bytes each keeps and needs.

    ``e`` is bytes per activation element, ``pe`` per parameter; ``S = N*H*W`` at a block's resolution, ``c_l`` the
    channels layer ``l`` reads, ``B = bn_size*k`` the bottleneck width. What each implementation
    hands to autograd:

    * naive / torchvision: per layer the concatenated input (saved by norm1), norm1's output
      (ReLU is in place; saved by conv1), the bottleneck (saved by norm2) and norm2's output (saved
      by conv2): ``(2 c_l + 2B) S``, quadratic in depth. The block's output concatenation is saved
      by the next norm; a transition also keeps its norm output and its conv output (saved by the
      pool); the ImageNet stem keeps conv0's and norm0's outputs and max-pool's int64 indices.
    * torchvision ``memory_efficient``: checkpointing keeps each layer's inputs (block input and
      every k-channel output), the bottleneck and norm2's output: ``(2B + k) S`` per layer.
    * efficient (this package): one ``N x C_final x H x W`` buffer per block, which is also the
      block output, plus each layer's bottleneck ``B S``; transitions keep only their input (the
      buffer itself), the stem conv0's output, max-pool's indices and the pooled output's sign.
    * max_saving: only the buffers (and conv0's output).

    Backward needs, beyond what is saved: for the engine, the incoming gradient and the block's
    gradient buffer (``2 C_final S``) plus one layer's recomputed norm1+ReLU and its gradients
    (``2 c_l S``) and bottleneck-sized temporaries; for naive, the gradients of one layer's
    concatenated input. The head keeps the final ReLU output in every implementation.
    """
    if isinstance(mode, str) and mode in MODES:
        mode = MemoryPlan.uniform(mode, len(config.block_config))
    if not isinstance(mode, MemoryPlan) and mode not in (TORCHVISION, TORCHVISION_EFFICIENT):
        raise UsageError(f"unknown mode {mode!r}; expected one of {', '.join(ESTIMABLE)} or a MemoryPlan")
    c = config.num_init_features
    plan = mode if isinstance(mode, MemoryPlan) else None
    stem, (h, w) = _stem_stage(config, plan.stem if plan else mode, n, height, width, e)
    stages = [stem]
    for b, layers in enumerate(config.block_config):
        name, s, cf = f"block{b + 1}", n * h * w, c + layers * config.growth_rate
        setting = plan.blocks[b] if plan else mode
        if setting in (NAIVE, TORCHVISION):
            stages += _naive_block(config, name, c, layers, s, e)
        elif setting == TORCHVISION_EFFICIENT:
            stages += _checkpointed_block(config, name, c, layers, s, e)
        else:
            stages += _engine_block(config, _runs(setting, layers), name, c, s, e, pe)
        if b < len(config.block_config) - 1:
            # naive: norm output (in-place ReLU; saved by conv) and conv output (saved by the pool);
            # engine: nothing beyond its input, the block's output
            naive = plan.all_naive if plan else True  # torchvision's transitions are naive
            saved = (cf + cf // 2) * s * e if naive else 0
            stages.append(_Stage(f"transition{b + 1}", saved, cf * s * e, 2 * cf * s * e))
            c = cf // 2
            h, w = h // 2, w // 2
        else:
            # the non-in-place final ReLU output (saved by ReLU and the average pool)
            stages.append(_Stage("head", cf * s * e, 0, 2 * cf * s * e))
    return stages


def _stem_stage(
    config: ArchConfig, mode: str, n: int, h: int, w: int, e: int
) -> tuple[_Stage, tuple[int, int]]:
    """The stem's stage and the spatial size it hands to the first block."""
    c = config.num_init_features
    if config.small_inputs:
        # conv0 saves only the input batch (counted in ``inputs``); its output is block 1's input.
        return _Stage("stem", 0, 0, 2 * c * n * h * w * e), (h, w)
    h, w = _conv_out(h, 7, 2, 3), _conv_out(w, 7, 2, 3)
    s0 = n * h * w
    h, w = _conv_out(h, 3, 2, 1), _conv_out(w, 3, 2, 1)
    indices = 8 * c * n * h * w  # int64, one per pooled output
    if mode == MAX_SAVING:
        saved = c * s0 * e
    elif mode == EFFICIENT:  # conv0's output, the pooling indices and the output's sign (bool)
        saved = c * s0 * e + indices + c * n * h * w
    else:
        saved = 2 * c * s0 * e + indices
    # backward: the max-pool and BN gradients (2 c s0), plus in max_saving the recomputed
    # indices (its recomputed ReLU output is dead by the time BN's gradient is made)
    return _Stage("stem", saved, 0, 2 * c * s0 * e + (indices if mode == MAX_SAVING else 0)), (h, w)


def _layer_range(name: str, layers: int, first: int = 0) -> str:
    """``block2.layer4-9``: the breakdown's name for ``layers`` layers from index ``first``."""
    return f"{name}.layer{first + 1}" + (f"-{first + layers}" if layers > 1 else "")


def _naive_block(
    config: ArchConfig, name: str, c: int, layers: int, s: int, e: int
) -> list[_Stage | _Layers]:
    k, bn = config.growth_rate, config.bn_size * config.growth_rate
    # layer i, reading c_i = c + i k channels: keeps (2 c_i + 2B) S, needs 2 c_i S more in backward
    body = _Layers(
        _layer_range(name, layers),
        layers,
        saved0=(2 * c + 2 * bn) * s * e,
        saved1=2 * k * s * e,
        forward=(lambda i: 0,),
        backward=(lambda i: 2 * (c + i * k) * s * e,),
    )
    # the concatenation, assembled while the k-channel pieces are still alive
    cf = c + layers * k
    return [body, _Stage(f"{name}.output", cf * s * e, cf * s * e, 0)]


def _checkpointed_block(
    config: ArchConfig, name: str, c: int, layers: int, s: int, e: int
) -> list[_Stage | _Layers]:
    k, bn = config.growth_rate, config.bn_size * config.growth_rate
    # layer i keeps (2B + k) S; backward needs the recomputed concat + norm1 output, their
    # gradients and the pending grads of earlier pieces: 4 c_i S
    body = _Layers(
        _layer_range(name, layers),
        layers,
        saved0=(2 * bn + k) * s * e,
        saved1=0,
        forward=(lambda i: 0,),
        backward=(lambda i: 4 * (c + i * k) * s * e,),
    )
    return [
        _Stage(f"{name}.input", c * s * e, 0, 0),
        body,
        _Stage(f"{name}.output", (c + layers * k) * s * e, 0, 0),
    ]


def _engine_block(
    config: ArchConfig, runs: list[tuple[bool, int]], name: str, c: int, s: int, e: int, pe: int
) -> list[_Stage | _Layers]:
    """The engine's block: its buffer, then each run of layers that keep (or recompute) their
    bottleneck as one closed-form item (one item for "efficient" or "max_saving")."""
    k, bn, layers = config.growth_rate, config.bn_size * config.growth_rate, sum(n for _, n in runs)
    cf = c + layers * k
    grads = 2 * cf * s * e  # incoming gradient + the gradient buffer accumulated in place

    def pending(i: int) -> int:
        """Parameter gradients of layers i..L-1, which the block Function returns all at once at
        its end: layer j has (2 + B) c_j + 2B + 9Bk of them (norm1, conv1, norm2, conv2)."""
        n, first = layers - i, i * (i - 1) // 2
        return (
            (2 + bn) * (n * c + k * (layers * (layers - 1) // 2 - first)) + n * (2 * bn + 9 * bn * k)
        ) * pe

    # Channel slices of the buffer are not contiguous, so the engine's BN calls copy them. A
    # layer's backward peak is norm1's backward (gradient in, copied input, gradient out: 3 c_i)
    # or conv2's backward: its gradient slice, norm1+ReLU and norm2+ReLU recomputed, the
    # bottleneck gradient and about one bottleneck of convolution workspace (measured), plus the
    # recomputed 1x1 output where it was not kept: the larger of the two, hence two pieces.
    items: list[_Stage | _Layers] = [_Stage(f"{name}.buffer", cf * s * e, 0, grads)]
    start = 0
    for kept, count in runs:
        first = start
        m = 3 if kept else 4
        items.append(
            _Layers(
                _layer_range(name, count, first),
                count,
                saved0=(bn if kept else 0) * s * e,
                saved1=0,
                forward=(lambda j, f=first: (2 * (c + (f + j) * k) + bn) * s * e,),
                backward=(
                    lambda j, f=first: grads + 3 * (c + (f + j) * k) * s * e + pending(f + j),
                    lambda j, f=first, m=m: grads + (k + c + (f + j) * k + m * bn) * s * e + pending(f + j),
                ),
            )
        )
        start += count
    return items


def _peak(stages: list[_Stage | _Layers]) -> tuple[int, int]:
    """(activations, workspace): saved bytes after forward, and the largest excess over them."""
    kept = peak = 0
    for st in stages:  # forward: saved tensors accumulate; some stages briefly need more
        peak = max(peak, kept + st.forward_peak())
        kept += st.saved
    total = kept
    for st in reversed(stages):  # backward frees a stage's saved tensors once it has run
        kept -= st.saved
        peak = max(peak, kept + st.backward_peak())
    return total, peak - total


def count_parameters(config: ArchConfig) -> int:
    """Trainable parameters of ``config``, computed from the architecture alone.

    >>> count_parameters(resolve_arch("densenet121"))
    7978856
    """
    k, bn, c = config.growth_rate, config.bn_size * config.growth_rate, config.num_init_features
    total = 3 * c * (9 if config.small_inputs else 49) + (0 if config.small_inputs else 2 * c)
    for b, layers in enumerate(config.block_config):
        # layer i (c_i = c + i k inputs): norm1 2 c_i, conv1 c_i B, norm2 2B, conv2 9Bk; summed
        # over the block in closed form (any depth in O(1))
        inputs = layers * c + k * (layers * (layers - 1) // 2)  # sum of c_i
        total += (2 + bn) * inputs + layers * (2 * bn + 9 * bn * k)
        c += layers * k
        if b < len(config.block_config) - 1:
            total += 2 * c + c * (c // 2)
            c //= 2
    return total + 2 * c + c * config.num_classes + config.num_classes


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_resolution(config: ArchConfig, resolution: int | None, name: str | None = None) -> int:
    """``resolution``, or the architecture's default when None, checked to be a size the model
    accepts (a :class:`UsageError` says the smallest one otherwise; 0 is not "the default").

    >>> check_resolution(resolve_arch("densenet121"), None)
    224
    """
    if resolution is None:
        return config.default_resolution
    resolution = _positive_int("resolution", resolution)
    least = config.min_input_size()
    if resolution < least:
        raise UsageError(
            f"resolution {resolution} is too small for {name or config.name}: it needs at least {least}x{least}"
        )
    return resolution


def _check_options(dtype: str, amp: str | None, optimizer: str, device: str) -> str | None:
    """Refuse unknown settings by name; return ``amp`` normalised (``"bf16"``, ``"fp16"`` or None)."""
    if dtype not in _DTYPE_BYTES:
        raise UsageError(f"dtype must be one of {', '.join(sorted(_DTYPE_BYTES))}, got {dtype!r}")
    if amp not in _AMP:
        raise UsageError(f"amp must be None, 'bf16' or 'fp16', got {amp!r}")
    if optimizer not in OPTIMIZER_STATES:
        raise UsageError(f"optimizer must be one of {', '.join(OPTIMIZER_STATES)}, got {optimizer!r}")
    if device not in ("cuda", "cpu"):
        raise UsageError(f"device must be 'cuda' or 'cpu', got {device!r}")
    return _AMP[amp]


def _resolve_setting(mode: Any, config: ArchConfig) -> MemoryPlan | str:
    """A torchvision baseline's name as it is, anything else as the model would resolve it."""
    if isinstance(mode, str) and mode in (TORCHVISION, TORCHVISION_EFFICIENT):
        return mode
    if isinstance(mode, str) and mode not in MODES and mode not in ("default", "max"):
        raise UsageError(
            f"memory_efficient must be one of {', '.join(ESTIMABLE)} or per-block settings, got {mode!r}"
        )
    return resolve_memory_plan(mode, config)


def _runs(setting: str | tuple[bool, ...], layers: int) -> list[tuple[bool, int]]:
    """An engine block's layers as runs of (keeps its bottleneck, how many layers): one run for a
    mode, so that a block of any depth costs O(1)."""
    if isinstance(setting, str):
        return [(block_keeps(setting, 1)[0], layers)]
    return [(kept, len(list(run))) for kept, run in itertools.groupby(setting)]


#: Cost of one elementwise pass over one element, in multiply-adds: what recomputing BN/ReLU/pooling
#: costs next to convolutions (about 40 on a 2-core CPU and on an H100 alike, within 2x).
ELEMENTWISE_MACS = 40


def _width_sum(c: int, k: int, first: int, count: int) -> int:
    """Channels read by layers ``first .. first+count-1`` of a block entered with ``c``: sum of ``c + i k``."""
    return count * c + k * (count * (2 * first + count - 1) // 2)


def extra_time(config: ArchConfig, plan: MemoryPlan, resolution: int) -> float:
    """Recomputation a plan adds over ``"efficient"``, as a fraction of a training step's work.

    Counted in multiply-adds (a training step is three times the forward's: forward, input
    gradients, weight gradients): each layer that does not keep its bottleneck recomputes its 1x1
    convolution (``c_l * B`` per pixel); a ``"max_saving"`` stem recomputes norm0, relu0 and the
    max-pool's indices (four elementwise passes). Naive blocks count 0: they recompute nothing.
    Independent of the batch size.

    >>> from densenet_efficient.models.config import get_config
    >>> cfg = get_config("densenet121")
    >>> round(extra_time(cfg, MemoryPlan.uniform("max_saving", 4), 224), 3)
    0.166
    """
    k, bn, c = config.growth_rate, config.bn_size * config.growth_rate, config.num_init_features
    h = w = resolution
    if config.small_inputs:
        forward, extra = config.in_chans * c * 9 * h * w, 0
    else:
        h, w = _conv_out(h, 7, 2, 3), _conv_out(w, 7, 2, 3)
        forward = config.in_chans * c * 49 * h * w
        extra = 4 * ELEMENTWISE_MACS * c * h * w if plan.stem == MAX_SAVING else 0
        h, w = _conv_out(h, 3, 2, 1), _conv_out(w, 3, 2, 1)
    for b, layers in enumerate(config.block_config):
        s = h * w
        forward += (_width_sum(c, k, 0, layers) * bn + layers * 9 * bn * k) * s
        setting, first = plan.blocks[b], 0
        for kept, count in _runs(setting, layers) if setting != NAIVE else []:
            extra += 0 if kept else _width_sum(c, k, first, count) * bn * s
            first += count
        c += layers * k
        if b < len(config.block_config) - 1:  # the engine's transition pools before its 1x1 conv
            forward += c * (c // 2) * (h // 2) * (w // 2)
            c, h, w = c // 2, h // 2, w // 2
    return extra / (3 * forward)


def estimate_memory(
    arch: str | ArchConfig,
    *,
    batch_size: int,
    resolution: int | None = None,
    mode: MemorySetting = EFFICIENT,
    dtype: str = "fp32",
    amp: str | None = None,
    device: str = "cuda",
    optimizer: str = "sgd",
) -> MemoryEstimate:
    """Analytic peak memory of one training step (forward, loss, backward); no model is run.

    Args:
        arch: an architecture name (``"densenet121"``), ``"densenet_bc_<depth>"`` or an :class:`ArchConfig`.
        batch_size: images per step.
        resolution: input height and width (default: 32 for CIFAR configs, 224 otherwise).
        mode: anything the model's ``memory_efficient`` takes (``"naive"``, ``"efficient"``,
            ``"max_saving"``, ``False``/``True``, per-block settings, a :class:`MemoryPlan`), or
            ``"torchvision"``/``"torchvision_efficient"`` for torchvision's own DenseNet.
        dtype: parameter and activation dtype when not using autocast (``fp32``, ``bf16``, ...).
        amp: ``"bf16"``/``"fp16"``: autocast, so activations are half precision, parameters fp32.
        device: ``"cuda"`` (adds the CUDA context to ``total``) or ``"cpu"`` (adds the one-time
            first-step allocations that peak RSS shows).
        optimizer: ``"sgd"`` (momentum buffer), ``"adam"``/``"adamw"`` (two buffers) or ``"none"``.

    The activations are counted per stage from what each implementation saves for backward (see
    :func:`_timeline`); the workspace is the largest excess over them while backward frees stages
    in reverse. Every term is proportional to the batch, so memory is affine in ``batch_size``.

    >>> est = estimate_memory("densenet_bc_100", batch_size=64, mode="naive", device="cpu")
    >>> round(est.peak / 2**20)  # measured: 2159 MB on a 2-core CPU (docs/benchmarks.md)
    2165
    """
    config = resolve_arch(arch)
    name = arch if isinstance(arch, str) else config.name
    setting = _resolve_setting(mode, config)
    batch_size = _positive_int("batch_size", batch_size)
    resolution = check_resolution(config, resolution, name)
    amp = _check_options(dtype, amp, optimizer, device)

    param_bytes = _DTYPE_BYTES[dtype]
    act_bytes = 2 if amp else param_bytes
    n_params = count_parameters(config)
    stages = _timeline(config, setting, batch_size, resolution, resolution, act_bytes, param_bytes)
    activations, workspace = _peak(stages)
    if amp:
        # autocast's half-precision weight copies are saved by every conv/linear for backward
        activations += 2 * n_params
    plan = setting if isinstance(setting, MemoryPlan) else None
    return MemoryEstimate(
        arch=name,
        mode=(plan.mode or str(plan)) if plan else setting,
        batch_size=batch_size,
        resolution=resolution,
        device=device,
        activation_dtype=amp or dtype,
        activations=activations,
        workspace=workspace,
        overhead=CPU_FIRST_STEP_OVERHEAD if device == "cpu" else 0,
        parameters=n_params * param_bytes,
        gradients=n_params * param_bytes,
        optimizer_state=OPTIMIZER_STATES[optimizer] * n_params * param_bytes,
        inputs=batch_size * (3 * resolution * resolution * param_bytes + 8),
        context=CUDA_CONTEXT if device == "cuda" else 0,
        breakdown={st.name: st.saved for st in stages},
        extra_time=extra_time(config, plan, resolution) if plan else 0.0,
    )


def max_batch_size(arch: str | ArchConfig, memory: int | str, **kwargs: Any) -> int:
    """The largest batch whose training step fits ``memory`` (bytes or ``"8GiB"``).

    ``kwargs`` are :func:`estimate_memory`'s. Raises ValueError, naming the minimum needed, when
    not even one image fits.

    >>> max_batch_size("densenet121", "8GiB", resolution=224, mode="efficient") > 64
    True
    """
    budget = parse_memory(memory)
    one = estimate_memory(arch, batch_size=1, **kwargs)
    if one.total > budget:
        raise UsageError(
            f"{format_bytes(budget)} fits no batch of {one.arch} in {one.mode} mode at "
            f"{one.resolution}x{one.resolution}: one image needs at least {format_bytes(one.total)}"
        )
    slope = estimate_memory(arch, batch_size=2, **kwargs).total - one.total
    n = 1 + int((budget - one.total) // max(slope, 1))
    # memory is affine in the batch; step back over integer rounding in the stage sums
    while n > 1 and estimate_memory(arch, batch_size=n, **kwargs).total > budget:
        n -= 1
    return n


class MemoryBudgetError(UsageError):
    """A budget below the ``"max_saving"`` floor: says the smallest budget that fits this batch and
    the largest batch that fits this budget (``floor`` and ``max_batch_size``, 0 when none)."""

    def __init__(self, message: str, *, floor: int, max_batch_size: int) -> None:
        super().__init__(message)
        self.floor = floor
        self.max_batch_size = max_batch_size


def _plan_below(config: ArchConfig, width: int, stem: str) -> MemoryPlan:
    """Every layer reading fewer than ``width`` channels recomputes its bottleneck, the rest keep it.

    Recomputing layer ``l``'s bottleneck costs ``c_l * B`` multiply-adds per pixel and saves ``B``
    values per pixel, in every block alike: the narrowest layers save memory most cheaply, so the
    cheapest plan for a budget is such a threshold (each block keeps its last layers).
    """
    blocks = []
    for c, layers in zip(_block_inputs(config), config.block_config, strict=True):
        dropped = min(max(-(-(width - c) // config.growth_rate), 0), layers)  # layers with c + i k < width
        blocks.append(layers - dropped)
    plan = resolve_memory_plan(blocks, config)
    return MemoryPlan(plan.blocks, stem)


def _refit(plan: MemoryPlan, config: ArchConfig, fits: Callable[[MemoryPlan], bool]) -> MemoryPlan:
    """Give layers back their bottleneck where the budget still allows it.

    The threshold plan saves bytes wherever they are cheapest, but the peak is reached at one
    moment of the step: bytes saved in a block whose bottlenecks are not alive then buy nothing.
    Block by block, the most expensive recomputation first, keep as many last layers as still fit.
    """
    keeps = [
        sum(n for kept, n in _runs(b, layers) if kept)
        for b, layers in zip(plan.blocks, config.block_config, strict=True)
    ]
    starts = _block_inputs(config)

    def with_keep(block: int, n: int) -> MemoryPlan:
        counts = keeps[:block] + [n] + keeps[block + 1 :]
        return MemoryPlan(resolve_memory_plan(counts, config).blocks, plan.stem)

    changed = True
    while changed:
        changed = False
        # the widest layer each block recomputes is its most expensive one
        order = sorted(
            (b for b, n in enumerate(config.block_config) if keeps[b] < n),
            key=lambda b: -(starts[b] + (config.block_config[b] - keeps[b] - 1) * config.growth_rate),
        )
        for b in order:
            lo, hi = keeps[b], config.block_config[b]  # lo fits; find the most that fits
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if fits(with_keep(b, mid)) else (lo, mid - 1)
            if lo > keeps[b]:
                keeps[b], changed = lo, True
    return with_keep(0, keeps[0])


def _block_inputs(config: ArchConfig) -> list[int]:
    """The channels entering each dense block (layer ``i`` of block ``b`` reads ``c_b + i k``)."""
    out, c = [], config.num_init_features
    for layers in config.block_config:
        out.append(c)
        c = (c + layers * config.growth_rate) // 2
    return out


def fit_memory(
    arch: str | ArchConfig,
    budget: int | str,
    *,
    batch_size: int,
    resolution: int | None = None,
    **kwargs: Any,
) -> MemoryPlan:
    """The plan with the least recompute whose training step (``MemoryEstimate.total``) fits ``budget``.

    ``kwargs`` are :func:`estimate_memory`'s (``amp``, ``dtype``, ``device``, ``optimizer``). The
    search runs over the width below which layers recompute their bottleneck (see
    :func:`_plan_below`), with the stem keeping or recomputing its indices, so it takes
    ``O(blocks * log(width))`` estimates at any depth. Raises :class:`MemoryBudgetError` below the
    ``"max_saving"`` floor.

    >>> plan = fit_memory("densenet121", "480MiB", batch_size=16, device="cpu")
    >>> str(plan), plan.estimated_peak <= parse_memory("480MiB"), round(plan.estimated_extra_time, 3)
    ('stem efficient; block1 keep 1/6, block2 efficient, block3 efficient, block4 efficient', True, 0.033)
    """
    config = resolve_arch(arch)
    budget = parse_memory(budget)
    resolution = check_resolution(config, resolution, arch if isinstance(arch, str) else None)

    def estimate(plan: MemoryPlan) -> MemoryEstimate:
        return estimate_memory(config, batch_size=batch_size, resolution=resolution, mode=plan, **kwargs)

    widest = config.num_init_features + sum(config.block_config) * config.growth_rate + 1
    stems = (EFFICIENT,) if config.small_inputs else (EFFICIENT, MAX_SAVING)
    best: tuple[float, MemoryPlan, MemoryEstimate] | None = None
    for stem in stems:
        if estimate(_plan_below(config, widest, stem)).total > budget:
            continue  # not even with every bottleneck recomputed
        lo, hi = 0, widest  # the least threshold that fits is in (lo, hi]; hi fits
        if estimate(_plan_below(config, 0, stem)).total <= budget:
            hi = 0
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if estimate(_plan_below(config, mid, stem)).total <= budget else (mid, hi)
        plan = _refit(_plan_below(config, hi, stem), config, lambda p: estimate(p).total <= budget)
        est = estimate(plan)
        if best is None or est.extra_time < best[0]:
            best = (est.extra_time, plan, est)
    if best is None:
        raise _below_floor(config, budget, batch_size, resolution, kwargs)
    _, plan, est = best
    return MemoryPlan(
        plan.blocks,
        plan.stem,
        estimated_peak=est.total,
        estimated_extra_time=est.extra_time,
        budget=budget,
        batch_size=batch_size,
        image_size=resolution,
    )


def _below_floor(
    config: ArchConfig, budget: int, batch_size: int, resolution: int, kwargs: dict[str, Any]
) -> MemoryBudgetError:
    floor = estimate_memory(
        config, batch_size=batch_size, resolution=resolution, mode=MAX_SAVING, **kwargs
    ).total
    try:
        largest = max_batch_size(config, budget, resolution=resolution, mode=MAX_SAVING, **kwargs)
        fits = f"the largest batch that fits {format_bytes(budget)} is {largest}"
    except UsageError:
        largest = 0
        one = estimate_memory(config, batch_size=1, resolution=resolution, mode=MAX_SAVING, **kwargs).total
        fits = f"not even a batch of 1 fits {format_bytes(budget)} (it needs {format_bytes(one)})"
    return MemoryBudgetError(
        f"{format_bytes(budget)} is below what {config.name} needs for a batch of {batch_size} at "
        f"{resolution}x{resolution} even in max_saving mode ({format_bytes(floor)}); {fits}",
        floor=floor,
        max_batch_size=largest,
    )


def deepest_densenet_bc(
    memory: int | str, *, batch_size: int = 64, growth_rate: int = 12, mode: str = EFFICIENT, **kwargs: Any
) -> int:
    """The greatest depth 6n+4 of a DenseNet-BC whose training step fits ``memory`` (0 if none).

    >>> deepest_densenet_bc("12GB", mode="naive") < deepest_densenet_bc("12GB", mode="efficient")
    True
    """
    budget = parse_memory(memory)

    def fits(n: int) -> bool:
        cfg = densenet_bc_config(6 * n + 4, growth_rate)
        return estimate_memory(cfg, batch_size=batch_size, mode=mode, **kwargs).total <= budget

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # fits(lo) and not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return 6 * lo + 4


_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kb": 10**3, "kib": 1 << 10,
    "m": 1 << 20, "mb": 10**6, "mib": 1 << 20,
    "g": 1 << 30, "gb": 10**9, "gib": 1 << 30,
    "t": 1 << 40, "tb": 10**12, "tib": 1 << 40,
}  # fmt: skip
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_memory(value: int | str) -> int:
    """Bytes from ``"8GiB"``, ``"12GB"`` (SI), ``"8G"`` (binary, as PyTorch and Docker read it) or an int.

    >>> parse_memory("8GiB"), parse_memory("12GB"), parse_memory("512M")
    (8589934592, 12000000000, 536870912)
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise UsageError(f"memory budget must be positive, got {value}")
        return value
    match = _SIZE.match(str(value))
    unit = match.group(2).lower() if match else None
    if unit not in _UNITS:
        raise UsageError(
            f"memory budget must look like 8GiB, 12GB, 512MiB or a number of bytes, got {value!r}"
        )
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise UsageError(f"memory budget must be positive, got {value!r}")
    return size


def format_bytes(n: float) -> str:
    """``1536 MiB`` -> ``"1.5 GiB"``: binary units, 3 significant figures (no exponent).

    >>> format_bytes(1.5 * 2**30), format_bytes(1020 * 2**20), format_bytes(512)
    ('1.5 GiB', '1020 MiB', '512 B')
    """
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            value = n / scale
            return f"{value:.0f} {unit}" if abs(value) >= 100 else f"{value:.3g} {unit}"
    return f"{int(n)} B"


def plan(
    arch: str | ArchConfig,
    memory: int | str,
    *,
    modes: tuple[str, ...] = ESTIMABLE,
    batch_size: int | None = None,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """Per mode: the largest batch that fits ``memory``, the estimate there (and at ``batch_size``).

    >>> [row["mode"] for row in plan("densenet121", "8GiB", modes=("naive", "efficient"))]
    ['naive', 'efficient']
    """
    budget = parse_memory(memory)
    rows = []
    for mode in modes:
        one = estimate_memory(arch, batch_size=1, mode=mode, **kwargs)
        row: dict[str, Any] = {
            "mode": mode,
            "per_image": estimate_memory(arch, batch_size=2, mode=mode, **kwargs).total - one.total,
        }
        try:
            best = max_batch_size(arch, budget, mode=mode, **kwargs)
        except ValueError as err:
            row.update(max_batch_size=0, note=str(err), minimum=one.total)
        else:
            row.update(
                max_batch_size=best,
                at_max=estimate_memory(arch, batch_size=best, mode=mode, **kwargs).to_dict(),
            )
        if batch_size is not None:
            row["at_batch"] = estimate_memory(arch, batch_size=batch_size, mode=mode, **kwargs).to_dict()
        rows.append(row)
    return rows
