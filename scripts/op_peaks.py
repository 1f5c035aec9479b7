#!/usr/bin/env python
"""Op by op, what a real CPU training step holds inside each op beyond its inputs and outputs, against
what the planner's allocator model says (:func:`~densenet_efficient.models.planner.allocator.cpu_scratch`).

The simulation counts every tensor an op returns; what a backend allocates and frees inside an op
(oneDNN's reorders, a kernel's workspace) no dispatch mode sees. This runs the step for real on one
thread, with glibc returning every freed block of 64 KiB or more and MKL its buffers (the memory
protocol's ``MEMORY_ENV``), and around every op resets the peak RSS and reads it back: the op's transient is its peak anonymous memory above the larger of
the memory before and after it. Linux only (``/proc/self/clear_refs``). The engine runs as its
Python reference, so every op of the dense blocks is seen.

    MALLOC_MMAP_THRESHOLD_=65536 MKL_DISABLE_FAST_MM=1 python scripts/op_peaks.py --arch densenet121 --batch-size 8 --mode max_saving
    MALLOC_MMAP_THRESHOLD_=65536 MKL_DISABLE_FAST_MM=1 python scripts/op_peaks.py --arch densenet_bc_100 --image-size 32

Prints the step's peak and the op it is reached in, the ops whose transient most exceeds the
model, and the ops around the peak.
"""

from __future__ import annotations

import argparse
import collections
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import densenet_efficient as de
from densenet_efficient.models.config import resolve_arch
from densenet_efficient.models.engine import reference_engine
from densenet_efficient.models.planner.allocator import cpu_scratch

_MIB = 1 << 20


def anonymous_now_and_peak() -> tuple[int, int]:
    """(anonymous resident bytes now, peak resident bytes less file and shared pages)."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, value = line.split(":", 1)
            fields[key] = int(value.split()[0]) * 1024 if value.strip().endswith("kB") else 0
    return fields["RssAnon"], fields["VmHWM"] - fields["RssFile"] - fields["RssShmem"]


@dataclass
class OpPeak:
    op: str
    before: int
    after: int
    peak: int
    modelled: int  # cpu_scratch: what the planner adds inside this op
    shapes: list[tuple[int, ...]]

    @property
    def transient(self) -> int:
        return max(self.peak - max(self.before, self.after), 0)


class OpPeaks(TorchDispatchMode):
    """Records an :class:`OpPeak` per op dispatched inside it."""

    def __init__(self, batch: int) -> None:
        super().__init__()
        self.batch, self.rows = batch, []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak starts again from here
        before, _ = anonymous_now_and_peak()
        out = func(*args, **(kwargs or {}))
        after, peak = anonymous_now_and_peak()
        shapes = [tuple(t.shape) for t in tree_leaves(args) if isinstance(t, torch.Tensor)][:3]
        modelled = cpu_scratch(func, args, batch=self.batch, threads=1)
        self.rows.append(OpPeak(str(func), before, after, peak, modelled, shapes))
        return out


def measure(arch: str, batch: int, image_size: int | None, mode: str, channels_last: bool) -> list[OpPeak]:
    """The third training step of ``arch`` (two first: the one-time allocations), op by op."""
    torch.set_num_threads(1)
    config = resolve_arch(arch)
    size = image_size or config.default_resolution
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = de.DenseNet(**config.to_kwargs(), memory_efficient=mode).to(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(batch, config.in_chans, size, size).contiguous(memory_format=fmt)
    y = torch.zeros(batch, dtype=torch.long)
    recorder = OpPeaks(batch)
    for step in range(3):
        opt.zero_grad(set_to_none=False)
        with reference_engine(), recorder if step == 2 else torch.enable_grad():
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return recorder.rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="densenet121")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--image-size", type=int)
    p.add_argument("--mode", default="efficient")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--rows", type=int, default=10)
    args = p.parse_args(argv)
    rows = measure(args.arch, args.batch_size, args.image_size, args.mode, args.channels_last)
    at = max(range(len(rows)), key=lambda i: rows[i].peak)
    top = rows[at]
    print(f"step peak {top.peak / _MIB:.1f} MiB (the process's, baseline included) in op {at} of {len(rows)}: "
          f"{top.op} {top.shapes}, transient {top.transient / _MIB:.2f} MiB, modelled {top.modelled / _MIB:.2f} MiB")  # fmt: skip
    gaps: dict[str, list[int]] = collections.defaultdict(list)
    for r in rows:
        gaps[r.op].append(r.transient - r.modelled)
    print("largest transient beyond the model, per op (MiB, calls):")
    for op, values in sorted(gaps.items(), key=lambda kv: -max(kv[1]))[: args.rows]:
        print(f"  {op:48s} {max(values) / _MIB:7.2f} {len(values):6d}")
    print("around the peak (MiB):")
    for r in rows[max(0, at - 2) : at + 2]:
        print(f"  {r.op:44s} before {r.before / _MIB:7.1f} after {r.after / _MIB:7.1f} peak {r.peak / _MIB:7.1f} "
              f"transient {r.transient / _MIB:6.2f} modelled {r.modelled / _MIB:6.2f} {r.shapes}")  # fmt: skip


if __name__ == "__main__":
    main()
