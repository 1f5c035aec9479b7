#!/usr/bin/env python
"""Memory/time curves side by side: our dial, torch.compile's activation-memory budget, torchvision.

Every point is one implementation measured with the protocol of docs/measurement.md, in fresh
processes: memory of a warm step (the compiled peer needs its compiling step first, so every row
is measured warm alike), time as the median of interleaved rounds (each round runs every point
once), both as ratios to torchvision naive. Points:

* torchvision naive and ``memory_efficient=True``; torchvision in ``channels_last``;
* ``torch.compile(torchvision)`` with ``activation_memory_budget`` 1.0, 0.5, 0.3, 0.1, 0.05;
* ours: ``"efficient"``, ``"max_saving"``, the plans :meth:`DenseNet.fit_memory` picks for budgets
  between them, the same in ``channels_last``, and ``"efficient"`` under ``torch.compile``.

Writes ``pareto_<arch>.csv`` and ``.png`` into ``--out`` and prints a Markdown table:

    python scripts/pareto.py --arch densenet121 --batch-size 8 --out docs/   # ~30 min on 2 cores
    python scripts/pareto.py --arch densenet_bc_100 --batch-size 64 --out docs/

It imports the installed package: run it from a checkout after
``pip install -e .`` (or with ``PYTHONPATH=.``).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from densenet_efficient.cli import run_script
from densenet_efficient.errors import require_extra
from densenet_efficient.io.atomic import atomic_write
from densenet_efficient.models.config import resolve_arch
from densenet_efficient.models.planner import estimate_memory, fit_memory
from densenet_efficient.perf.benchmark import machine_description
from densenet_efficient.perf.measure import StepSpec, measure, paired_ratio

BUDGETS = (1.0, 0.5, 0.3, 0.1, 0.05)
#: where the fitted plans sit between the floor ("max_saving") and "efficient" (estimated totals)
DIAL_FRACTIONS = (0.25, 0.5, 0.75)


def points(arch: str, batch: int, res: int, quick: bool) -> list[tuple[str, str, StepSpec]]:
    """(series, label, spec) of every point."""
    config = resolve_arch(arch)

    def spec(impl: str, **kw: Any) -> StepSpec:
        return StepSpec(impl, config, batch, res, warmup=True, **kw)

    out = [
        ("torchvision", "torchvision naive", spec("torchvision")),
        ("torchvision", "torchvision memory_efficient=True", spec("torchvision_efficient")),
        ("torchvision", "torchvision channels_last", spec("torchvision", channels_last=True)),
    ]
    for b in BUDGETS[2:3] if quick else BUDGETS:
        out.append(
            (
                "compiled",
                f"torchvision compiled (budget {b})",
                spec("torchvision", compile=True, activation_budget=b),
            )
        )
    low, high = (
        estimate_memory(config, batch_size=batch, image_size=res, mode=m, device="cpu").total
        for m in ("max_saving", "efficient")
    )
    plans = [("efficient", None), ("max_saving", None)]
    for f in DIAL_FRACTIONS[1:2] if quick else DIAL_FRACTIONS:
        plan = fit_memory(config, int(low + f * (high - low)), batch_size=batch, image_size=res, device="cpu")
        plans.append((f"fit {int(f * 100)}%: {plan}", plan.to_json()))
    for cl in (False, True):
        for label, plan in plans:
            name = label + (" channels_last" if cl else "")
            out.append(
                (
                    "ours channels_last" if cl else "ours",
                    name,
                    spec("efficient" if plan else label, memory_plan=plan, channels_last=cl),
                )
            )
    out.append(("ours compiled", "efficient compiled", spec("efficient", compile=True)))
    return out


def run(arch: str, batch: int, res: int, rounds: int, steps: int, quick: bool) -> list[dict[str, Any]]:
    pts = points(arch, batch, res, quick)
    rows = []
    for series, label, spec in pts:
        try:
            peak = measure(spec)["peak_bytes"]
        except RuntimeError as err:
            peak, label = None, f"{label} ({str(err)[:80]})"
        rows.append(
            {
                "series": series,
                "label": label,
                "peak_mb": None if peak is None else peak / 2**20,
                "spec": spec,
            }
        )
        print(f"memory {label}: {rows[-1]['peak_mb']}", file=sys.stderr, flush=True)
    for r in range(rounds):
        for row in rows:
            if row["peak_mb"] is None:
                continue
            t = measure(replace(row["spec"], kind="speed", steps=steps, warmup=False))["seconds"]
            row.setdefault("seconds_rounds", []).append(t)
            print(f"round {r + 1} {row['label']}: {t:.3f}s", file=sys.stderr, flush=True)
    base = rows[0]
    for row in rows:
        if row["peak_mb"] is None:
            row.update(memory_ratio=None, time_ratio=None)
            continue
        row["memory_ratio"] = row["peak_mb"] / base["peak_mb"]
        row["time_ratio"], *low_high = paired_ratio(row["seconds_rounds"], base["seconds_rounds"])
        row["time_range"] = tuple(low_high)
        row["seconds"] = statistics.median(row["seconds_rounds"])
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| point | peak MB | memory vs tv | s/step | time vs tv (range) |", "|---|---|---|---|---|"]
    for r in rows:
        if r["peak_mb"] is None:
            lines.append(f"| {r['label']} | - | - | - | - |")
            continue
        lo, hi = r["time_range"]
        lines.append(
            f"| {r['label']} | {r['peak_mb']:.0f} | {r['memory_ratio']:.3f}x | {r['seconds']:.3f} "
            f"| {r['time_ratio']:.3f}x ({lo:.2f}-{hi:.2f}) |"
        )
    return "\n".join(lines)


def save(rows: list[dict[str, Any]], out: Path, arch: str, title: str) -> None:
    require_extra("plot", "scripts/pareto.py (its PNG)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    text = io.StringIO()
    w = csv.writer(text, lineterminator="\n")
    w.writerow(["series", "point", "peak_mb", "memory_ratio", "seconds", "time_ratio"])
    for r in rows:
        w.writerow(
            [
                r["series"],
                r["label"],
                r["peak_mb"],
                r.get("memory_ratio"),
                r.get("seconds"),
                r.get("time_ratio"),
            ]
        )
    atomic_write(out / f"pareto_{arch}.csv", text.getvalue().encode())

    def draw(f) -> None:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        styles = {
            "torchvision": "s",
            "compiled": "o-",
            "ours": "^-",
            "ours channels_last": "v-",
            "ours compiled": "D",
        }
        for series, style in styles.items():
            pts = sorted(
                (r for r in rows if r["series"] == series and r.get("memory_ratio")),
                key=lambda r: r["memory_ratio"],
            )
            if series == "torchvision":
                for r in pts:
                    ax.plot(r["memory_ratio"], r["time_ratio"], "s", label=r["label"])
                continue
            if pts:
                ax.plot([r["memory_ratio"] for r in pts], [r["time_ratio"] for r in pts], style, label=series)
        ax.set_xlabel("peak training-step memory / torchvision naive")
        ax.set_ylabel("time per step / torchvision naive")
        ax.set_title(title, fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(f, format="png", dpi=120)
        plt.close(fig)

    atomic_write(out / f"pareto_{arch}.png", draw)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="densenet121")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--image-size", type=int)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="one budget, one dial point (a smoke test)")
    p.add_argument("--out", default="docs")
    args = p.parse_args()
    require_extra("plot", "scripts/pareto.py (its PNG)")  # before the measurements, not after
    config = resolve_arch(args.arch)
    res = args.image_size or config.default_resolution
    rows = run(args.arch, args.batch_size, res, args.rounds, args.steps, args.quick)
    title = (
        f"{args.arch}, batch {args.batch_size}, {res}x{res}, fp32 training step; {machine_description('cpu')}"
    )
    save(rows, Path(args.out), args.arch, title)
    print(f"### {title}\n")
    print(markdown(rows))
    print(json.dumps([{k: v for k, v in r.items() if k != "spec"} for r in rows]))


if __name__ == "__main__":
    sys.exit(run_script("scripts/pareto.py", main))
