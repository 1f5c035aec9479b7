"""What the allocator and the runtime hold beyond the tensors a simulation counts.

The simulation (:mod:`.simulate`) counts the bytes of every tensor storage alive. What a device
really holds differs by what no tensor shows; these are its only measured or analytic constants,
and tests/models/test_planner.py checks each against what it stands for.

CPU (the whole-step protocol of docs/planner.md: the peak of a fresh process's anonymous memory,
glibc returning every block of 64 KiB or more and MKL its matrix products' buffers; the pages of
torch's libraries are not counted):

* :data:`CPU_RUNTIME`: the first optimizer made in a process imports torch's compiler stack
  (``torch.optim`` pulls in ``torch._dynamo``, about 890 modules) and the first step starts
  oneDNN.
* :data:`CPU_PER_LAYER_3X3`: what the process holds per dense layer beyond its tensors when only
  its 3x3 convolution runs on oneDNN (a quarter of it is the layer's modules as Python objects:
  18 KiB, measured on a built DenseNet-BC-250; the rest is not attributed); :data:`CPU_PER_LAYER`
  when both do (under autocast, or fp32 at a
  batch ATen hands its 1x1 convolutions to oneDNN, see :func:`uses_onednn`): the 1x1
  convolutions' primitives too, made by the first step, one set per layer since each reads
  another width.
  The three are one least-squares fit of the grid's 31 fixed settings (measured minus simulated:
  78-122 MiB; docs/planner.md), which they reproduce within 2.6 MiB.
* :func:`cpu_scratch`: oneDNN's convolutions reorder a plain (NCHW) input, and in backward the
  output's gradient too, into their blocked layout: copies the size of those tensors, made and
  freed inside the op, where no dispatch mode sees them. Read off the peak RSS of each op of a
  measured step (the gap between it and the tensors alive was those tensors' bytes in fp32).

Not modelled: MKL's fast memory manager, which by default keeps the buffers of the matrix
products that ATen's 1x1 convolutions run on when oneDNN does not (3-15 MiB for a DenseNet,
depending on its widths and map sizes; ``MKL_DISABLE_FAST_MM=1`` turns it off, as the protocol does).

CUDA (analytic, no device here):

* every storage is rounded to the caching allocator's 512-byte blocks inside the simulation
  (:data:`~.simulate.CUDA_BLOCK`). The segments it carves them from (2 MiB for blocks under
  1 MiB, 20 MiB up to 10 MiB, larger ones rounded to 2 MiB) and their fragmentation are not
  modelled: ``fit_memory(verify=True)`` measures them on the device and plans below them;
* :data:`CUDA_WORKSPACE`: cuDNN's convolution workspace, which its heuristics size at run time
  (torch caps what benchmark mode may take; the default algorithms of a DenseNet's 1x1 and 3x3
  convolutions take a few MiB to tens of MiB);
* :data:`CUDA_CONTEXT`: the CUDA context and cuBLAS/cuDNN handles, which
  ``torch.cuda.max_memory_allocated`` never sees (300-600 MiB by card and driver).
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import ArchConfig

__all__ = [
    "CPU_RUNTIME",
    "CUDA_CONTEXT",
    "CUDA_WORKSPACE",
    "cpu_scratch",
    "device_overhead",
    "regime",
    "uses_onednn",
]

_MIB = 1 << 20
_KIB = 1 << 10
CPU_RUNTIME = 77 * _MIB + 512 * _KIB
CPU_PER_LAYER = 358 * _KIB
CPU_PER_LAYER_3X3 = 70 * _KIB
CUDA_CONTEXT = 512 * _MIB
CUDA_WORKSPACE = 64 * _MIB


def device_overhead(config: ArchConfig, device: str, amp: str | None = None, batch: int = 16) -> int:
    """Bytes a training process holds on ``device`` beyond the tensors of its step (``batch``:
    its batch size, which decides on CPU whether oneDNN runs the 1x1 convolutions too)."""
    if device == "cpu":
        both = amp is not None or regime(batch) >= 16
        return CPU_RUNTIME + (CPU_PER_LAYER if both else CPU_PER_LAYER_3X3) * sum(config.block_config)
    return CUDA_CONTEXT + CUDA_WORKSPACE


#: What oneDNN holds inside a convolution's backward per byte of the tensors it reorders (the
#: input and the output's gradient): measured op by op, 1.00-1.08 (docs/planner.md).
BACKWARD_SCALE = 1.08
_CONVOLUTION = "aten::convolution"
_CONVOLUTION_BACKWARD = "aten::convolution_backward"


def cpu_scratch(func: Any, args: tuple, batch: int, threads: int | None = None) -> int:
    """Bytes a CPU convolution holds inside itself beyond its inputs and outputs: oneDNN reorders
    a plain input (forward: the larger of the input and the output, and a quarter of the other;
    backward: the input and the output's gradient). None where ATen runs the convolution without
    oneDNN (:func:`uses_onednn`). ``batch``: the step's batch size (the simulation's tensors have
    another), ``threads``: its intra-op threads (default: this process's)."""
    name = func.name()
    if name not in (_CONVOLUTION, _CONVOLUTION_BACKWARD):
        return 0
    if name == _CONVOLUTION:
        x, w, stride, dilation, groups = args[0], args[1], args[3], args[5], args[8]
    else:
        x, w, stride, dilation, groups = args[1], args[2], args[4], args[6], args[9]
    if not uses_onednn(x, w, stride, dilation, groups, batch, threads or torch.get_num_threads()):
        return 0
    if name == _CONVOLUTION:
        inp, out = _plain_bytes(x), _plain_bytes(x) * w.shape[0] // max(x.shape[1], 1) // _area(stride)
        return max(inp, out) + min(inp, out) // 4
    return int((_plain_bytes(args[0]) + _plain_bytes(x)) * BACKWARD_SCALE)


def uses_onednn(
    x: torch.Tensor, w: torch.Tensor, stride: Any, dilation: Any, groups: int, batch: int, threads: int
) -> bool:
    """Whether ATen's CPU convolution runs on oneDNN (``use_mkldnn`` in ATen's Convolution.cpp):
    always in half precision; in fp32 unless it is a 1x1, unstrided, undilated convolution of a
    batch under 16 on one thread, or a tiny one."""
    if x.dtype != torch.float32:
        return True
    strided = any(s != 1 for s in stride)
    dilated = any(d != 1 for d in dilation)
    one_by_one = w.shape[-1] == 1 and w.shape[-2] == 1
    if not (strided or dilated or batch >= 16 or not one_by_one or threads > 1):
        return False
    per_image = x.numel() // x.shape[0]
    return groups > 1 or (w.shape[-1] > 3 and w.shape[-2] > 3) or batch > 1 or per_image > 20480


def _area(stride: Any) -> int:
    out = 1
    for s in stride:
        out *= s
    return out


def _plain_bytes(t: torch.Tensor) -> int:
    """A plain-layout tensor's bytes (what a reorder copies); channels_last ones are read as they are."""
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return 0
    return t.numel() * t.element_size()


def regime(batch: int) -> int:
    """The batch a simulation stands for: one for every batch ATen treats alike (1, 2-15, 16 and
    more; all alike on more than one thread, where oneDNN runs every convolution)."""
    if torch.get_num_threads() > 1:
        return 16
    return 1 if batch == 1 else 2 if batch < 16 else 16
