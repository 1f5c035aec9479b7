"""Measuring one training step's memory and time, each figure in a fresh process (docs/measurement.md).

Every figure comes from a fresh subprocess running one implementation (torchvision naive,
torchvision ``memory_efficient=True`` or one of this package's modes). On CPU the process runs
with ``MALLOC_MMAP_THRESHOLD_=65536 MKL_DISABLE_FAST_MM=1`` (:data:`MEMORY_ENV`) so glibc and
MKL return freed memory to the OS and peak RSS tracks live tensors; the model, input, labels and
zeroed ``.grad`` of every parameter exist before the baseline peak is read, and the figure is the peak after one step (forward,
cross-entropy, backward) minus that baseline. On CUDA it is ``max_memory_allocated`` over a step
after a warm-up, with and without the memory allocated before the step.

``StepSpec(..., compile=True, activation_budget=0.3)`` measures the compiled peer: the model
wrapped in ``torch.compile`` with ``torch._functorch.config.activation_memory_budget`` set to that
fraction, warm (the compiling step is left out of every figure). An activation budget is a 0-1
fraction of what the compiler's default partitioner saves; the planner's budgets are bytes.

    r = measure(StepSpec("naive", densenet_bc_config(40), batch_size=16, image_size=32))
    print(r["peak_bytes"] / 2**20, "MiB")
"""

from __future__ import annotations

import json
import math
import numbers
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch.nn as nn

from ..errors import UsageError, first_line
from ..models.config import ArchConfig
from ..models.engine import MODES
from ..models.memory_plan import MemoryPlan
from ..models.planner import TORCHVISION, TORCHVISION_EFFICIENT

__all__ = [
    "IMPLEMENTATIONS",
    "MEMORY_ENV",
    "TORCHVISION",
    "TORCHVISION_EFFICIENT",
    "StepSpec",
    "build_implementation",
    "check_activation_budget",
    "anonymous_rss_bytes",
    "current_rss_bytes",
    "measure",
    "paired_ratio",
    "measure_series",
    "peak_anonymous_bytes",
    "peak_rss_bytes",
    "reset_peak_rss",
    "time_step",
]

#: What can be measured: torchvision's two paths and each of our engine modes.
IMPLEMENTATIONS = (TORCHVISION, TORCHVISION_EFFICIENT, *MODES)


def build_implementation(
    impl: str, config: ArchConfig, memory_plan: dict[str, Any] | None = None, drop_rate: float = 0.0
) -> nn.Module:
    """The model that ``impl`` names, freshly initialised from ``config`` (ours with ``memory_plan``,
    a :meth:`MemoryPlan.to_json` dict, when given), with dropout ``drop_rate`` after each layer."""
    if impl in (TORCHVISION, TORCHVISION_EFFICIENT):
        from ..models.reference import torchvision_densenet  # imports torchvision: only when asked

        return torchvision_densenet(config, memory_efficient=impl == TORCHVISION_EFFICIENT, drop_rate=drop_rate)
    if impl in MODES:
        from ..models.densenet import DenseNet

        setting = MemoryPlan.from_json(memory_plan) if memory_plan is not None else impl
        return DenseNet(**config.to_kwargs(), memory_efficient=setting, drop_rate=drop_rate)
    raise UsageError(f"unknown implementation {impl!r}; expected one of {', '.join(IMPLEMENTATIONS)}")


def check_activation_budget(value: Any) -> float:
    """``value`` as a float when it is a number in (0, 1]; otherwise a UsageError naming it.

    It is ``torch._functorch.config.activation_memory_budget``: the fraction of the default
    partitioner's saved activations the compiled graph may keep (1.0: the default partitioner).

    >>> check_activation_budget(0.3)
    0.3
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or not 0 < value <= 1
    ):
        raise UsageError(f"activation budget must be a number in (0, 1], got {value!r}")
    return float(value)


class _CompileFailed(RuntimeError):
    """The compiled model's first step (where ``torch.compile`` compiles) failed; one line."""


@dataclass(frozen=True)
class StepSpec:
    """One measurement: which implementation, which config, what to record.

    ``kind="memory"`` records the peak of one training step, ``kind="speed"`` the median time
    of ``steps`` steps after one warm-up step, ``kind="whole_step"`` the peak of everything a
    training step holds (see :func:`_whole_step_memory`: what the planner's ``total`` bounds).
    ``image_size`` is the input's height and width; ``amp`` is ``None``, ``"bf16"`` or ``"fp16"``.
    ``warmup=True`` (memory on CPU) runs one step first and resets the peak (Linux
    ``/proc/self/clear_refs``) so the figure leaves out one-time allocations (oneDNN kernel
    caches, thread pools: 0-60 MB depending on the machine); the default is the
    first-step protocol (docs/measurement.md), which the published figures use.
    ``compile=True`` wraps the model in ``torch.compile`` after setting
    ``torch._functorch.config.activation_memory_budget`` to ``activation_budget``, a fraction in
    (0, 1] (when given; only valid with ``compile``). A compiled spec is always measured warm: the
    step that compiles forward and backward runs first and is left out (on CPU the peak is reset
    after it, as with ``warmup=True``; speed and CUDA runs add one more warm-up step).

    >>> from densenet_efficient.models.config import densenet_bc_config
    >>> StepSpec("efficient", densenet_bc_config(40), 16, 32, kind="speed").image_size
    32
    """

    impl: str
    config: ArchConfig
    batch_size: int
    image_size: int
    kind: str = "memory"
    device: str = "cpu"
    amp: str | None = None
    steps: int = 5
    threads: int = 2
    seed: int = 0
    warmup: bool = False
    #: our implementations: a MemoryPlan (its to_json()) to run instead of ``impl``'s uniform mode
    memory_plan: dict[str, Any] | None = None
    #: model and input in ``torch.channels_last`` (NHWC): oneDNN's and cuDNN's preferred layout
    channels_last: bool = False
    compile: bool = False
    activation_budget: float | None = None
    #: whole steps: the optimizer whose state the step holds ("momentum": SGD with momentum 0.9,
    #: "sgd", "adam", "adamw")
    optimizer: str = "momentum"
    #: dropout after each dense layer (its masks are kept for backward)
    drop_rate: float = 0.0
    #: whole steps: only the classifier trains, as ``train --freeze-features`` runs it (the
    #: features take no gradient and their batch norms run in eval mode)
    freeze_features: bool = False

    def __post_init__(self) -> None:
        if self.activation_budget is not None:
            if not self.compile:
                raise UsageError(
                    f"activation_budget={self.activation_budget!r} needs compile=True "
                    "(it configures torch.compile)"
                )
            object.__setattr__(self, "activation_budget", check_activation_budget(self.activation_budget))

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "config": self.config.to_json()})

    @classmethod
    def from_json(cls, text: str) -> StepSpec:
        """The spec :meth:`to_json` wrote."""
        data = json.loads(text)
        return cls(config=ArchConfig.from_json(data.pop("config")), **data)


#: The environment of a CPU memory figure (docs/measurement.md): no allocator keeps freed memory.
#: glibc returns every block of 64 KiB or more to the OS, and MKL's fast memory manager, which
#: otherwise keeps the buffers of its matrix products (ATen's 1x1 convolutions that do not run
#: on oneDNN: 3-15 MiB for a DenseNet, depending on its shapes), frees them.
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MKL_DISABLE_FAST_MM": "1"}


def _allocator_environment() -> dict[str, str | None]:
    """The :data:`MEMORY_ENV` variables as the worker saw them (recorded with every figure)."""
    return {name: os.environ.get(name) for name in MEMORY_ENV}


def _amp_dtype(amp: str | None):
    import torch

    return {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def _run_spec(spec: StepSpec) -> dict[str, Any]:
    """Execute ``spec`` in *this* process; call it only in a fresh one (see :func:`measure`)."""
    import torch
    import torch.nn.functional as F

    if spec.kind not in ("memory", "speed", "whole_step"):
        raise UsageError(f"kind must be 'memory', 'speed' or 'whole_step', got {spec.kind!r}")
    torch.set_num_threads(spec.threads)
    torch.manual_seed(spec.seed)
    device = torch.device(spec.device)
    if spec.kind == "whole_step":
        return {
            "spec": json.loads(spec.to_json()),
            "torch": torch.__version__,
            "environment": _allocator_environment(),
            **_whole_step_memory(spec, device),
        }
    model = build_implementation(spec.impl, spec.config, spec.memory_plan, spec.drop_rate).to(device).train()
    fmt = torch.channels_last if spec.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    if spec.compile:
        if spec.activation_budget is not None:  # read when compiling: set before the first step
            torch._functorch.config.activation_memory_budget = spec.activation_budget
        model = torch.compile(model)
    x = torch.randn(spec.batch_size, 3, spec.image_size, spec.image_size, device=device)
    x = x.contiguous(memory_format=fmt)
    y = torch.randint(0, spec.config.num_classes, (spec.batch_size,), device=device)
    for p in model.parameters():  # gradients exist before the baseline: they are not activations
        p.grad = torch.zeros_like(p)
    amp_dtype = _amp_dtype(spec.amp)

    def step() -> None:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = F.cross_entropy(model(x), y)
        loss.backward()

    result: dict[str, Any] = {
        "spec": json.loads(spec.to_json()),
        "torch": torch.__version__,
        "environment": _allocator_environment(),
    }
    if spec.compile:
        t0 = time.perf_counter()
        _compile_step(step)
        result["compile_seconds"] = time.perf_counter() - t0
    measure_step = _step_memory if spec.kind == "memory" else _step_seconds
    result.update(measure_step(step, spec, device))
    return result


def _whole_step_memory(spec: StepSpec, device: Any) -> dict[str, Any]:
    """Peak bytes of a training run's steady step, from before the model exists.

    The baseline is read before anything of the run is allocated (torch imported, nothing built);
    then the model, the batch, zeroed gradients and SGD with momentum are made and two steps run
    (forward, cross-entropy, backward, ``optimizer.step()``): the second one runs with the momentum
    buffers the first one allocated, as every later step of a run does. The figure is the peak over
    all of it minus the baseline: parameters, gradients, momentum, batch, activations, workspace
    and the first step's one-time allocations (CPU: the anonymous memory's peak over its baseline,
    :func:`peak_anonymous_bytes` - ``RssAnon``, the pages of torch's libraries left out; CUDA:
    ``max_memory_allocated`` - ``memory_allocated``, plus the caching allocator's reserve).
    """
    import torch
    import torch.nn.functional as F

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.init()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()
        base = anonymous_rss_bytes()
    fmt = torch.channels_last if spec.channels_last else torch.contiguous_format
    model = build_implementation(spec.impl, spec.config, spec.memory_plan, spec.drop_rate).to(
        device, memory_format=fmt
    )
    model.train()
    if spec.freeze_features:
        model.features.requires_grad_(False).eval()
    x = torch.randn(spec.batch_size, 3, spec.image_size, spec.image_size, device=device)
    x = x.contiguous(memory_format=fmt)
    y = torch.randint(0, spec.config.num_classes, (spec.batch_size,), device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer = _whole_step_optimizer(spec.optimizer, params)
    amp_dtype = _amp_dtype(spec.amp)
    for _ in range(2):
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
    if cuda:
        torch.cuda.synchronize(device)
        return {
            "peak_bytes": torch.cuda.max_memory_allocated(device) - base,
            "reserved_bytes": torch.cuda.max_memory_reserved(device),
        }
    return {"peak_bytes": peak_anonymous_bytes() - base, "baseline_anonymous_bytes": base}


def _whole_step_optimizer(name: str, params: list) -> Any:
    """The optimizer a whole step runs (None for "none"), as the planner's ``optimizer`` names it."""
    import torch

    if name == "none":
        return None
    if name in ("sgd", "momentum"):
        return torch.optim.SGD(params, lr=1e-3, momentum=0.9 if name == "momentum" else 0.0)
    if name in ("adam", "adamw"):
        return (torch.optim.AdamW if name == "adamw" else torch.optim.Adam)(params, lr=1e-3)
    raise UsageError(f"optimizer must be none, sgd, momentum, adam or adamw, got {name!r}")


def _compile_step(step: Callable[[], None]) -> None:
    """Run the compiled model's first step (dynamo, AOTAutograd and inductor compile forward and
    backward here); any failure becomes one line in a :class:`_CompileFailed`."""
    import torch

    try:
        step()
    except torch.OutOfMemoryError as err:
        raise _CompileFailed(f"out of memory in the compiling step: {first_line(err)}") from err
    except Exception as err:
        raise _CompileFailed(f"torch.compile failed: {type(err).__name__}: {first_line(err)}") from err


def _step_memory(step: Callable[[], None], spec: StepSpec, device: Any) -> dict[str, Any]:
    """CUDA: ``max_memory_allocated`` over a step after a warm-up. CPU: peak RSS over the step.

    A compiled spec has already run its compiling step: on CPU the peak is reset after it (the
    ``warmup=True`` protocol); on CUDA one more warm-up step follows it.
    """
    import torch

    if device.type == "cuda":
        step()  # warm-up: cuDNN plans, allocator pools
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_bytes": peak - before, "peak_total_bytes": peak, "before_bytes": before}
    if spec.warmup or spec.compile:
        if not spec.compile:  # the compiling step was the warm-up
            step()
        reset_peak_rss()
    base = peak_rss_bytes()
    step()
    peak = peak_rss_bytes()
    if peak <= base:
        raise RuntimeError(f"peak RSS did not move during the step ({base} -> {peak} bytes)")
    return {"peak_bytes": peak - base, "baseline_rss_bytes": base}


def _step_seconds(step: Callable[[], None], spec: StepSpec, device: Any) -> dict[str, Any]:
    """Median seconds of ``spec.steps`` steps after one warm-up (CUDA events on a GPU).

    A compiled spec has run its compiling step before: two warm-up steps in all.
    """
    step()  # warm-up
    times = [time_step(step, device) for _ in range(spec.steps)]
    return {"seconds": statistics.median(times), "times": times}


def time_step(step: Callable[[], None], device: Any = "cpu") -> float:
    """Seconds one call of ``step`` takes: CUDA events around it on a CUDA ``device`` (the GPU's
    own clock, waited for), ``time.perf_counter`` otherwise.

    >>> time_step(lambda: None) >= 0
    True
    """
    import torch

    if torch.device(device).type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def paired_ratio(seconds: Sequence[float], base: Sequence[float]) -> tuple[float, float, float]:
    """(median, min, max) of the per-round ratios ``seconds[k] / base[k]``.

    Rounds measured interleaved (A B A B ...) are paired: a shared machine's drifting speed hits
    both figures of a round alike and cancels in their ratio.

    >>> paired_ratio([2.0, 3.0, 5.0], [1.0, 2.0, 2.0])
    (2.0, 1.5, 2.5)
    """
    paired = [t / b for t, b in zip(seconds, base, strict=True)]
    return statistics.median(paired), min(paired), max(paired)


def peak_rss_bytes() -> int:
    """This process's peak resident set size (``VmHWM``; ``ru_maxrss`` where /proc is missing).

    On Linux ``ru_maxrss`` survives fork+exec: a worker started by a large process (a pytest
    worker, say) starts with its parent's peak and a step below it reads as zero. ``VmHWM`` is the
    same high-water mark for this process's own address space, which exec starts afresh.
    """
    try:
        return _status_bytes("VmHWM")["VmHWM"]
    except (OSError, RuntimeError):
        pass
    import resource  # POSIX only

    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def current_rss_bytes() -> int:
    """This process's resident set size now (``VmRSS``, Linux)."""
    return _status_bytes("VmRSS")["VmRSS"]


def _status_bytes(*fields: str) -> dict[str, int]:
    """Fields of ``/proc/self/status`` (kB there) in bytes; RuntimeError naming a missing one."""
    found: dict[str, int] = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in fields:
                found[name] = int(value.split()[0]) * 1024
    missing = [n for n in fields if n not in found]
    if missing:
        raise RuntimeError(f"no {', '.join(missing)} line in /proc/self/status (Linux >= 4.5 has them)")
    return found


def anonymous_rss_bytes() -> int:
    """This process's anonymous resident memory now (``RssAnon``): heap, mmapped blocks, stacks."""
    return _status_bytes("RssAnon")["RssAnon"]


def peak_anonymous_bytes() -> int:
    """The peak of this process's anonymous resident memory since :func:`reset_peak_rss`.

    Linux keeps no peak of ``RssAnon``, only of the whole RSS (``VmHWM``), which also counts the
    pages of mapped files (torch's shared libraries) this process has touched. Those are
    reclaimable, and how many a first touch maps depends on the page cache (a freshly installed
    torch maps 130 MiB more of its libraries than one read back from disk, measured here), so
    they are taken off: ``VmHWM`` less the file and shared pages resident now. Files are only
    mapped in, never out, while a step runs on a machine with memory to spare, so the file pages
    at the peak are at most those resident now.
    """
    s = _status_bytes("VmHWM", "RssFile", "RssShmem")
    return s["VmHWM"] - s["RssFile"] - s["RssShmem"]


def reset_peak_rss() -> None:
    """Set this process's ``VmHWM`` to its current RSS (Linux >= 4.0), or say why it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as err:
        raise RuntimeError(
            f"warmup=True needs Linux's /proc/self/clear_refs to reset the peak RSS: {err}"
        ) from err


def _worker_main() -> None:
    """Subprocess entry point: read a JSON list of :class:`StepSpec` from argv, print each result."""
    import gc

    for text in json.loads(sys.argv[1]):
        try:
            result = _run_spec(StepSpec.from_json(text))
        except _CompileFailed as err:
            print(f"ERROR {err}", flush=True)  # one line for the benchmark's row
            sys.exit(1)
        print("RESULT " + json.dumps(result), flush=True)
        gc.collect()  # the next spec's baseline starts without this one's tensors


def measure(spec: StepSpec, timeout: float | None = 1800) -> dict[str, Any]:
    """Run ``spec`` in a fresh Python process with the environment docs/measurement.md prescribes.

    Memory runs get :data:`MEMORY_ENV` (peak RSS then tracks live tensors); speed
    runs keep the default allocator. Returns the worker's result dict: ``peak_bytes`` (memory)
    or ``seconds`` (median per step). Raises RuntimeError with the worker's stderr on failure;
    when a compiled spec's compiling step failed, the message is that one line
    (``"torch.compile failed: ..."``).

    Example::

        r = measure(StepSpec("naive", densenet_bc_config(40), batch_size=16, image_size=32))
        print(r["peak_bytes"] / 2**20, "MiB")
    """
    return measure_series([spec], timeout)[0]


def measure_series(specs: list[StepSpec], timeout: float | None = 1800) -> list[dict[str, Any]]:
    """Run ``specs`` one after the other in *one* fresh process (what :func:`measure` does for one).

    Cheaper than a process per figure (one interpreter and torch import), for figures that do not
    need a fresh process: warm memory steps (``warmup=True``, the peak is reset before each) and
    whole steps measured from their own baseline, where only the first spec of the series pays
    the process's one-time allocations. All specs share the first one's kind and device.
    """
    if not specs:
        return []
    first = specs[0]
    if any((s.kind, s.device, s.threads) != (first.kind, first.device, first.threads) for s in specs):
        raise UsageError("measure_series: every spec needs the same kind, device and threads")
    env = {k: v for k, v in os.environ.items() if k not in MEMORY_ENV}
    if first.kind in ("memory", "whole_step") and first.device == "cpu":
        env.update(MEMORY_ENV)
    # The worker must import this very copy of the package, installed or not.
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("OMP_NUM_THREADS", str(first.threads))
    code = "from densenet_efficient.perf.measure import _worker_main; _worker_main()"
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps([s.to_json() for s in specs])],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    errors = [ln for ln in proc.stdout.splitlines() if ln.startswith("ERROR ")]
    if proc.returncode != 0 and errors:
        raise RuntimeError(errors[-1][len("ERROR ") :])
    if proc.returncode != 0 or len(lines) != len(specs):
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError(
            f"measuring {first.impl} ({first.kind}) failed with exit code {proc.returncode}: "
            + " | ".join(tail)
        )
    return [json.loads(ln[len("RESULT ") :]) for ln in lines]
