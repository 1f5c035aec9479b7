#!/usr/bin/env python
"""The planner against the measured whole training step, on a grid of configurations.

Every point runs in its own fresh process (``StepSpec(kind="whole_step")``, docs/planner.md), on
one thread unless it names more (and is planned with the same, since what ATen runs on oneDNN
depends on it): ``MALLOC_MMAP_THRESHOLD_=65536 MKL_DISABLE_FAST_MM=1``, baseline RSS before the
model exists, then model, batch, zeroed gradients, the optimizer and two steps; the figure is
the peak RSS over the baseline. A point is either a fixed setting (its
``estimate_memory(...).total`` must be within 5% of the measured step) or a budget: ``fit_memory`` picks the plan, which must then measure within [0.92, 1.00] of the
budget, and a budget at or above what the ``max_saving`` step measures must not be refused.

    python scripts/planner_grid.py                      # measure every point, print the table
    python scripts/planner_grid.py --json grid.json     # keep the measurements (rewritten per point)
    python scripts/planner_grid.py --reuse grid.json    # planner columns again, same measurements
    python scripts/planner_grid.py --only densenet121 --jobs 2

A measurement is reused when the point's label and the plan measured are unchanged. Exit status 1
when a point is outside its bounds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from densenet_efficient.models.config import resolve_arch
from densenet_efficient.models.memory_plan import MemoryPlan, resolve_memory_plan
from densenet_efficient.models.planner import (
    LOWEST_RATIO,
    MemoryBudgetError,
    estimate_memory,
    fit_memory,
    format_bytes,
    parse_memory,
)
from densenet_efficient.perf.benchmark import machine_description
from densenet_efficient.perf.measure import StepSpec, measure_series

#: The estimate's promise on a fixed setting: within this fraction of the measured step.
TOLERANCE = 0.05


@dataclass(frozen=True)
class Point:
    """One configuration: an architecture, a batch, an input size, autocast, the layout, the
    optimizer, and either a memory setting or a ``budget`` that ``fit_memory`` plans for."""

    arch: str
    batch: int
    size: int
    setting: Any = "efficient"
    amp: str | None = None
    channels_last: bool = False
    optimizer: str = "momentum"
    budget: str | None = None
    threads: int = 1

    @property
    def label(self) -> str:
        what = f"fit {self.budget}" if self.budget else _setting_label(self.setting)
        extras = [self.amp or "fp32"] + ["NHWC"] * self.channels_last + ["adam"] * (self.optimizer == "adam")
        extras += [f"{self.threads} threads"] * (self.threads != 1)
        return f"{self.arch} b{self.batch} {self.size}px {' '.join(extras)} {what}"

    def kwargs(self) -> dict[str, Any]:
        return dict(
            batch_size=self.batch, image_size=self.size, amp=self.amp, device="cpu",
            optimizer=self.optimizer, channels_last=self.channels_last,
        )  # fmt: skip


def _setting_label(setting: Any) -> str:
    if isinstance(setting, str):
        return setting
    if isinstance(setting, MemoryPlan):
        return "dial (plan column)"
    return "[" + ", ".join(str(s) for s in setting) + "]"


MIXED_121 = MemoryPlan(("efficient", (True, False) * 6, "max_saving", "efficient"), "max_saving")
ADAM, CL = "adam", True

#: DenseNet-BC 40-250 and densenet121/169/201/161; fp32 and bf16 autocast; NCHW and channels_last;
#: every mode, dials (naive blocks after engine blocks among them) and fit_memory's own plans;
#: batch 1-64; SGD with momentum and Adam.
GRID = (
    Point("densenet_bc_40", 64, 32, "naive"),
    Point("densenet_bc_40", 64, 32, "efficient"),
    Point("densenet_bc_40", 64, 32, "max_saving", optimizer=ADAM),
    Point("densenet_bc_40", 1, 32, "efficient"),
    Point("densenet_bc_100", 32, 32, "naive"),
    Point("densenet_bc_100", 32, 32, "efficient", channels_last=CL),
    Point("densenet_bc_100", 32, 32, "max_saving", amp="bf16"),
    Point("densenet_bc_100", 32, 32, "efficient", amp="bf16", optimizer=ADAM),
    Point("densenet_bc_100", 32, 32, (8, 16, 4)),
    Point("densenet_bc_100", 32, 32, ("max_saving", 6, "naive")),
    Point("densenet_bc_190", 16, 32, "efficient"),
    Point("densenet_bc_250", 8, 32, "max_saving"),
    Point("densenet_bc_190", 8, 32, "max_saving"),
    Point("densenet_bc_250", 4, 32, "max_saving"),
    Point("densenet_bc_250", 2, 32, "max_saving"),
    # the same two on torch's default two threads here, where oneDNN runs every convolution
    Point("densenet_bc_250", 4, 32, "max_saving", threads=2),
    Point("densenet_bc_250", 2, 32, "max_saving", threads=2),
    Point("densenet121", 8, 224, "naive"),
    Point("densenet121", 8, 224, "efficient"),
    Point("densenet121", 8, 224, "max_saving"),
    Point("densenet121", 8, 224, "efficient", amp="bf16"),
    Point("densenet121", 4, 224, "efficient", channels_last=CL),
    Point("densenet121", 8, 224, "max_saving", optimizer=ADAM),
    Point("densenet121", 4, 128, ("max_saving", 6, True, "naive")),
    Point("densenet121", 8, 96, MIXED_121),
    Point("densenet169", 4, 224, "max_saving"),
    Point("densenet169", 4, 224, "efficient", amp="bf16"),
    Point("densenet201", 2, 224, "efficient"),
    Point("densenet201", 4, 224, "max_saving", optimizer=ADAM),
    Point("densenet161", 2, 224, "efficient"),
    Point("densenet161", 2, 224, "naive"),
    Point("densenet121", 8, 224, budget="380MiB"),
    Point("densenet121", 8, 224, budget="410MiB"),
    Point("densenet121", 8, 224, amp="bf16", budget="320MiB"),
    Point("densenet169", 4, 224, budget="370MiB"),
    Point("densenet_bc_190", 16, 32, budget="340MiB"),
    Point("densenet_bc_100", 64, 32, budget="600MiB"),
    Point("densenet_bc_100", 64, 32, optimizer=ADAM, budget="650MiB"),
    Point("densenet121", 4, 224, channels_last=CL, budget="285MiB"),
    Point("densenet_bc_250", 4, 32, budget="230MiB", threads=2),
    Point("densenet121", 8, 224, budget="420MiB", threads=2),
    Point("densenet169", 4, 224, budget="385MiB", threads=2),
)


#: The planner reads this process's thread count (what ATen runs on oneDNN depends on it,
#: models/planner/allocator.py): each point is planned with its own, one point at a time.
_THREADS = threading.Lock()


def plan_for(point: Point) -> tuple[MemoryPlan | None, str, int]:
    """The plan a point runs (None: its budget was refused), what the planner said, and its
    estimate in bytes (``fit_memory``'s ``estimated_peak`` for a budget; 0 when refused)."""
    with _THREADS:
        before = torch.get_num_threads()
        torch.set_num_threads(point.threads)
        try:
            return _plan_for(point)
        finally:
            torch.set_num_threads(before)


def _plan_for(point: Point) -> tuple[MemoryPlan | None, str, int]:
    config = resolve_arch(point.arch)
    if point.budget is not None:
        try:
            plan = fit_memory(config, point.budget, **point.kwargs())
        except MemoryBudgetError as err:
            return None, str(err), 0
        return plan, format_bytes(plan.estimated_peak), plan.estimated_peak or 0
    setting = point.setting if isinstance(point.setting, (str, MemoryPlan)) else list(point.setting)
    plan = resolve_memory_plan(setting, config)
    estimate = estimate_memory(config, mode=plan, **point.kwargs()).total
    return plan, format_bytes(estimate), estimate


def measure_point(point: Point, plan: MemoryPlan) -> int:
    """The point's whole step, measured in a fresh process."""
    spec = StepSpec(
        "efficient", resolve_arch(point.arch), point.batch, point.size, kind="whole_step", amp=point.amp,
        memory_plan=plan.to_json(), channels_last=point.channels_last, optimizer=point.optimizer,
        threads=point.threads,
    )  # fmt: skip
    return measure_series([spec])[0]["peak_bytes"]


def _floor_plan(point: Point) -> MemoryPlan:
    return MemoryPlan.uniform("max_saving", len(resolve_arch(point.arch).block_config))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="run the points whose label contains this text")
    parser.add_argument("--jobs", type=int, default=1, help="fresh processes at a time (default 1)")
    parser.add_argument("--json", help="write the measurements to this file (rewritten after each point)")
    parser.add_argument("--reuse", help="take measurements of unchanged points from an earlier --json file")
    parser.add_argument("--measure-fixed", action="store_true", help="only measure the fixed settings")
    args = parser.parse_args(argv)
    points = [p for p in GRID if not args.only or args.only in p.label]
    if args.measure_fixed:
        points = [p for p in points if p.budget is None]
    old: dict[str, int] = {}
    if args.reuse:
        with open(args.reuse) as f:
            old = {r["key"]: r["measured"] for r in json.load(f)["rows"]}
    machine = machine_description("cpu")
    print(f"Planner vs measured whole step ({machine})\n", flush=True)
    print("| config | plan | planner | measured | measured / planner | budget check |")
    print("|---|---|---|---|---|---|", flush=True)
    rows: list[dict[str, Any]] = []
    printing = threading.Lock()

    def row(line: str) -> None:
        """One table row, whole: two jobs' rows never run into one line."""
        with printing:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    def remember(key: str, measured: int) -> int:
        rows.append({"key": key, "measured": measured})
        if args.json:
            with open(args.json + ".tmp", "w") as f:
                json.dump(
                    {"machine": machine, "rows": rows + [{"key": k, "measured": v} for k, v in old.items()]},
                    f,
                    indent=1,
                )
            os.replace(args.json + ".tmp", args.json)
        return measured

    def measured(point: Point, plan: MemoryPlan) -> int:
        key = f"{point.label} | {plan}"
        return old[key] if key in old else remember(key, measure_point(point, plan))

    def one(point: Point) -> bool:
        t0 = time.perf_counter()
        if args.measure_fixed:
            plan = resolve_memory_plan(
                point.setting if isinstance(point.setting, (str, MemoryPlan)) else list(point.setting),
                resolve_arch(point.arch),
            )
            got = measured(point, plan)
            row(f"| {point.label} | {plan} | - | {format_bytes(got)} | - | {time.perf_counter() - t0:.0f} s |")
            return True
        plan, said, est = plan_for(point)
        if point.budget is not None:
            budget = parse_memory(point.budget)
            floor = measured(point, _floor_plan(point))
            if plan is None:  # refused: fine only when not even max_saving measured within it
                ok = floor > budget
                check = f"refused; max_saving measures {format_bytes(floor)}" + ("" if ok else " **out**")
                row(f"| {point.label} | refused | {said[:60]} | - | - | {check} |")
                return ok
            got = measured(point, plan)
            ratio = got / budget
            ok = LOWEST_RATIO <= ratio <= 1.0
            row(
                f"| {point.label} | {plan} | {said} | {format_bytes(got)} | {got / est:.3f} "
                f"| {ratio:.3f} of {point.budget}{'' if ok else ' **out**'} |"
            )
            return ok and abs(got / est - 1) <= TOLERANCE
        got = measured(point, plan)
        ok = abs(got / est - 1) <= TOLERANCE
        row(f"| {point.label} | {plan} | {said} | {format_bytes(got)} | {got / est:.3f}{'' if ok else ' **out**'} | |")
        return ok

    with ThreadPoolExecutor(args.jobs) as pool:
        done = list(pool.map(one, points))
    bad = done.count(False)
    print(f"\n{len(done)} points; {bad} outside their bounds")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
