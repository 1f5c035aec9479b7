#!/usr/bin/env python
"""The planner's figure against the measured whole training step, on a grid of configurations.

Every point runs in a fresh process (``StepSpec(kind="whole_step")``, docs/planner.md):
``MALLOC_MMAP_THRESHOLD_=65536``, baseline RSS before the model exists, then model, batch, zeroed
gradients, SGD with momentum and two steps; the figure is the peak RSS over the baseline. The
planner's figure is ``estimate_memory(..., device="cpu", optimizer="momentum").total`` (for the
``fit`` rows: the plan ``fit_memory`` picks for the budget, and its ``estimated_peak``). The
planner must be an upper bound of every point (ratio measured / planner <= 1) and within 10% of
it (ratio >= 0.90).

    python scripts/planner_grid.py              # the full grid, ~15 min on 2 cores
    python scripts/planner_grid.py --only densenet121 --jobs 1
    python scripts/planner_grid.py --json grid.json   # also keep the figures
    python scripts/planner_grid.py --reuse grid.json  # planner columns again, same measurements

Exit status 1 when a point is over its planner figure or more than 10% under it.
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
    estimate_memory,
    fit_memory,
    format_bytes,
    parse_memory,
)
from densenet_efficient.perf.benchmark import machine_description
from densenet_efficient.perf.measure import StepSpec, measure


@dataclass(frozen=True)
class Point:
    """One configuration: an architecture, a batch, an input size, autocast, and either a memory
    setting (``setting``) or a budget ``fit_memory`` plans for (``budget``)."""

    arch: str
    batch: int
    size: int
    setting: Any = "efficient"
    amp: str | None = None
    budget: str | None = None

    @property
    def label(self) -> str:
        what = f"fit {self.budget}" if self.budget else _setting_label(self.setting)
        return f"{self.arch} b{self.batch} {self.size}px {self.amp or 'fp32'} {what}"


def _setting_label(setting: Any) -> str:
    if isinstance(setting, str):
        return setting
    if isinstance(setting, MemoryPlan):
        return str(setting)
    return "[" + ", ".join(str(s) for s in setting) + "]"


MODES = ("naive", "efficient", "max_saving")
MIXED_121 = MemoryPlan(("efficient", (True, False) * 6, "max_saving", "efficient"), "max_saving")

#: BC depths, densenet121/169/201, batch sizes, fp32/bf16, every mode, dial settings (naive blocks
#: after engine blocks among them) and fit_memory's own plans.
GRID = (
    *(Point("densenet_bc_100", 64, 32, m) for m in MODES),
    *(Point("densenet_bc_40", 64, 32, m) for m in MODES),
    *(Point("densenet_bc_100", 64, 32, m, amp="bf16") for m in MODES),
    Point("densenet_bc_190", 32, 32, "efficient"),
    Point("densenet_bc_190", 32, 32, "max_saving"),
    Point("densenet_bc_100", 32, 32, (8, 16, 4)),
    Point("densenet_bc_100", 32, 32, ("naive", "efficient", "max_saving")),
    Point("densenet_bc_100", 32, 32, ("max_saving", 6, "naive")),
    Point("densenet_bc_100", 64, 32, budget="450MiB"),
    Point("densenet_bc_100", 64, 32, budget="600MiB"),
    *(Point("densenet121", 8, 224, m) for m in MODES),
    Point("densenet121", 8, 224, "efficient", amp="bf16"),
    Point("densenet121", 8, 224, "max_saving", amp="bf16"),
    Point("densenet121", 8, 224, budget="320MiB"),
    Point("densenet121", 8, 224, budget="400MiB"),
    Point("densenet121", 8, 128, ("max_saving", 6, True, "naive")),
    Point("densenet121", 8, 128, (True, True, True, "naive")),
    Point("densenet121", 8, 128, ("efficient", "naive", "efficient", "naive")),
    Point("densenet121", 16, 96, MIXED_121),
    Point("densenet121", 16, 128, budget="200MiB", amp="bf16"),
    *(Point("densenet169", 8, 160, m) for m in MODES),
    Point("densenet169", 4, 224, "efficient", amp="bf16"),
    *(Point("densenet201", 4, 224, m) for m in MODES),
)


def plan_for(point: Point) -> tuple[MemoryPlan, int]:
    """The plan a point runs and the planner's figure for it."""
    config = resolve_arch(point.arch)
    kwargs = dict(
        batch_size=point.batch, image_size=point.size, amp=point.amp, device="cpu", optimizer="momentum"
    )
    if point.budget:
        plan = fit_memory(config, point.budget, **kwargs)
        return plan, plan.estimated_peak
    plan = resolve_memory_plan(
        point.setting if isinstance(point.setting, (str, MemoryPlan)) else list(point.setting), config
    )
    return plan, estimate_memory(config, mode=plan, **kwargs).total


def measure_point(point: Point, plan: MemoryPlan) -> int:
    spec = StepSpec(
        "efficient", resolve_arch(point.arch), point.batch, point.size, kind="whole_step", amp=point.amp,
        memory_plan=plan.to_json(),
    )  # fmt: skip
    return measure(spec)["peak_bytes"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="run the points whose label contains this text")
    parser.add_argument("--jobs", type=int, default=2, help="fresh processes at a time (default 2)")
    parser.add_argument("--json", help="write the figures to this file (rewritten after every point)")
    parser.add_argument("--reuse", help="take the measured figures from an earlier --json file")
    args = parser.parse_args(argv)
    points = [p for p in GRID if not args.only or args.only in p.label]
    plans = [plan_for(p) for p in points]
    old = {}
    if args.reuse:
        with open(args.reuse) as f:
            old = {r["label"]: r["measured"] for r in json.load(f)["rows"]}
    machine = machine_description("cpu")
    print(f"Planner vs measured whole step ({machine}); ratio = measured / planner\n", flush=True)
    print("| config | plan | budget | planner | measured | ratio |")
    print("|---|---|---|---|---|---|", flush=True)
    rows: list[dict[str, Any]] = []

    def one(i: int) -> dict[str, Any]:
        point, (plan, planned) = points[i], plans[i]
        got = old[point.label] if args.reuse else measure_point(point, plan)
        row = dict(label=point.label, plan=str(plan), budget=point.budget, planner=planned, measured=got)
        budget = format_bytes(parse_memory(point.budget)) if point.budget else "-"
        ratio = got / planned
        flag = "" if LOWEST_RATIO <= ratio <= 1.0 else " **out**"
        # each row as soon as it is measured: a long run shows its progress and loses nothing
        print(
            f"| {point.label} | {plan} | {budget} | {format_bytes(planned)} | {format_bytes(got)} | {ratio:.3f}{flag} |",
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
    ratios = [r["measured"] / r["planner"] for r in done]
    bad = sum(not LOWEST_RATIO <= r <= 1.0 for r in ratios)
    print(
        f"\n{len(done)} points; ratio {min(ratios):.3f}-{max(ratios):.3f}; {bad} outside [{LOWEST_RATIO}, 1]"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
