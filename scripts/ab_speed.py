"""Alternate several implementations step by step in one process and print median step times.

A quick A/B on a noisy machine (drift hits every implementation alike); the published protocol
is ``densenet-efficient benchmark`` (one process per row). With one implementation it times that
implementation's steady-state step alone. Also prints the minor page faults per step: on CPU they
show the allocator returning memory to the kernel between steps. Steps are timed by
``perf.measure.time_step`` and compared by ``perf.measure.paired_ratio``, as the benchmark's are.

    python scripts/ab_speed.py densenet_bc_100 64 32 5 torchvision,efficient,max_saving
    python scripts/ab_speed.py densenet121 8 224 3 efficient

It imports the installed package: run it from a checkout after
``pip install -e .`` (or with ``PYTHONPATH=.``).
"""

import resource
import statistics
import sys

import torch
import torch.nn.functional as F

import densenet_efficient as de
from densenet_efficient.models.reference import torchvision_densenet
from densenet_efficient.perf.measure import paired_ratio, time_step


def main(arch: str, batch: int, res: int, rounds: int, impls: list[str]) -> None:
    torch.set_num_threads(2)
    cfg = de.get_config(arch)
    models = {
        impl: torchvision_densenet(cfg, memory_efficient=impl == "torchvision_efficient")
        if impl.startswith("torchvision")
        else de.create_model(arch, memory_efficient=impl)
        for impl in impls
    }
    x, y = torch.randn(batch, 3, res, res), torch.randint(0, cfg.num_classes, (batch,))

    def step(model: torch.nn.Module) -> tuple[float, int]:
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        elapsed = time_step(lambda: F.cross_entropy(model(x), y).backward())
        return elapsed, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults

    for _ in range(2):  # warm-up: kernel caches, then the allocator's steady state
        for model in models.values():
            step(model)
    times: dict[str, list[float]] = {k: [] for k in models}
    faults: dict[str, list[int]] = {k: [] for k in models}
    for _ in range(rounds):
        for k, model in models.items():
            t, f = step(model)
            times[k].append(t)
            faults[k].append(f)
    for k in impls:  # each step paired with the first implementation's step of the same round
        med = statistics.median(times[k])
        ratio, low, high = paired_ratio(times[k], times[impls[0]])
        print(
            f"{k:22s} {med * 1e3:9.1f} ms  {ratio:.3f}x ({low:.2f}-{high:.2f})  page faults/step {faults[k]}"
        )


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], int(a[1]), int(a[2]), int(a[3]), a[4].split(","))
