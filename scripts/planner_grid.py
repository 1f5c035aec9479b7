#!/usr/bin/env python
"""The planner's figure against the measured whole training step, on a grid of configurations.

Every point runs in its own fresh process (``StepSpec(kind="whole_step")``, docs/planner.md):
``MALLOC_MMAP_THRESHOLD_=65536``, baseline RSS before the model exists, then model, batch, zeroed
gradients, SGD with momentum and two steps; the figure is the peak RSS over the baseline. The
same process then measures the point again (its one-time allocations paid): the *warm* figure.
The planner's figure is ``estimate_memory(..., device="cpu", optimizer="momentum").total`` for the
point's plan (for the ``fit`` rows: the plan ``fit_memory`` picks for a budget that share of the
way from the ``max_saving`` total to the ``efficient`` one); the warm figure is compared with it
less ``overhead`` (the first step's one-time allocations, ``CPU_FIRST_STEP_OVERHEAD``).
The warm ratio must lie in [0.90, 1] and the fresh one must not exceed 1.

    taskset -c 1 python scripts/planner_grid.py              # the grid, ~15 min on one core
    python scripts/planner_grid.py --only densenet121 --jobs 2
    python scripts/planner_grid.py --json grid.json          # also keep the figures
    python scripts/planner_grid.py --reuse grid.json         # planner columns again, same measurements

Exit status 1 when a point is outside its bounds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from densenet_efficient.models.config import resolve_arch
from densenet_efficient.models.memory_plan import MemoryPlan, resolve_memory_plan
from densenet_efficient.models.planner import (
    LOWEST_RATIO,
    MemoryEstimate,
    estimate_memory,
    fit_memory,
    format_bytes,
)
from densenet_efficient.perf.benchmark import machine_description
from densenet_efficient.perf.measure import StepSpec, measure_series


@dataclass(frozen=True)
class Point:
    """One configuration: an architecture, a batch, an input size, autocast, and either a memory
    setting (``setting``) or a share ``fit`` of the way from the ``max_saving`` total to the
    ``efficient`` one, the budget ``fit_memory`` plans for."""

    arch: str
    batch: int
    size: int
    setting: Any = "efficient"
    amp: str | None = None
    fit: float | None = None

    @property
    def label(self) -> str:
        what = f"fit {self.fit:.0%}" if self.fit is not None else _setting_label(self.setting)
        return f"{self.arch} b{self.batch} {self.size}px {self.amp or 'fp32'} {what}"


def _setting_label(setting: Any) -> str:
    if isinstance(setting, str):
        return setting
    if isinstance(setting, MemoryPlan):
        return "dial (plan column)"
    return "[" + ", ".join(str(s) for s in setting) + "]"


MODES = ("naive", "efficient", "max_saving")
MIXED_121 = MemoryPlan(("efficient", (True, False) * 6, "max_saving", "efficient"), "max_saving")

#: BC depths, densenet121/169/201, batch sizes, fp32/bf16, every mode, dial settings (naive blocks
#: after engine blocks among them) and fit_memory's own plans; sized so that the whole grid takes
#: ~15 minutes on one core of the 2-core machine of docs/planner.md.
GRID = (
    *(Point("densenet_bc_40", 64, 32, m) for m in MODES),
    Point("densenet_bc_40", 16, 32, "efficient"),
    *(Point("densenet_bc_100", 32, 32, m) for m in MODES),
    *(Point("densenet_bc_100", 32, 32, m, amp="bf16") for m in MODES),
    Point("densenet_bc_190", 16, 32, "efficient"),
    Point("densenet_bc_190", 16, 32, "max_saving", amp="bf16"),
    Point("densenet_bc_100", 32, 32, (8, 16, 4)),
    Point("densenet_bc_100", 32, 32, ("naive", "efficient", "max_saving")),
    Point("densenet_bc_100", 32, 32, ("max_saving", 6, "naive")),
    Point("densenet_bc_100", 64, 32, fit=0.4),
    Point("densenet_bc_100", 64, 32, fit=0.8),
    *(Point("densenet121", 4, 128, m) for m in MODES),
    Point("densenet121", 4, 128, "efficient", amp="bf16"),
    Point("densenet121", 4, 128, "max_saving", amp="bf16"),
    Point("densenet121", 4, 128, ("max_saving", 6, True, "naive")),
    Point("densenet121", 4, 128, (True, True, True, "naive")),
    Point("densenet121", 4, 128, ("efficient", "naive", "efficient", "naive")),
    Point("densenet121", 8, 96, MIXED_121),
    Point("densenet121", 8, 128, fit=0.5),
    Point("densenet121", 8, 96, amp="bf16", fit=0.5),
    *(Point("densenet169", 4, 128, m) for m in MODES),
    Point("densenet169", 4, 128, "efficient", amp="bf16"),
    *(Point("densenet201", 2, 128, m) for m in MODES),
)


def plan_for(point: Point) -> tuple[MemoryPlan, MemoryEstimate]:
    """The plan a point runs and the planner's estimate for it."""
    config = resolve_arch(point.arch)
    kwargs = dict(
        batch_size=point.batch, image_size=point.size, amp=point.amp, device="cpu", optimizer="momentum"
    )
    if point.fit is not None:
        low, high = (estimate_memory(config, mode=m, **kwargs).total for m in ("max_saving", "efficient"))
        plan = fit_memory(config, low + int((high - low) * point.fit), **kwargs)
    else:
        setting = point.setting if isinstance(point.setting, (str, MemoryPlan)) else list(point.setting)
        plan = resolve_memory_plan(setting, config)
    return plan, estimate_memory(config, mode=plan, **kwargs)


def measure_point(point: Point, plan: MemoryPlan) -> tuple[int, int]:
    """(fresh, warm): the point's whole step in a fresh process, then once more in it."""
    spec = StepSpec(
        "efficient", resolve_arch(point.arch), point.batch, point.size, kind="whole_step", amp=point.amp,
        memory_plan=plan.to_json(),
    )  # fmt: skip
    fresh, warm = (r["peak_bytes"] for r in measure_series([spec, spec]))
    return fresh, warm


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="run the points whose label contains this text")
    parser.add_argument("--jobs", type=int, default=1, help="fresh processes at a time (default 1)")
    parser.add_argument("--json", help="write the figures to this file (rewritten after every point)")
    parser.add_argument("--reuse", help="take the measured figures from an earlier --json file")
    args = parser.parse_args(argv)
    points = [p for p in GRID if not args.only or args.only in p.label]
    plans = [plan_for(p) for p in points]
    old = {}
    if args.reuse:
        with open(args.reuse) as f:
            old = {r["label"]: (r["fresh"], r["warm"]) for r in json.load(f)["rows"]}
    machine = machine_description("cpu")
    print(f"Planner vs measured whole step ({machine}); ratio = measured / planner\n", flush=True)
    print("| config | plan | planner | measured | ratio | warm: planner | measured | ratio |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    rows: list[dict[str, Any]] = []

    def one(i: int) -> dict[str, Any]:
        point, (plan, est) = points[i], plans[i]
        fresh, warm = old[point.label] if args.reuse else measure_point(point, plan)
        planned, warm_planned = est.total, est.total - est.overhead
        row = dict(
            label=point.label, plan=str(plan), planner=planned, fresh=fresh, warm=warm,
            warm_planner=warm_planned, ratio=fresh / planned, warm_ratio=warm / warm_planned,
        )  # fmt: skip
        flag = "" if row["ratio"] <= 1.0 and LOWEST_RATIO <= row["warm_ratio"] <= 1.0 else " **out**"
        # each row as soon as it is measured: a long run shows its progress and loses nothing
        print(
            f"| {point.label} | {plan} | {format_bytes(planned)} | {format_bytes(fresh)} | {row['ratio']:.3f} "
            f"| {format_bytes(warm_planned)} | {format_bytes(warm)} | {row['warm_ratio']:.3f}{flag} |",
            flush=True,
        )
        rows.append(row)
        if args.json:
            with open(args.json + ".tmp", "w") as f:
                json.dump({"machine": machine, "rows": rows}, f, indent=1)
            os.replace(args.json + ".tmp", args.json)
        return row

    with ThreadPoolExecutor(args.jobs) as pool:
        done = list(pool.map(one, range(len(points))))
    fresh = [r["ratio"] for r in done]
    warm = [r["warm_ratio"] for r in done]
    bad = sum(f > 1.0 or not LOWEST_RATIO <= w <= 1.0 for f, w in zip(fresh, warm, strict=True))
    print(
        f"\n{len(done)} points; fresh ratio {min(fresh):.3f}-{max(fresh):.3f}, warm ratio "
        f"{min(warm):.3f}-{max(warm):.3f}; {bad} outside their bounds"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
