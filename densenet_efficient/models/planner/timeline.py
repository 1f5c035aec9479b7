"""The memory model: what one training step keeps for backward, stage by stage, and its peak.

A step's stages (stem, each dense block's layers, transitions, head) in forward order, each with
the bytes it hands to autograd and the transient bytes it needs beyond them; :func:`peak` walks
them forward (kept bytes accumulate) and backward (a stage's bytes are freed once it has run).
A dense block's layers are one closed-form item (:class:`Layers`), so any depth costs O(blocks).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..config import ArchConfig
from ..engine import EFFICIENT, MAX_SAVING, NAIVE
from ..memory_plan import MemoryPlan
from .bisection import first_true
from .options import TORCHVISION, TORCHVISION_EFFICIENT, Dial, runs

__all__ = ["Layers", "Stage", "conv_out", "peak", "timeline"]


@dataclass(frozen=True)
class Stage:
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
class Layers:
    """The ``count`` layers of a dense block as one item, in closed form (O(1), not O(layers)).

    Layer ``i`` (0-based) keeps ``saved0 + saved1 * i`` bytes; while it runs forward (backward)
    it needs, beyond what is kept, the largest of ``forward(i)`` (``backward(i)``): exact integer
    functions of ``i`` that, added to the running total of kept bytes, are quadratics in ``i``
    (linear, convex or concave). The peaks are then maxima of quadratics over ``0..count-1``: at an
    end, or where a concave one stops rising, found by bisection. The result is exactly what the
    per-layer sum gives (tests/models/test_planner.py compares them).
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
    ``f(i + 1) <= f(i)`` (its differences never increase). Trying the ends and that point covers
    every case with O(log n) evaluations."""
    top = first_true(lambda i: f(i + 1) <= f(i), 0, n - 1)
    return max(f(0), f(n - 1), f(top))


def conv_out(size: int, kernel: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - kernel) // stride + 1


def timeline(
    config: ArchConfig, mode: str | MemoryPlan | Dial, n: int, height: int, width: int, e: int, pe: int = 4
) -> list[Stage | Layers]:
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
    if isinstance(mode, str) and mode not in (TORCHVISION, TORCHVISION_EFFICIENT):
        mode = MemoryPlan.uniform(mode, len(config.block_config))  # refuses an unknown mode
    c = config.num_init_features
    plan = None if isinstance(mode, str) else mode
    # autocast (activations in half precision, parameters not: e != pe): every convolution or
    # linear layer run as a module keeps a half-precision copy of its weight for backward; the
    # engine's blocks and transitions cast theirs for a moment instead (workspace, not kept).
    copy = e if e != pe else 0
    stem, (h, w) = _stem_stage(config, plan.stem if plan else mode, n, height, width, e, copy)
    stages = [stem]
    for b, layers in enumerate(config.block_config):
        name, s, cf = f"block{b + 1}", n * h * w, c + layers * config.growth_rate
        setting = plan.blocks[b] if plan else mode
        if setting in (NAIVE, TORCHVISION):
            stages += _naive_block(config, name, c, layers, s, e, copy)
        elif setting == TORCHVISION_EFFICIENT:
            stages += _checkpointed_block(config, name, c, layers, s, e, copy)
        else:
            stages += _engine_block(config, runs(setting, layers), name, c, s, e, pe, copy)
        if b < len(config.block_config) - 1:
            # naive: norm output (in-place ReLU; saved by conv) and conv output (saved by the pool);
            # engine: nothing beyond its input, the block's output
            naive = plan.all_naive if plan else True  # torchvision's transitions are naive
            weight = cf * (cf // 2) * copy  # the conv's half-precision weight: kept, or cast briefly
            saved = (cf + cf // 2) * s * e + weight if naive else 0
            extra = 0 if naive else weight
            stages.append(Stage(f"transition{b + 1}", saved, cf * s * e + extra, 2 * cf * s * e + extra))
            c = cf // 2
            h, w = h // 2, w // 2
        else:
            # the non-in-place final ReLU output (saved by ReLU and the average pool)
            # (and the classifier's half-precision weight and bias under autocast); its backward
            # makes the classifier's weight gradient before adding it into .grad, while every
            # activation is still kept: the step's peak for a naive ImageNet model
            classifier = (cf + 1) * config.num_classes
            stages.append(Stage("head", cf * s * e + classifier * copy, 0, 2 * cf * s * e + classifier * pe))
    return stages


def _stem_stage(
    config: ArchConfig, mode: str, n: int, h: int, w: int, e: int, copy: int = 0
) -> tuple[Stage, tuple[int, int]]:
    """The stem's stage and the spatial size it hands to the first block (``copy``: bytes per
    element of conv0's weight copy under autocast, which conv0 keeps in every mode)."""
    c = config.num_init_features
    weight = config.in_chans * c * (9 if config.small_inputs else 49) * copy
    if config.small_inputs:
        # conv0 saves only the input batch (counted in ``inputs``); its output is block 1's input.
        return Stage("stem", weight, 0, 2 * c * n * h * w * e), (h, w)
    h, w = conv_out(h, 7, 2, 3), conv_out(w, 7, 2, 3)
    s0 = n * h * w
    h, w = conv_out(h, 3, 2, 1), conv_out(w, 3, 2, 1)
    indices = 8 * c * n * h * w  # int64, one per pooled output
    if mode == MAX_SAVING:
        saved = c * s0 * e
    elif mode == EFFICIENT:  # conv0's output, the pooling indices and the output's sign (bool)
        saved = c * s0 * e + indices + c * n * h * w
    else:
        saved = 2 * c * s0 * e + indices
    # backward: the max-pool and BN gradients (2 c s0), plus in max_saving the recomputed
    # indices (its recomputed ReLU output is dead by the time BN's gradient is made)
    backward = 2 * c * s0 * e + (indices if mode == MAX_SAVING else 0)
    return Stage("stem", saved + weight, 0, backward), (h, w)


def _layer_range(name: str, layers: int, first: int = 0) -> str:
    """``block2.layer4-9``: the breakdown's name for ``layers`` layers from index ``first``."""
    return f"{name}.layer{first + 1}" + (f"-{first + layers}" if layers > 1 else "")


def _naive_block(
    config: ArchConfig, name: str, c: int, layers: int, s: int, e: int, copy: int = 0
) -> list[Stage | Layers]:
    k, bn = config.growth_rate, config.bn_size * config.growth_rate
    # layer i, reading c_i = c + i k channels: keeps (2 c_i + 2B) S, needs 2 c_i S more in backward;
    # under autocast also its two convolutions' weight copies, (c_i B + 9 B k) elements
    body = Layers(
        _layer_range(name, layers),
        layers,
        saved0=(2 * c + 2 * bn) * s * e + (c * bn + 9 * bn * k) * copy,
        saved1=2 * k * s * e + k * bn * copy,
        forward=(lambda i: 0,),
        backward=(lambda i: 2 * (c + i * k) * s * e,),
    )
    # the concatenation, assembled while the k-channel pieces are still alive
    cf = c + layers * k
    return [body, Stage(f"{name}.output", cf * s * e, cf * s * e, 0)]


def _checkpointed_block(
    config: ArchConfig, name: str, c: int, layers: int, s: int, e: int, copy: int = 0
) -> list[Stage | Layers]:
    k, bn = config.growth_rate, config.bn_size * config.growth_rate
    # layer i keeps (2B + k) S (and conv2's weight copy under autocast; conv1 runs checkpointed);
    # backward needs the recomputed concat + norm1 output, their gradients and the pending grads
    # of earlier pieces: 4 c_i S
    body = Layers(
        _layer_range(name, layers),
        layers,
        saved0=(2 * bn + k) * s * e + 9 * bn * k * copy,
        saved1=0,
        forward=(lambda i: 0,),
        backward=(lambda i: 4 * (c + i * k) * s * e,),
    )
    return [
        Stage(f"{name}.input", c * s * e, 0, 0),
        body,
        Stage(f"{name}.output", (c + layers * k) * s * e, 0, 0),
    ]


def _engine_block(
    config: ArchConfig,
    runs: list[tuple[bool, int]],
    name: str,
    c: int,
    s: int,
    e: int,
    pe: int,
    copy: int = 0,
) -> list[Stage | Layers]:
    """The engine's block: its buffer, then each run of layers that keep (or recompute) their
    bottleneck as one closed-form item (one item for "efficient" or "max_saving")."""
    k, bn, layers = config.growth_rate, config.bn_size * config.growth_rate, sum(n for _, n in runs)
    cf = c + layers * k
    grads = 2 * cf * s * e  # incoming gradient + the gradient buffer accumulated in place
    # under autocast the block casts all its convolution weights at the start of its forward and
    # again of its backward (models/engine/kernels.py, conv_weights): held through either, never kept
    weights = (bn * (layers * c + k * (layers * (layers - 1) // 2)) + layers * 9 * bn * k) * copy

    def pending(i: int) -> int:
        """Parameter gradients of layers i..L-1, which the block Function returns all at once at
        its end: layer j has (2 + B) c_j + 2B + 9Bk of them (norm1, conv1, norm2, conv2)."""
        n, first = layers - i, i * (i - 1) // 2
        return (
            (2 + bn) * (n * c + k * (layers * (layers - 1) // 2 - first)) + n * (2 * bn + 9 * bn * k)
        ) * pe

    # A layer's backward peak, as the allocation record of a measured step shows it (torch
    # profiler, profile_memory; docs/planner.md): norm1's backward holds four c_i-channel tensors
    # (the recomputed norm1+ReLU and its gradient, the dense copy of the input BN backward reads,
    # its output), or the convolutions' backward holds one more buffer-sized tensor, two c_i-channel
    # ones (the recomputed norm1+ReLU and the 1x1 convolution's input gradient) and two bottleneck-
    # sized ones (the recomputed norm2+ReLU and its gradient; a not-kept bottleneck is recomputed
    # into the same space). Which of the two is larger depends on c_i against C_final and B.
    # At the block's end its convolutions' gradients, made in the compute dtype, are cast back to
    # the parameters' (one _foreach_copy_): both copies, every parameter gradient and the weights'
    # copy are alive together.
    end = grads + pending(0) + 2 * weights
    items: list[Stage | Layers] = [Stage(f"{name}.buffer", cf * s * e, 0, end)]
    start = 0
    for kept, count in runs:
        first = start
        items.append(
            Layers(
                _layer_range(name, count, first),
                count,
                saved0=(bn if kept else 0) * s * e,
                saved1=0,
                forward=(lambda j, f=first: (2 * (c + (f + j) * k) + bn) * s * e + weights,),
                backward=(
                    lambda j, f=first: grads + weights + 3 * (c + (f + j) * k) * s * e + pending(f + j),
                    lambda j, f=first: (
                        grads + weights + (2 * (c + (f + j) * k) + 4 * bn) * s * e + pending(f + j)
                    ),
                ),
            )
        )
        start += count
    return items


def peak(stages: list[Stage | Layers]) -> tuple[int, int]:
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
