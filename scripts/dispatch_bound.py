"""The dispatch-bound training step: a CPU stand-in for a fast GPU, where issuing ops bounds the step.

One thread, batch 2, DenseNet-BC-100 at 8x8 and densenet121 at 32x32: the kernels are so small
that a step's time is the cost of issuing its ops (argument parsing, dispatch, autograd
bookkeeping, the Python around each call). Every implementation runs in this one process;
after the warm-up steps the rounds interleave them (A B C A B C ...), each round times one step of
each (``zero_grad(set_to_none=True)`` as optimizers do, forward, cross-entropy, backward), and a
ratio is the median of the per-round ratios to torchvision's naive model. ``efficient (python)`` is the same engine mode on the Python reference
engine (:func:`densenet_efficient.models.engine.reference_engine`), so the native engine's gain
is measured side by side. Run it on a quiet machine (load below 1.5):

    python scripts/dispatch_bound.py --rounds 40

``--clock cpu`` times the thread's CPU time instead of the wall clock: a rough figure while other
work shares the machine (cache and memory-bandwidth contention still show), never a published one.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F

import densenet_efficient as de
from densenet_efficient.models.engine import native
from densenet_efficient.models.reference import torchvision_densenet
from densenet_efficient.perf.measure import paired_ratio, time_step

CONFIGS = (("densenet_bc_100", 8), ("densenet121", 32))
IMPLS = ("torchvision", "naive", "efficient", "max_saving", "efficient (python)", "max_saving (python)")


def _model(arch: str, impl: str) -> torch.nn.Module:
    if impl == "torchvision":
        return torchvision_densenet(de.get_config(arch))
    return de.create_model(arch, memory_efficient=impl.split()[0])


def _cpu_seconds(step) -> float:
    start = time.thread_time()
    step()
    return time.thread_time() - start


def run(
    arch: str, size: int, rounds: int, warmup: int, clock: str = "wall"
) -> dict[str, tuple[float, float, float, float]]:
    """``{impl: (median step seconds, ratio to torchvision, low, high)}``."""
    torch.manual_seed(0)
    models = {impl: _model(arch, impl) for impl in IMPLS}
    x = torch.randn(2, 3, size, size)
    y = torch.randint(0, de.get_config(arch).num_classes, (2,))

    timer = time_step if clock == "wall" else _cpu_seconds

    def step(impl: str) -> float:
        model = models[impl]
        engine = native.reference_engine() if impl.endswith("(python)") else contextlib.nullcontext()

        def train_step() -> None:
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()

        with engine:
            return timer(train_step)

    for _ in range(warmup):
        for impl in IMPLS:
            step(impl)
    times: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    for _ in range(rounds):
        for impl in IMPLS:
            times[impl].append(step(impl))
    return {
        impl: (statistics.median(times[impl]), *paired_ratio(times[impl], times["torchvision"]))
        for impl in IMPLS
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(
        f"engine: {native.engine_status()}; torch {torch.__version__}; 1 thread; batch 2; {args.clock} clock"
    )
    for arch, size in CONFIGS:
        print(f"\n{arch} {size}x{size}, {args.rounds} rounds")
        results = run(arch, size, args.rounds, args.warmup, args.clock)
        for impl, (median, ratio, low, high) in results.items():
            vs_naive = median / results["naive"][0]
            print(
                f"  {impl:20s} {median * 1e3:8.2f} ms  {ratio:.3f}x torchvision ({low:.2f}-{high:.2f})"
                f"  {vs_naive:.3f}x naive (medians)"
            )


if __name__ == "__main__":
    main()
