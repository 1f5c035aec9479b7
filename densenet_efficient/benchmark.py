"""``densenet-efficient benchmark``: training-step memory and time per implementation, side by side.

Rows: torchvision naive, torchvision ``memory_efficient=True`` and each of our modes; columns:
peak training-step memory, median seconds per minibatch, both as ratios to torchvision naive,
and the planner's estimate for comparison. Every figure comes from a fresh subprocess
(:func:`densenet_efficient.memory.measure`): on CPU with the ``MEASURE.md`` protocol, on CUDA
with ``max_memory_allocated`` and CUDA-event timing. Speed runs are interleaved over rounds
(A B C A B C ...): seconds are the median of the per-round medians, and the time ratio is the
median of the per-round ratios to torchvision naive (paired within a round, so that a shared
machine's drifting speed cancels), with their range.

    densenet-efficient benchmark                                   # DenseNet-BC-100, batch 64, 32x32
    densenet-efficient benchmark --arch densenet121 --batch-size 8 --resolution 224 --markdown
    densenet-efficient benchmark --sweep depth --out docs/         # memory vs depth: PNG + CSV

Python::

    from densenet_efficient.benchmark import benchmark
    rows = benchmark("densenet_bc_100", batch_size=64, rounds=3)
"""

from __future__ import annotations

import csv
import json
import os
import platform
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .engine import MODES
from .memory import (
    IMPLEMENTATIONS,
    TORCHVISION,
    StepSpec,
    _format_table,
    describe,
    estimate_memory,
    measure,
    resolve_arch,
)
from .registry import ArchConfig, densenet_bc_config

__all__ = ["benchmark", "sweep", "to_markdown", "configure_parser", "run"]

_MB = 1 << 20


def _device(device: str | None) -> str:
    if device is None:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    return device


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


def benchmark(
    arch: str | ArchConfig = "densenet_bc_100",
    *,
    batch_size: int = 64,
    resolution: int | None = None,
    implementations: Sequence[str] = IMPLEMENTATIONS,
    rounds: int = 3,
    steps: int = 3,
    device: str | None = None,
    threads: int = 2,
    speed: bool = True,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Measure each implementation; one dict per row (MB are MiB, ratios to torchvision naive).

    Memory: one fresh process per implementation. Speed (``speed=True``): ``rounds`` rounds, each
    running every implementation in its own process (``steps`` timed steps after one warm-up).
    """
    config = resolve_arch(arch)
    resolution = resolution or (32 if config.small_inputs else 224)
    device = _device(device)
    impls = list(dict.fromkeys(implementations))
    for impl in impls:
        if impl not in IMPLEMENTATIONS:
            raise ValueError(
                f"unknown implementation {impl!r}; expected some of {', '.join(IMPLEMENTATIONS)}"
            )
    if rounds < 1 or steps < 1 or batch_size < 1:
        raise ValueError(f"rounds, steps and batch size must be >= 1, got {rounds}, {steps}, {batch_size}")

    def spec(impl: str, kind: str) -> StepSpec:
        return StepSpec(
            impl, config, batch_size, resolution, kind=kind, device=device, steps=steps, threads=threads
        )

    results: dict[str, dict[str, Any]] = {i: {"implementation": i} for i in impls}
    with _progress(len(impls) * (1 + (rounds if speed else 0)), describe(config), progress) as bar:
        for impl in impls:
            bar.set_postfix_str(f"memory {impl}")
            r = measure(spec(impl, "memory"))
            results[impl]["peak_mb"] = r["peak_bytes"] / _MB
            if "peak_total_bytes" in r:
                results[impl]["peak_total_mb"] = r["peak_total_bytes"] / _MB
            bar.update()
        per_round: dict[str, list[float]] = {i: [] for i in impls}
        for k in range(rounds if speed else 0):
            for impl in impls:  # interleaved: A B C A B C, so drifting load hits every row alike
                bar.set_postfix_str(f"speed {impl} round {k + 1}")
                per_round[impl].append(measure(spec(impl, "speed"))["seconds"])
                bar.update()
    for impl in impls:
        row = results[impl]
        est = estimate_memory(config, batch_size=batch_size, resolution=resolution, mode=impl, device=device)
        row["estimate_mb"] = est.peak / _MB
        if speed:
            row["seconds"] = statistics.median(per_round[impl])
            row["seconds_rounds"] = per_round[impl]
    base = results.get(TORCHVISION)
    for row in results.values():  # ratios only against a measurable torchvision row
        row["memory_ratio"] = row["peak_mb"] / base["peak_mb"] if base and base["peak_mb"] > 0 else None
        row["time_ratio"], row["time_ratio_range"] = None, None
        if base and speed:
            paired = [t / b for t, b in zip(row["seconds_rounds"], base["seconds_rounds"], strict=True)]
            row["time_ratio"] = statistics.median(paired)
            row["time_ratio_range"] = [min(paired), max(paired)]
    meta = {"arch": describe(config), "batch_size": batch_size, "resolution": resolution, "device": device}
    return [{**meta, **results[i]} for i in impls]


def machine_description(device: str) -> str:
    """The machine in words, as docs must name it."""
    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"{os.cpu_count()}-core CPU {platform.machine()}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def _cells(row: dict[str, Any]) -> list[str]:
    def ratio(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}x"

    secs, spread = row.get("seconds"), row.get("time_ratio_range")
    time_ratio = ratio(row["time_ratio"])
    if spread and spread[0] != spread[1]:
        time_ratio += f" ({spread[0]:.2f}-{spread[1]:.2f})"
    return [
        row["implementation"],
        f"{row['peak_mb']:.0f}",
        ratio(row["memory_ratio"]),
        "-" if secs is None else f"{secs:.3f}",
        time_ratio,
        f"{row['estimate_mb']:.0f}",
    ]


_HEADER = ["implementation", "peak MB", "memory vs tv", "s/batch", "time vs tv (range)", "planner MB"]


def to_markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(_HEADER) + " |", "|" + "---|" * len(_HEADER)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def sweep(
    kind: str,
    *,
    values: Sequence[int] | None = None,
    arch: str = "densenet121",
    batch_size: int = 16,
    resolution: int | None = None,
    growth_rate: int = 12,
    implementations: Sequence[str] = (TORCHVISION, *MODES),
    device: str | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Measured peak memory vs DenseNet-BC depth (``kind="depth"``) or vs batch (``kind="batch"``).

    One fresh process per point; the planner's estimate is recorded next to each measurement.
    """
    device = _device(device)
    if batch_size < 1 or (values is not None and (not values or min(values) < 1)):
        raise ValueError(f"batch size and sweep values must be >= 1, got batch {batch_size}, values {values}")
    if kind == "depth":
        values = values or (40, 64, 100, 136, 172)
        points = [(densenet_bc_config(d, growth_rate), batch_size, d) for d in values]
    elif kind == "batch":
        values = values or (1, 2, 4, 8, 16)
        points = [(resolve_arch(arch), b, b) for b in values]
    else:
        raise ValueError(f"sweep must be 'depth' or 'batch', got {kind!r}")
    rows = []
    with _progress(len(points) * len(implementations), f"sweep {kind}", progress) as bar:
        for config, batch, x in points:
            res = resolution or (32 if config.small_inputs else 224)
            for impl in implementations:
                bar.set_postfix_str(f"{kind}={x} {impl}")
                r = measure(StepSpec(impl, config, batch, res, device=device))
                est = estimate_memory(config, batch_size=batch, resolution=res, mode=impl, device=device)
                rows.append(
                    {
                        kind: x,
                        "implementation": impl,
                        "peak_mb": r["peak_bytes"] / _MB,
                        "estimate_mb": est.peak / _MB,
                    }
                )
                bar.update()
    return rows


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_sweep(rows: list[dict[str, Any]], kind: str, out_dir: Path, title: str) -> tuple[Path, Path]:
    """Write ``memory_vs_<kind>.csv`` and ``.png`` (matplotlib, Agg) into ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out_dir / f"memory_vs_{kind}.csv", out_dir / f"memory_vs_{kind}.png"

    def write_csv(p: Path) -> None:
        with open(p, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=[kind, "implementation", "peak_mb", "estimate_mb"])
            w.writeheader()
            w.writerows(rows)

    def write_png(p: Path) -> None:
        fig, ax = plt.subplots(figsize=(6, 4))
        for impl in dict.fromkeys(r["implementation"] for r in rows):
            pts = [r for r in rows if r["implementation"] == impl]
            line = ax.plot([r[kind] for r in pts], [r["peak_mb"] for r in pts], "o-", label=impl)[0]
            ax.plot([r[kind] for r in pts], [r["estimate_mb"] for r in pts], ":", color=line.get_color())
        ax.set_xlabel("depth" if kind == "depth" else "batch size")
        ax.set_ylabel("peak training-step memory (MB)")
        ax.set_title(title, fontsize=9)
        ax.legend(title="measured (dotted: planner)", fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(p, format="png", dpi=120)
        plt.close(fig)

    _write_atomic(csv_path, write_csv)
    _write_atomic(png_path, write_png)
    return csv_path, png_path


# -- CLI ------------------------------------------------------------------------------------------


def configure_parser(parser) -> None:
    """Arguments of ``densenet-efficient benchmark``."""
    parser.add_argument("--arch", default="densenet_bc_100", help="registry name or densenet_bc_<depth>")
    parser.add_argument("--depth", type=int, help="DenseNet-BC depth 6n+4 (overrides --arch)")
    parser.add_argument("--growth-rate", type=int, help="DenseNet-BC growth rate (default 12)")
    parser.add_argument("--batch-size", type=int, help="default 64 (CIFAR configs) or 8 (ImageNet)")
    parser.add_argument("--resolution", type=int, help="default 32 (CIFAR configs) or 224 (ImageNet)")
    parser.add_argument(
        "--modes", nargs="+", choices=IMPLEMENTATIONS, default=list(IMPLEMENTATIONS), help="rows to measure"
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved speed rounds (default 3)")
    parser.add_argument(
        "--steps", type=int, default=3, help="timed steps per round after a warm-up (default 3)"
    )
    parser.add_argument("--no-speed", action="store_true", help="measure memory only")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument(
        "--sweep", choices=("depth", "batch"), help="memory vs depth (DenseNet-BC) or vs batch"
    )
    parser.add_argument("--values", type=int, nargs="+", help="sweep points (depths or batch sizes)")
    parser.add_argument("--out", default=".", help="folder for the sweep's PNG and CSV (default .)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    """``densenet-efficient benchmark``."""
    device = _device(args.device)
    if args.sweep:
        batch = args.batch_size if args.batch_size is not None else (64 if args.sweep == "depth" else 16)
        arch = args.arch if args.arch != "densenet_bc_100" or args.sweep == "depth" else "densenet121"
        rows = sweep(
            args.sweep,
            values=args.values,
            arch=arch,
            batch_size=batch,
            resolution=args.resolution,
            growth_rate=args.growth_rate or 12,
            implementations=args.modes,
            device=device,
            progress=not args.quiet,
        )
        what = f"DenseNet-BC k={args.growth_rate or 12}, batch {batch}" if args.sweep == "depth" else arch
        title = f"{what}; {machine_description(device)}"
        csv_path, png_path = save_sweep(rows, args.sweep, Path(args.out), title)
        print(json.dumps(rows, indent=2) if args.json else f"wrote {csv_path} and {png_path}")
        return 0
    if args.depth is not None:
        config = densenet_bc_config(args.depth, args.growth_rate or 12)
    else:
        config = resolve_arch(args.arch, args.growth_rate)
    batch = args.batch_size if args.batch_size is not None else (64 if config.small_inputs else 8)
    rows = benchmark(
        config,
        batch_size=batch,
        resolution=args.resolution,
        implementations=args.modes,
        rounds=args.rounds,
        steps=args.steps,
        device=device,
        speed=not args.no_speed,
        progress=not args.quiet,
    )
    if args.json:
        print(json.dumps({"machine": machine_description(device), "rows": rows}, indent=2))
        return 0
    r0 = rows[0]
    print(
        f"{r0['arch']}, batch {r0['batch_size']}, {r0['resolution']}x{r0['resolution']}; {machine_description(device)}"
    )
    print(to_markdown(rows) if args.markdown else _format_table(_HEADER, [_cells(r) for r in rows]))
    return 0
