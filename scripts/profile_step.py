#!/usr/bin/env python
"""Profile one training step per implementation: the kernel-launching ATen ops it issues (per op,
forward and backward) and where the time goes (torch.profiler), on CPU or CUDA.

    python scripts/profile_step.py --arch densenet121 --batch-size 64 --impl torchvision efficient
    python scripts/profile_step.py --arch densenet_bc_100 --batch-size 2 --device cpu --no-profile

Run it after ``pip install -e .`` (or with ``PYTHONPATH=.``). The op counts are those of ``densenet-efficient benchmark``'s ops/step column (docs/measurement.md,
"Ops per step"): deterministic, the same on any machine for a given device type.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import densenet_efficient as de
from densenet_efficient.models.config import resolve_arch
from densenet_efficient.perf.measure import build_implementation
from densenet_efficient.perf.opcount import count_step_ops


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="densenet121")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int)
    p.add_argument("--impl", nargs="+", default=["torchvision", "efficient"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--rows", type=int, default=15, help="rows of each table")
    p.add_argument("--no-profile", action="store_true", help="op counts only (no timing profile)")
    args = p.parse_args(argv)
    config = resolve_arch(args.arch)
    res = args.image_size or config.default_resolution
    dev = torch.device(args.device)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    x = torch.randn(args.batch_size, 3, res, res, device=dev).contiguous(memory_format=fmt)
    y = torch.randint(0, config.num_classes, (args.batch_size,), device=dev)
    amp = torch.bfloat16 if args.bf16 else None
    print(f"engine: {de.engine_status()}")
    for impl in args.impl:
        model = build_implementation(impl, config).to(dev, memory_format=fmt).train()
        ops = count_step_ops(model, x, y, autocast=amp)
        print(f"\n=== {impl}: {ops.total} ops/step (forward {ops.forward}, backward {ops.backward})")
        for name, n in ops.by_op.most_common(args.rows):
            print(f"  {n:6d}  {name}")
        if args.no_profile:
            continue

        def step(model=model) -> None:
            with torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss = F.cross_entropy(model(x), y)
            loss.backward()

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
        busy = sum(getattr(e, "self_device_time_total", 0) for e in events) / 1e3
        launches = sum(e.count for e in events if e.key.startswith("cuda") and "Launch" in e.key)
        print(f"  {wall * 1e3:.1f} ms/step wall, device busy {busy:.1f} ms, kernel launches {launches}")
        print(events.table(sort_by=key, row_limit=args.rows, max_name_column_width=50))


if __name__ == "__main__":
    main()
