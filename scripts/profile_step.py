#!/usr/bin/env python
"""Profile one training step of an implementation: where the time goes, per op (CPU or CUDA).

python scripts/profile_step.py --arch densenet121 --batch-size 64 --impl efficient torchvision
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from densenet_efficient.models.config import resolve_arch  # noqa: E402
from densenet_efficient.perf.measure import build_implementation  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="densenet121")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--resolution", type=int)
    p.add_argument("--impl", nargs="+", default=["torchvision", "efficient"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rows", type=int, default=15)
    args = p.parse_args()
    config = resolve_arch(args.arch)
    res = args.resolution or config.default_resolution
    dev = torch.device(args.device)
    x = torch.randn(args.batch_size, 3, res, res, device=dev)
    y = torch.randint(0, config.num_classes, (args.batch_size,), device=dev)
    for impl in args.impl:
        model = build_implementation(impl, config).to(dev).train()

        def step(model=model) -> None:
            F.cross_entropy(model(x), y).backward()

        for _ in range(3):
            step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(5):
            step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / 5
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with profile(activities=acts) as prof:
            step()
            if dev.type == "cuda":
                torch.cuda.synchronize()
        events = prof.key_averages()
        key = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
        gpu = sum(getattr(e, "self_device_time_total", 0) for e in events) / 1e3
        launches = sum(e.count for e in events if e.key.startswith("cuda") and "Launch" in e.key)
        print(
            f"\n=== {impl}: {wall * 1e3:.1f} ms/step wall, device busy {gpu:.1f} ms, kernel launches {launches}"
        )
        print(events.table(sort_by=key, row_limit=args.rows, max_name_column_width=50))


if __name__ == "__main__":
    main()
