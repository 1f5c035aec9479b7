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

``--compiled`` runs the compiled comparison instead, the same way (one process, interleaved
rounds, paired ratios): DenseNet-BC-100 at batch 64, 32x32, two threads, torchvision's model and
ours in the default mode, each eager and under ``torch.compile`` (torchvision's with the
compiler's activation budget 0.3, ``torch._functorch.config.activation_memory_budget``); the
compiling steps are the warm-up. ``OMP_WAIT_POLICY=PASSIVE`` keeps inductor's OpenMP threads from
spinning against ATen's (docs/benchmarks.md):

    OMP_WAIT_POLICY=PASSIVE python scripts/dispatch_bound.py --compiled --rounds 6
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F

import densenet_efficient as de
from densenet_efficient.errors import UsageError, check_int
from densenet_efficient.models.engine import native
from densenet_efficient.models.reference import torchvision_densenet
from densenet_efficient.perf.measure import paired_ratio, time_step

CONFIGS = (("densenet_bc_100", 8), ("densenet121", 32))
IMPLS = ("torchvision", "naive", "efficient", "max_saving", "efficient (python)", "max_saving (python)")
#: --compiled: the compiler's activation budget for torchvision's model (its fast end that still
#: saves memory) and what runs
BUDGET = 0.3
COMPILED_IMPLS = ("torchvision", "efficient", "efficient compiled", f"torchvision compiled@{BUDGET}")


def _model(arch: str, impl: str) -> torch.nn.Module:
    if " compiled" in impl:
        return torch.compile(_model(arch, impl.split()[0]), fullgraph=True)
    if impl == "torchvision":
        return torchvision_densenet(de.get_config(arch))
    return de.create_model(arch, memory_efficient=impl.split()[0])


def _context(impl: str) -> contextlib.AbstractContextManager:
    """What ``impl``'s steps run under: the Python engine, or the compiler's activation budget
    (read when the first step compiles)."""
    if impl.endswith("(python)"):
        return native.reference_engine()
    if "@" in impl:
        import torch._functorch.config as functorch_config

        return functorch_config.patch(activation_memory_budget=float(impl.split("@")[1]))
    return contextlib.nullcontext()


def _cpu_seconds(step) -> float:
    start = time.thread_time()
    step()
    return time.thread_time() - start


def run(
    arch: str, size: int, rounds: int, warmup: int, clock: str = "wall", impls: tuple = IMPLS, batch: int = 2
) -> dict[str, list[float]]:
    """``{impl: its step seconds, one per round}``, the rounds interleaved."""
    torch.manual_seed(0)
    models = {impl: _model(arch, impl) for impl in impls}
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, de.get_config(arch).num_classes, (batch,))

    timer = time_step if clock == "wall" else _cpu_seconds

    def step(impl: str) -> float:
        model = models[impl]

        def train_step() -> None:
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()

        with _context(impl):
            return timer(train_step)

    for _ in range(warmup):
        for impl in impls:
            step(impl)
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    for _ in range(rounds):
        for impl in impls:
            times[impl].append(step(impl))
    return times


def report(times: dict[str, list[float]], versus: tuple[str, ...]) -> list[str]:
    """One line per implementation: its median step, then the median of its per-round (paired)
    ratios to torchvision (with their range) and to each of ``versus``."""
    lines = []
    for impl, seconds in times.items():
        ratio, low, high = paired_ratio(seconds, times["torchvision"])
        others = "".join(f"  {paired_ratio(seconds, times[v])[0]:.3f}x {v}" for v in versus)
        lines.append(
            f"  {impl:26s} {statistics.median(seconds) * 1e3:8.2f} ms  {ratio:.3f}x torchvision "
            f"({low:.2f}-{high:.2f}){others}"
        )
    return lines


def _count(least: int):
    """An argparse type: an integer of at least ``least`` (a ratio needs one round at least)."""

    def parse(text: str) -> int:
        try:
            return check_int(int(text) if text.lstrip("-").isdigit() else text, "the value", least)
        except UsageError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return parse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=_count(1), default=40)
    parser.add_argument("--warmup", type=_count(0), default=3)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--compiled", action="store_true", help="the compiled comparison (see above)")
    args = parser.parse_args()
    threads, batch = (2, 64) if args.compiled else (1, 2)
    configs = (("densenet_bc_100", 32),) if args.compiled else CONFIGS
    impls = COMPILED_IMPLS if args.compiled else IMPLS
    torch.set_num_threads(threads)
    print(
        f"engine: {native.engine_status()}; torch {torch.__version__}; {threads} thread(s); "
        f"batch {batch}; {args.clock} clock"
    )
    for arch, size in configs:
        print(f"\n{arch} {size}x{size}, {args.rounds} rounds")
        times = run(arch, size, args.rounds, args.warmup, args.clock, impls, batch)
        # compiled: each row against our eager step and the compiler's point as well
        print("\n".join(report(times, (impls[1], impls[-1]) if args.compiled else (impls[1],))))


if __name__ == "__main__":
    main()
