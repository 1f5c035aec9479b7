"""Training-step memory: measure it (the ``MEASURE.md`` protocol) and estimate it analytically.

Two halves share this module because they answer the same question, "how many bytes does one
training step need?", and each keeps the other honest (tests compare them):

* **Measurement** (:func:`measure`): every figure comes from a fresh subprocess running one
  implementation (torchvision naive/``memory_efficient=True`` or one of our modes). On CPU the
  process runs with ``MALLOC_MMAP_THRESHOLD_=65536`` so glibc returns every freed tensor to the OS
  and peak RSS tracks live tensors; the model, input, labels and zeroed ``.grad`` of every
  parameter exist before the baseline ``ru_maxrss`` is read, and the figure is the peak after one
  step (forward, cross-entropy, backward) minus that baseline. On CUDA it is
  ``max_memory_allocated`` over a step after a warm-up, with and without the memory allocated
  before the step.
* **Estimation** (:func:`estimate_memory`, :func:`max_batch_size`, the ``plan`` subcommand): an
  analytic model, no model run, of the tensors autograd keeps for backward in each mode plus the
  transient workspace at the backward peak; see :func:`estimate_memory` for the accounting.

    densenet-efficient plan --arch densenet121 --resolution 224 --memory 8GiB --amp bf16
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .engine import EFFICIENT, MAX_SAVING, MODES, NAIVE
from .registry import ArchConfig, densenet_bc_config, get_config

__all__ = [
    "IMPLEMENTATIONS",
    "MemoryEstimate",
    "StepSpec",
    "estimate_memory",
    "format_bytes",
    "max_batch_size",
    "measure",
    "parse_memory",
    "resolve_arch",
]

# -- implementations and architecture lookup ---------------------------------------------------

TORCHVISION = "torchvision"
TORCHVISION_EFFICIENT = "torchvision_efficient"
#: What can be measured: torchvision's two paths and each of our engine modes.
IMPLEMENTATIONS = (TORCHVISION, TORCHVISION_EFFICIENT, *MODES)

_BC_NAME = re.compile(r"^densenet_bc[_-]?(\d+)$")


def resolve_arch(arch: str | ArchConfig, growth_rate: int | None = None) -> ArchConfig:
    """An :class:`ArchConfig` from a registry name, ``densenet_bc_<depth>`` or a config itself.

    >>> resolve_arch("densenet_bc_250").block_config
    (41, 41, 41)
    """
    if isinstance(arch, ArchConfig):
        return arch
    if not isinstance(arch, str):
        raise TypeError(f"arch must be an architecture name or an ArchConfig, got {type(arch).__name__}")
    match = _BC_NAME.match(arch)
    if match:  # any depth; densenet_bc_100 is the same config as the registry's
        return densenet_bc_config(int(match.group(1)), growth_rate or 12)
    config = get_config(arch)
    if growth_rate is not None and growth_rate != config.growth_rate:
        raise ValueError(
            f"--growth-rate applies to DenseNet-BC (densenet_bc_<depth>) only; {arch} has k={config.growth_rate}"
        )
    return config


def describe(config: ArchConfig) -> str:
    """A short name: the registry's when ``config`` is registered, else DenseNet-BC/generic.

    >>> describe(densenet_bc_config(250))
    'densenet_bc_250'
    """
    from .registry import ARCHITECTURES

    for name, known in ARCHITECTURES.items():
        if known == config:
            return name
    layers = config.block_config
    if (
        config.small_inputs
        and len(set(layers)) == 1
        and len(layers) == 3
        and config == densenet_bc_config(6 * layers[0] + 4, config.growth_rate, config.num_classes)
    ):
        suffix = "" if config.growth_rate == 12 else f"_k{config.growth_rate}"
        return f"densenet_bc_{6 * layers[0] + 4}{suffix}"
    return f"DenseNet(k={config.growth_rate}, blocks={tuple(layers)}, init={config.num_init_features})"


def _build_model(impl: str, config: ArchConfig):
    """The model that ``impl`` names, freshly initialised from ``config``."""
    if impl in (TORCHVISION, TORCHVISION_EFFICIENT):
        from .reference import torchvision_densenet

        return torchvision_densenet(config, memory_efficient=impl == TORCHVISION_EFFICIENT)
    if impl in MODES:
        from .models import DenseNet

        return DenseNet(**config.to_kwargs(), memory_efficient=impl)
    raise ValueError(f"unknown implementation {impl!r}; expected one of {', '.join(IMPLEMENTATIONS)}")


# -- measurement protocol (one fresh process per figure) ------------------------------------------


@dataclass(frozen=True)
class StepSpec:
    """One measurement: which implementation, which config, what to record.

    ``kind="memory"`` records the peak of one training step, ``kind="speed"`` the median time
    of ``steps`` steps after one warm-up step. ``amp`` is ``None``, ``"bf16"`` or ``"fp16"``.
    ``warmup=True`` (memory on CPU) runs one step first and resets the peak (Linux
    ``/proc/self/clear_refs``) so the figure leaves out one-time allocations (oneDNN kernel
    caches, thread pools: 0-60 MB depending on the machine); the default is MEASURE.md's
    first-step protocol, which the published figures use.
    """

    impl: str
    config: ArchConfig
    batch_size: int
    resolution: int
    kind: str = "memory"
    device: str = "cpu"
    amp: str | None = None
    steps: int = 5
    threads: int = 2
    seed: int = 0
    warmup: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> StepSpec:
        data = json.loads(text)
        cfg = data.pop("config")
        cfg["block_config"] = tuple(cfg["block_config"])
        return cls(config=ArchConfig(**cfg), **data)


def _amp_dtype(amp: str | None):
    import torch

    return {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def _run_spec(spec: StepSpec) -> dict[str, Any]:
    """Execute ``spec`` in *this* process; call it only in a fresh one (see :func:`measure`)."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(spec.threads)
    torch.manual_seed(spec.seed)
    device = torch.device(spec.device)
    cuda = device.type == "cuda"
    model = _build_model(spec.impl, spec.config).to(device).train()
    x = torch.randn(spec.batch_size, 3, spec.resolution, spec.resolution, device=device)
    y = torch.randint(0, spec.config.num_classes, (spec.batch_size,), device=device)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    amp_dtype = _amp_dtype(spec.amp)

    def step() -> None:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = F.cross_entropy(model(x), y)
        loss.backward()

    result: dict[str, Any] = {"spec": json.loads(spec.to_json()), "torch": torch.__version__}
    if spec.kind == "memory":
        if cuda:
            step()  # warm-up: cuDNN plans, allocator pools
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            step()
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device)
            result.update(peak_bytes=peak - before, peak_total_bytes=peak, before_bytes=before)
        else:
            if spec.warmup:
                step()
                _reset_peak_rss()
            base = _peak_rss_bytes()
            step()
            peak = _peak_rss_bytes()
            if peak <= base:
                raise RuntimeError(f"peak RSS did not move during the step ({base} -> {peak} bytes)")
            result.update(peak_bytes=peak - base, baseline_rss_bytes=base)
    elif spec.kind == "speed":
        step()  # warm-up
        times = []
        for _ in range(spec.steps):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1000.0)
            else:
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
        result.update(seconds=statistics.median(times), times=times)
    else:
        raise ValueError(f"kind must be 'memory' or 'speed', got {spec.kind!r}")
    return result


def _peak_rss_bytes() -> int:
    """This process's peak resident set size (MEASURE.md's ``ru_maxrss``).

    On Linux ``ru_maxrss`` survives fork+exec: a worker started by a large process (a pytest
    worker, say) starts with its parent's peak and a step below it reads as zero. ``VmHWM`` is the
    same high-water mark for this process's own address space, which exec starts afresh.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource  # POSIX only

    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _reset_peak_rss() -> None:
    """Set this process's ``VmHWM`` to its current RSS (Linux >= 4.0), or say why it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as err:
        raise RuntimeError(
            f"warmup=True needs Linux's /proc/self/clear_refs to reset the peak RSS: {err}"
        ) from err


def _worker_main() -> None:
    """Subprocess entry point: read a :class:`StepSpec` as JSON from argv, print the result."""
    spec = StepSpec.from_json(sys.argv[1])
    print("RESULT " + json.dumps(_run_spec(spec)), flush=True)


def measure(spec: StepSpec, timeout: float | None = 1800) -> dict[str, Any]:
    """Run ``spec`` in a fresh Python process with the environment ``MEASURE.md`` prescribes.

    Memory runs get ``MALLOC_MMAP_THRESHOLD_=65536`` (peak RSS then tracks live tensors); speed
    runs keep the default allocator. Returns the worker's result dict: ``peak_bytes`` (memory)
    or ``seconds`` (median per step). Raises RuntimeError with the worker's stderr on failure.

    Example::

        r = measure(StepSpec("naive", densenet_bc_config(40), batch_size=16, resolution=32))
        print(r["peak_bytes"] / 2**20, "MiB")
    """
    env = dict(os.environ)
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if spec.kind == "memory" and spec.device == "cpu":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    # The worker must import this very copy of the package, installed or not.
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("OMP_NUM_THREADS", str(spec.threads))
    code = "from densenet_efficient.memory import _worker_main; _worker_main()"
    proc = subprocess.run(
        [sys.executable, "-c", code, spec.to_json()],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError(
            f"measuring {spec.impl} ({spec.kind}) failed with exit code {proc.returncode}: "
            + " | ".join(tail)
        )
    return json.loads(lines[-1][len("RESULT ") :])


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
    ``peak``: ``activations + workspace + overhead``, the figure ``MEASURE.md``'s protocol and
    the benchmark report. ``total`` adds parameters, gradients, optimizer state, the input batch
    and (CUDA) the context: what must fit the device.
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


def _conv_out(size: int, kernel: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - kernel) // stride + 1


def _timeline(
    config: ArchConfig, mode: str, n: int, height: int, width: int, e: int, pe: int = 4
) -> list[_Stage]:
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
    engine = mode in (EFFICIENT, MAX_SAVING)
    if not engine and mode not in (NAIVE, TORCHVISION, TORCHVISION_EFFICIENT):
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(ESTIMABLE)}")
    k, bn = config.growth_rate, config.bn_size * config.growth_rate
    c = config.num_init_features
    stages: list[_Stage] = []
    h, w = height, width
    if config.small_inputs:
        # conv0 saves only the input batch (counted in ``inputs``); its output is block 1's input.
        stages.append(_Stage("stem", 0, 0, 2 * c * n * h * w * e))
    else:
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
        stages.append(_Stage("stem", saved, 0, 2 * c * s0 * e + (indices if mode == MAX_SAVING else 0)))
    for b, layers in enumerate(config.block_config):
        s = n * h * w
        cf = c + layers * k
        if mode in (NAIVE, TORCHVISION):
            for i in range(layers):
                cl = c + i * k
                stages.append(
                    _Stage(f"block{b + 1}.layer{i + 1}", (2 * cl + 2 * bn) * s * e, 0, 2 * cl * s * e)
                )
            # the concatenation, assembled while the k-channel pieces are still alive
            stages.append(_Stage(f"block{b + 1}.output", cf * s * e, cf * s * e, 0))
        elif mode == TORCHVISION_EFFICIENT:
            stages.append(_Stage(f"block{b + 1}.input", c * s * e, 0, 0))
            for i in range(layers):
                cl = c + i * k
                # recomputed concat + norm1 output, their gradients, the pending grads of earlier pieces
                stages.append(_Stage(f"block{b + 1}.layer{i + 1}", (2 * bn + k) * s * e, 0, 4 * cl * s * e))
            stages.append(_Stage(f"block{b + 1}.output", cf * s * e, 0, 0))
        else:
            kept = bn if mode == EFFICIENT else 0
            grads = 2 * cf * s * e  # incoming gradient + the gradient buffer accumulated in place
            stages.append(_Stage(f"block{b + 1}.buffer", cf * s * e, 0, grads))
            pending = 0  # parameter gradients the block Function returns all at once, at its end
            layer_stages = []
            for i in reversed(range(layers)):
                cl = c + i * k
                pending += (2 * cl + cl * bn + 2 * bn + 9 * bn * k) * pe
                # Channel slices of the buffer are not contiguous, so the engine's BN calls copy
                # them. A layer's peak is norm1's backward (gradient in, copied input, gradient
                # out: 3 c_l) or conv2's backward: its gradient slice, norm1+ReLU and norm2+ReLU
                # recomputed, the bottleneck gradient and about one bottleneck of convolution
                # workspace (measured), plus the recomputed 1x1 output in max_saving.
                temps = max(3 * cl, k + cl + (4 if mode == MAX_SAVING else 3) * bn)
                layer_stages.append(
                    _Stage(
                        f"block{b + 1}.layer{i + 1}",
                        kept * s * e,
                        (2 * cl + bn) * s * e,
                        grads + temps * s * e + pending,
                    )
                )
            stages.extend(reversed(layer_stages))
        if b < len(config.block_config) - 1:
            # naive: norm output (in-place ReLU; saved by conv) and conv output (saved by the pool);
            # engine: nothing beyond its input, the block's buffer
            saved = 0 if engine else (cf + cf // 2) * s * e
            stages.append(_Stage(f"transition{b + 1}", saved, cf * s * e, 2 * cf * s * e))
            c = cf // 2
            h, w = h // 2, w // 2
        else:
            # the non-in-place final ReLU output (saved by ReLU and the average pool)
            stages.append(_Stage("head", cf * s * e, 0, 2 * cf * s * e))
    return stages


def _peak(stages: list[_Stage]) -> tuple[int, int]:
    """(activations, workspace): saved bytes after forward, and the largest excess over them."""
    kept = peak = 0
    for st in stages:  # forward: saved tensors accumulate; some stages briefly need more
        peak = max(peak, kept + st.saved + st.forward_extra)
        kept += st.saved
    total = kept
    for st in reversed(stages):  # backward frees a stage's saved tensors once it has run
        peak = max(peak, kept + st.backward_extra)
        kept -= st.saved
    return total, peak - total


def count_parameters(config: ArchConfig) -> int:
    """Trainable parameters of ``config``, computed from the architecture alone.

    >>> count_parameters(get_config("densenet121"))
    7978856
    """
    k, bn, c = config.growth_rate, config.bn_size * config.growth_rate, config.num_init_features
    total = 3 * c * (9 if config.small_inputs else 49) + (0 if config.small_inputs else 2 * c)
    for b, layers in enumerate(config.block_config):
        for i in range(layers):
            cl = c + i * k
            total += 2 * cl + cl * bn + 2 * bn + bn * k * 9
        c += layers * k
        if b < len(config.block_config) - 1:
            total += 2 * c + c * (c // 2)
            c //= 2
    return total + 2 * c + c * config.num_classes + config.num_classes


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _min_resolution(config: ArchConfig) -> int:
    from .models import _spatial_out  # the model's own rule, so planner and model never disagree

    size = 1
    while _spatial_out(size, config) < 1:
        size += 1
    return size


def estimate_memory(
    arch: str | ArchConfig,
    *,
    batch_size: int,
    resolution: int | None = None,
    mode: str | bool = EFFICIENT,
    dtype: str = "fp32",
    amp: str | None = None,
    device: str = "cuda",
    optimizer: str = "sgd",
) -> MemoryEstimate:
    """Analytic peak memory of one training step (forward, loss, backward); no model is run.

    Args:
        arch: a registry name (``"densenet121"``), ``"densenet_bc_<depth>"`` or an :class:`ArchConfig`.
        batch_size: images per step.
        resolution: input height and width (default: 32 for CIFAR configs, 224 otherwise).
        mode: ``"naive"``, ``"efficient"``, ``"max_saving"`` (``False``/``True`` as in the model),
            or ``"torchvision"``/``"torchvision_efficient"`` for torchvision's own DenseNet.
        dtype: parameter and activation dtype when not using autocast (``fp32``, ``bf16``, ...).
        amp: ``"bf16"``/``"fp16"``: autocast, so activations are half precision, parameters fp32.
        device: ``"cuda"`` (adds the CUDA context to ``total``) or ``"cpu"`` (adds the one-time
            first-step allocations that peak RSS shows).
        optimizer: ``"sgd"`` (momentum buffer), ``"adam"``/``"adamw"`` (two buffers) or ``"none"``.

    The activations are counted per stage from what each implementation saves for backward (see
    :func:`_timeline`); the workspace is the largest excess over them while backward frees stages
    in reverse. Every term is proportional to the batch, so memory is affine in ``batch_size``.

    >>> est = estimate_memory("densenet_bc_100", batch_size=64, mode="naive", device="cpu")
    >>> round(est.peak / 2**20)  # MEASURE.md measures 2159 MB on a 2-core CPU
    2165
    """
    from .engine import resolve_mode

    config = resolve_arch(arch)
    name = arch if isinstance(arch, str) else describe(config)
    if mode not in (TORCHVISION, TORCHVISION_EFFICIENT):
        mode = resolve_mode(mode)
    batch_size = _positive_int("batch_size", batch_size)
    resolution = 32 if resolution is None and config.small_inputs else resolution or 224
    resolution = _positive_int("resolution", resolution)
    least = _min_resolution(config)
    if resolution < least:
        raise ValueError(
            f"resolution {resolution} is too small for {name}: it needs at least {least}x{least}"
        )
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {', '.join(sorted(_DTYPE_BYTES))}, got {dtype!r}")
    if amp not in _AMP:
        raise ValueError(f"amp must be None, 'bf16' or 'fp16', got {amp!r}")
    amp = _AMP[amp]
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZER_STATES)}, got {optimizer!r}")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")

    param_bytes = _DTYPE_BYTES[dtype]
    act_bytes = 2 if amp else param_bytes
    n_params = count_parameters(config)
    stages = _timeline(config, mode, batch_size, resolution, resolution, act_bytes, param_bytes)
    activations, workspace = _peak(stages)
    if amp:
        # autocast's half-precision weight copies are saved by every conv/linear for backward
        activations += 2 * n_params
    return MemoryEstimate(
        arch=name,
        mode=mode,
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
        raise ValueError(
            f"{format_bytes(budget)} fits no batch of {one.arch} in {one.mode} mode at "
            f"{one.resolution}x{one.resolution}: one image needs at least {format_bytes(one.total)}"
        )
    slope = estimate_memory(arch, batch_size=2, **kwargs).total - one.total
    n = 1 + int((budget - one.total) // max(slope, 1))
    # memory is affine in the batch; step back over integer rounding in the stage sums
    while n > 1 and estimate_memory(arch, batch_size=n, **kwargs).total > budget:
        n -= 1
    return n


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
            raise ValueError(f"memory budget must be positive, got {value}")
        return value
    match = _SIZE.match(str(value))
    unit = match.group(2).lower() if match else None
    if unit not in _UNITS:
        raise ValueError(
            f"memory budget must look like 8GiB, 12GB, 512MiB or a number of bytes, got {value!r}"
        )
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"memory budget must be positive, got {value!r}")
    return size


def format_bytes(n: float) -> str:
    """``1536 MiB`` -> ``"1.50 GiB"``: binary units, 3 significant figures."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"


# -- the ``plan`` subcommand ----------------------------------------------------------------------


def configure_parser(parser) -> None:
    """Arguments of ``densenet-efficient plan``."""
    parser.add_argument(
        "--arch", default="densenet121", help="registry name or densenet_bc_<depth> (default densenet121)"
    )
    parser.add_argument("--depth", type=int, help="DenseNet-BC depth 6n+4 (overrides --arch)")
    parser.add_argument("--growth-rate", type=int, help="DenseNet-BC growth rate k (default 12)")
    parser.add_argument("--resolution", type=int, help="input height/width (default 224, CIFAR configs 32)")
    parser.add_argument("--memory", required=True, help="the budget, e.g. 8GiB, 12GB, 16000MiB")
    parser.add_argument("--amp", choices=("bf16", "fp16"), help="autocast: half-precision activations")
    parser.add_argument(
        "--dtype", default="fp32", choices=("fp32", "bf16", "fp16", "fp64"), help="parameter dtype"
    )
    parser.add_argument(
        "--mode", action="append", choices=ESTIMABLE, help="mode(s) to plan (default: all, torchvision too)"
    )
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="where training runs")
    parser.add_argument("--optimizer", default="sgd", choices=tuple(OPTIMIZER_STATES), help="optimizer state")
    parser.add_argument("--batch-size", type=int, help="also report the estimate at this batch size")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


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


def run(args) -> int:
    """``densenet-efficient plan``: print the largest batch per mode for a memory budget."""
    if args.depth is not None:
        arch = densenet_bc_config(args.depth, args.growth_rate or 12)
    else:
        arch = resolve_arch(args.arch, args.growth_rate)
    name = describe(arch)
    budget = parse_memory(args.memory)
    modes = tuple(dict.fromkeys(args.mode or ESTIMABLE))
    kwargs = dict(
        resolution=args.resolution,
        dtype=args.dtype,
        amp=args.amp,
        device=args.device,
        optimizer=args.optimizer,
    )
    rows = plan(arch, budget, modes=modes, batch_size=args.batch_size, **kwargs)
    if all(r["max_batch_size"] == 0 for r in rows):
        least = min(r["minimum"] for r in rows)
        raise ValueError(
            f"a budget of {format_bytes(budget)} fits no batch in any mode: the smallest step "
            f"(batch 1, {min(rows, key=lambda r: r['minimum'])['mode']}) needs {format_bytes(least)}"
        )
    if args.json:
        print(json.dumps({"arch": name, "memory": budget, "rows": rows}, indent=2))
    else:
        res = args.resolution or (32 if arch.small_inputs else 224)
        print(
            f"{name} at {res}x{res}, {args.amp or args.dtype} activations, {args.device}, optimizer {args.optimizer}: "
            f"budget {format_bytes(budget)}"
        )
        header = ["mode", "per image", "max batch", "peak step", "total at max"]
        if args.batch_size:
            header.append(f"total at batch {args.batch_size}")
        table = []
        for r in rows:
            at = r.get("at_max")
            cells = [r["mode"], format_bytes(r["per_image"]), str(r["max_batch_size"])]
            cells += [format_bytes(at["peak"]), format_bytes(at["total"])] if at else ["-", "-"]
            if args.batch_size:
                cells.append(format_bytes(r["at_batch"]["total"]))
            table.append(cells)
        print(_format_table(header, table))
    return 0


def _format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
