"""Counting the kernel-launching ATen ops of a step: the GPU cost that does not show on a CPU clock.

On a GPU a DenseNet step at small and medium batches is bound by how fast the CPU issues
kernels, not by arithmetic. Every ATen op that computes (a convolution, a batch-norm kernel, an
add, a copy) launches at least one kernel; views and metadata ops (``slice``, ``view``,
``detach``, ``t``, ``as_strided``, ``empty``, ...) launch none. :class:`OpCounter` counts the
former below autograd, as a ``TorchDispatchMode``, so the count is the same on any device and
from run to run (docs/measurement.md, "Ops per step").

    from densenet_efficient.perf.opcount import count_step_ops
    counts = count_step_ops(model, torch.randn(2, 3, 64, 64))
    print(counts.total, counts.forward, counts.backward)
    print(counts.by_op.most_common(5))
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["OpCounter", "StepOps", "count_inference_ops", "count_step_ops", "launches_kernel"]

_aten = torch.ops.aten

#: Ops that return a tensor without running a kernel: allocations (their memory is written by the
#: op that fills it) and metadata-only ops that are not tagged as views.
_NO_KERNEL = {
    _aten.empty.memory_format,
    _aten.empty_strided.default,
    _aten.empty_like.default,
    _aten.new_empty.default,
    _aten.new_empty_strided.default,
    _aten.detach.default,
    _aten.lift_fresh.default,
    _aten.set_.source_Storage_storage_offset,
    _aten.resize_.default,
    _aten.is_same_size.default,
    _aten.sym_size.int,
    _aten.sym_stride.int,
    _aten.sym_numel.default,
    _aten.sym_storage_offset.default,
}


def launches_kernel(func: Any) -> bool:
    """Whether an ATen overload computes (launches a kernel) rather than only describing memory:
    not a view, not an allocation, and it returns or writes a tensor (``promote_types`` does not).

    >>> launches_kernel(torch.ops.aten.add.Tensor), launches_kernel(torch.ops.aten.slice.Tensor)
    (True, False)
    """
    if func is _aten._local_scalar_dense.default:  # ``.item()``: a device-to-host copy (and a sync)
        return True
    if func in _NO_KERNEL or getattr(func, "is_view", False):
        return False
    returns = func._schema.returns
    return not returns or any("Tensor" in str(r.type) for r in returns)


def _launches_kernel_named(name: str) -> bool:
    """:func:`launches_kernel` for an op known only by its profiler name (``aten::foo``): a view or
    allocation in any of its overloads launches no kernel."""
    namespace, _, op = name.partition("::")
    packet = getattr(getattr(torch.ops, namespace), op)
    overloads = [getattr(packet, overload) for overload in packet.overloads()]
    if any(o in _NO_KERNEL or getattr(o, "is_view", False) for o in overloads):
        return False
    return any(launches_kernel(o) for o in overloads)  # add.Tensor does, add.int (a list op) does not


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """File descriptor 2 to /dev/null: the profiler's C++ side logs two lines per start and stop
    there (a CPU-only machine adds a GPU-count error), and no setting turns them off."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _children_of_engine_ops(events: Any) -> Iterator[str]:
    """The names of the profiler events whose innermost enclosing event on their thread is one of
    the engine's ops: what the engine's native code calls directly.

    The profiler's own ``function_events`` tree says the same (``cpu_parent``) but takes a second
    per thousand events to build; this is its nesting rule (an interval inside another, per
    thread, the latest-starting enclosing one the parent) on the raw events.
    """
    threads: dict[int, list[tuple[int, int, str]]] = {}
    for e in events:
        if e.device_type() == torch.autograd.DeviceType.CPU and not e.is_async():
            threads.setdefault(e.start_thread_id(), []).append((e.start_ns(), -e.end_ns(), e.name()))
    for spans in threads.values():
        spans.sort()
        stack: list[tuple[int, str]] = []  # (end, name) of the enclosing events, innermost last
        for start, neg_end, name in spans:
            end = -neg_end
            while stack and (start >= stack[-1][0] or end > stack[-1][0]):
                stack.pop()
            if stack and stack[-1][1].startswith("densenet_efficient::"):
                yield name
            stack.append((end, name))


class OpCounter(TorchDispatchMode):
    """Counts kernel-launching ATen ops while active (``with OpCounter() as c: ...; c.total``).

    The engine's own ops (``densenet_efficient::*``) run native code that a dispatch mode cannot
    see into: their count is the ATen ops they call directly, recorded by torch's profiler, which
    runs while the counter is active.
    """

    def __init__(self) -> None:
        super().__init__()
        self.by_op: Counter[str] = Counter()
        self._profile: Any = None

    def __enter__(self) -> OpCounter:
        from torch.autograd.profiler import profile

        self._quiet = _native_stderr_silenced()
        self._quiet.__enter__()
        self._profile = profile(use_cpu=True).__enter__()
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self._profile.__exit__(*exc)
        self._quiet.__exit__(*exc)
        for name in _children_of_engine_ops(self._profile.kineto_results.events()):
            if name.startswith("aten::") and _launches_kernel_named(name):
                self.by_op[name.removeprefix("aten::")] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's hook
        if launches_kernel(func) and func.namespace != "densenet_efficient":  # those: see __exit__
            self.by_op[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.by_op.values())


@dataclass
class StepOps:
    """Kernel-launching ops of one step, split into forward (loss included) and backward."""

    forward: int
    backward: int
    by_op: Counter[str] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return self.forward + self.backward


def count_step_ops(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    autocast: torch.dtype | None = None,
    warmup: bool = True,
) -> StepOps:
    """Ops of one training step (forward, cross-entropy, backward) of ``model`` on ``x``.

    ``autocast``: a low-precision dtype to run the forward under ``torch.autocast``. A warm-up step
    runs first (uncounted) so that one-time work (lazy initialisation, cuDNN plans) is left out.
    The optimizer step is not counted: it is the same for every implementation.
    """
    model.train()
    if target is None:
        target = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)

    def forward() -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            return F.cross_entropy(model(x), target)

    if warmup:
        forward().backward()
    model.zero_grad(set_to_none=True)
    with OpCounter() as fwd:
        loss = forward()
    with OpCounter() as bwd:
        loss.backward()
    return StepOps(fwd.total, bwd.total, fwd.by_op + bwd.by_op)


def count_inference_ops(model: nn.Module, x: torch.Tensor) -> StepOps:
    """Ops of one eval-mode, no-grad forward of ``model`` on ``x`` (backward 0)."""
    model.eval()
    with torch.no_grad():
        model(x)  # warm-up
        with OpCounter() as c:
            model(x)
    return StepOps(c.total, 0, c.by_op)
