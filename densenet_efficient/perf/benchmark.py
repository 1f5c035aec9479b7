"""Training-step memory and time per implementation, side by side (``densenet-efficient benchmark``).

Rows: torchvision naive, torchvision ``memory_efficient=True`` and each of our modes; columns:
peak training-step memory, median seconds per minibatch, both as ratios to torchvision naive,
the planner's estimate for comparison, and the kernel-launching ops of a training step (what
bounds a GPU step at small batches; docs/measurement.md). Every figure comes from a fresh subprocess
(:func:`.measure.measure`): on CPU with the protocol of docs/measurement.md, on CUDA
with ``max_memory_allocated`` and CUDA-event timing. Speed runs are interleaved over rounds
(A B C A B C ...): seconds are the median of the per-round medians, and the time ratio is the
median of the per-round ratios to torchvision naive (paired within a round, so that a shared
machine's drifting speed cancels), with their range.

The compiled peer adds rows: ``torch.compile`` on torchvision's naive DenseNet with
``torch._functorch.config.activation_memory_budget`` set (``compiled_budgets``: activation
budgets, fractions in (0, 1] of what the compiler's default partitioner saves, not bytes; label
``torchvision compiled (budget 0.3)``, budget 1.0 being the compiler's default partitioner), and
any of our modes compiled (``compile_ours``; label ``efficient compiled``: our blocks,
transitions, stem and norm5 are custom ops inside one compiled graph, ``models/engine/ops.py``). Compiled rows are
measured warm (docs/measurement.md), have no planner estimate, and a row whose compilation fails
keeps its one-line ``error`` while every other row is still measured.

    densenet-efficient benchmark                                   # DenseNet-BC-100, batch 64, 32x32
    densenet-efficient benchmark --arch densenet121 --batch-size 8 --image-size 224 --markdown
    densenet-efficient benchmark --sweep depth --out docs/         # memory vs depth: PNG + CSV

Python::

    from densenet_efficient.perf.benchmark import benchmark
    rows = benchmark("densenet_bc_100", batch_size=64, rounds=3)
    rows = benchmark("densenet_bc_100", compiled_budgets=[1.0, 0.3], compile_ours=["efficient"])
"""

from __future__ import annotations

import csv
import io
import os
import platform
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UsageError, check_int, first_line, require_extra
from ..io.atomic import atomic_write
from ..models.config import ArchConfig, densenet_bc_config, resolve_arch
from ..models.engine import MODES
from ..models.planner import check_image_size, estimate_memory
from .measure import (
    IMPLEMENTATIONS,
    TORCHVISION,
    StepSpec,
    build_implementation,
    check_activation_budget,
    measure,
    paired_ratio,
)

__all__ = [
    "DEFAULT_COMPILED_BUDGETS",
    "HEADER",
    "benchmark",
    "compiled_label",
    "error_notes",
    "machine_description",
    "resolve_device",
    "row_cells",
    "save_sweep",
    "sweep",
    "to_markdown",
]

_MB = 1 << 20

#: What the command line's ``--compiled-budgets`` given with no values measures: the activation budgets (fractions, see
#: :func:`.measure.check_activation_budget`) of the compiled torchvision rows.
DEFAULT_COMPILED_BUDGETS = (1.0, 0.5, 0.3, 0.1)


@dataclass(frozen=True)
class _Row:
    """One row of the table: what is measured and how it is labelled."""

    label: str
    impl: str
    compile: bool = False
    activation_budget: float | None = None


def compiled_label(impl: str, activation_budget: float | None = None) -> str:
    """``"torchvision compiled (budget 0.3)"``, ``"efficient compiled"``: a compiled row's label
    (the label's "budget" is the activation budget, a fraction: the table's word for it)."""
    return f"{impl} compiled" + ("" if activation_budget is None else f" (budget {float(activation_budget)})")


def resolve_device(device: str | None) -> str:
    """``"cpu"`` or ``"cuda"`` (default: cuda when available); CUDA asked for must be there."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise UsageError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("device 'cuda' asked for, but CUDA is not available here; use --device cpu")
    return device


def _check_counts(**counts: int) -> None:
    """Refuse counts below 1 (and non-integers) by name, before any process is started."""
    for name, value in counts.items():
        check_int(value, name.replace("_", " "))


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


def benchmark(
    arch: str | ArchConfig = "densenet_bc_100",
    *,
    batch_size: int = 64,
    image_size: int | None = None,
    implementations: Sequence[str] = IMPLEMENTATIONS,
    rounds: int = 3,
    steps: int = 3,
    device: str | None = None,
    threads: int = 2,
    speed: bool = True,
    progress: bool = True,
    compiled_budgets: Sequence[float] = (),
    compile_ours: Sequence[str] = (),
    ops: bool = True,
) -> list[dict[str, Any]]:
    """Measure each implementation; one dict per row (MB are MiB, ratios to torchvision naive).

    ``ops``: count each eager row's kernel-launching ATen ops per training step
    (:mod:`.opcount`; the ``ops_per_step`` column, views excluded), in this process at batch 2:
    the count does not depend on the batch or image size.

    Memory: one fresh process per implementation. Speed (``speed=True``): ``rounds`` rounds, each
    running every implementation in its own process (``steps`` timed steps after one warm-up).

    ``compiled_budgets`` adds one row per activation budget (``activation_memory_budget``, a
    fraction in (0, 1], named after the command line's ``--compiled-budgets``): torchvision's
    naive DenseNet under ``torch.compile`` (``"torchvision compiled (budget 0.3)"``);
    ``compile_ours`` adds our modes under ``torch.compile`` (``"efficient compiled"``). Each
    compiled row recompiles in every fresh process (inductor's on-disk cache shortens the later
    ones). A compiled row that fails records ``"error"`` (one line) instead of figures.
    """
    config = resolve_arch(arch)
    image_size = check_image_size(config, image_size)
    device = resolve_device(device)
    impls = list(dict.fromkeys(implementations))
    for impl in impls:
        if impl not in IMPLEMENTATIONS:
            raise UsageError(
                f"unknown implementation {impl!r}; expected some of {', '.join(IMPLEMENTATIONS)}"
            )
    if isinstance(compiled_budgets, str | bytes) or isinstance(compile_ours, str | bytes):
        raise UsageError("compiled_budgets and compile_ours must be sequences, not a single string")
    activation_budgets = list(dict.fromkeys(check_activation_budget(b) for b in compiled_budgets))
    ours = list(dict.fromkeys(compile_ours))
    for mode in ours:
        if mode not in MODES:
            raise UsageError(f"compile_ours: unknown mode {mode!r}; expected some of {', '.join(MODES)}")
    _check_counts(rounds=rounds, steps=steps, batch_size=batch_size, threads=threads)

    plan = [_Row(i, i) for i in impls]
    plan += [_Row(compiled_label(TORCHVISION, b), TORCHVISION, True, b) for b in activation_budgets]
    plan += [_Row(compiled_label(m), m, True) for m in ours]
    if progress:  # what the user will wait for, said before the first process starts
        print(_announcement(plan, rounds if speed else 0), file=sys.stderr)

    def spec(row: _Row, kind: str) -> StepSpec:
        return StepSpec(
            row.impl,
            config,
            batch_size,
            image_size,
            kind=kind,
            device=device,
            steps=steps,
            threads=threads,
            compile=row.compile,
            activation_budget=row.activation_budget,
        )

    def attempt(row: _Row, kind: str) -> dict[str, Any] | None:
        """The measurement; a compiled row's failure is recorded on the row, anything else raises."""
        try:
            return measure(spec(row, kind))
        except RuntimeError as err:
            if not row.compile:
                raise
            results[row.label]["error"] = first_line(err)
            return None

    results: dict[str, dict[str, Any]] = {r.label: {"implementation": r.label} for r in plan}
    with _progress(len(plan) * (1 + (rounds if speed else 0)), config.name, progress) as bar:
        for row in plan:
            bar.set_postfix_str(f"memory {row.label}")
            r = attempt(row, "memory")
            res = results[row.label]
            res["peak_mb"] = None if r is None else r["peak_bytes"] / _MB
            if r is not None and "peak_total_bytes" in r:
                res["peak_total_mb"] = r["peak_total_bytes"] / _MB
            bar.update()
        per_round: dict[str, list[float]] = {r.label: [] for r in plan}
        for k in range(rounds if speed else 0):
            for row in plan:  # interleaved: A B C A B C, so drifting load hits every row alike
                bar.set_postfix_str(f"speed {row.label} round {k + 1}")
                if "error" not in results[row.label]:  # a failed compilation is not retried
                    r = attempt(row, "speed")
                    if r is not None:
                        per_round[row.label].append(r["seconds"])
                bar.update()
    if ops:
        counts = _count_ops(config, [r.impl for r in plan if not r.compile], device)
    for row in plan:
        res = results[row.label]
        res["ops_per_step"] = counts[row.impl] if ops and not row.compile else None
        res["estimate_mb"] = None
        if not row.compile:  # the planner models eager execution only
            est = estimate_memory(
                config, batch_size=batch_size, image_size=image_size, mode=row.impl, device=device
            )
            res["estimate_mb"] = est.peak / _MB
        if speed:
            ok = "error" not in res
            res["seconds"] = statistics.median(per_round[row.label]) if ok else None
            res["seconds_rounds"] = per_round[row.label] if ok else []
    base = results.get(TORCHVISION)
    for res in results.values():  # ratios only against a measurable torchvision row
        measured = "error" not in res
        res["memory_ratio"] = (
            res["peak_mb"] / base["peak_mb"] if measured and base and base["peak_mb"] > 0 else None
        )
        res["time_ratio"], res["time_ratio_range"] = None, None
        if base and speed and measured:
            res["time_ratio"], *low_high = paired_ratio(res["seconds_rounds"], base["seconds_rounds"])
            res["time_ratio_range"] = low_high
    meta = {"arch": config.name, "batch_size": batch_size, "image_size": image_size, "device": device}
    return [{**meta, **results[r.label]} for r in plan]


def _announcement(plan: list[_Row], rounds: int) -> str:
    """One line: how many rows and fresh processes the table takes, and which rows are slow."""
    processes = len(plan) * (1 + rounds)
    line = f"benchmark: {len(plan)} rows, {processes} fresh processes (memory"
    line += f", then {rounds} speed round{'s' * (rounds > 1)})" if rounds else " only)"
    line += "; the progress bar estimates the time left"
    compiled = sum(r.compile for r in plan)
    if compiled:  # inductor compiles anew in every process; the eager rows take seconds
        line += f"; the {compiled} compiled rows take minutes per process on a CPU"
    return line


def _count_ops(config: ArchConfig, impls: list[str], device: str) -> dict[str, int]:
    """Kernel-launching ops of one training step per implementation (deterministic, counted once)."""
    import torch

    from .opcount import count_step_ops

    size = config.min_input_size()
    x = torch.randn(2, 3, size, size, device=device)
    counts = {}
    for impl in dict.fromkeys(impls):
        model = build_implementation(impl, config).to(device)
        counts[impl] = count_step_ops(model, x).total
    return counts


def machine_description(device: str) -> str:
    """The machine in words, as docs must name it, and which engine ran (native C++ or Python)."""
    import torch

    from ..models.engine import engine_status

    engine = f"{engine_status().engine} engine"
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__}, {engine})"
    threads = torch.get_num_threads()
    return f"{os.cpu_count()}-core CPU {platform.machine()}, {threads} threads (torch {torch.__version__}, {engine})"


def row_cells(row: dict[str, Any]) -> list[str]:
    """The row's cells under :data:`HEADER`; what was not measured (or failed) shows as ``-``."""

    def ratio(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}x"

    def mb(x: float | None) -> str:
        return "-" if x is None else f"{x:.0f}"

    secs, spread = row.get("seconds"), row.get("time_ratio_range")
    time_ratio = ratio(row["time_ratio"])
    if spread and spread[0] != spread[1]:
        time_ratio += f" ({spread[0]:.2f}-{spread[1]:.2f})"
    return [
        row["implementation"],
        mb(row["peak_mb"]),
        ratio(row["memory_ratio"]),
        "-" if secs is None else f"{secs:.3f}",
        time_ratio,
        mb(row["estimate_mb"]),
        "-" if row.get("ops_per_step") is None else str(row["ops_per_step"]),
    ]


def error_notes(rows: list[dict[str, Any]]) -> list[str]:
    """One line per row that failed (a compiled row whose compilation failed), for under the table."""
    return [f"{r['implementation']}: {r['error']}" for r in rows if r.get("error")]


HEADER = ["implementation", "peak MB", "memory vs tv", "s/batch", "time vs tv (range)", "planner MB", "ops/step"]


def to_markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row_cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def sweep(
    kind: str,
    *,
    values: Sequence[int] | None = None,
    arch: str = "densenet121",
    batch_size: int = 16,
    image_size: int | None = None,
    growth_rate: int = 12,
    implementations: Sequence[str] = (TORCHVISION, *MODES),
    device: str | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Measured peak memory vs DenseNet-BC depth (``kind="depth"``) or vs batch (``kind="batch"``).

    One fresh process per point; the planner's estimate is recorded next to each measurement.
    """
    device = resolve_device(device)
    if values is not None and not values:
        raise UsageError("sweep values must be a non-empty list (or None for the defaults)")
    _check_counts(batch_size=batch_size, **{f"sweep value {i + 1}": v for i, v in enumerate(values or ())})
    if kind == "depth":
        values = (40, 64, 100, 136, 172) if values is None else values
        points = [(densenet_bc_config(d, growth_rate), batch_size, d) for d in values]
    elif kind == "batch":
        values = (1, 2, 4, 8, 16) if values is None else values
        points = [(resolve_arch(arch), b, b) for b in values]
    else:
        raise UsageError(f"sweep must be 'depth' or 'batch', got {kind!r}")
    for config, _, _ in points:  # every point checked before the first is measured
        check_image_size(config, image_size)
    rows = []
    with _progress(len(points) * len(implementations), f"sweep {kind}", progress) as bar:
        for config, batch, x in points:
            res = check_image_size(config, image_size)
            for impl in implementations:
                bar.set_postfix_str(f"{kind}={x} {impl}")
                r = measure(StepSpec(impl, config, batch, res, device=device))
                est = estimate_memory(config, batch_size=batch, image_size=res, mode=impl, device=device)
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


def save_sweep(rows: list[dict[str, Any]], kind: str, out_dir: Path, title: str) -> tuple[Path, Path]:
    """Write ``memory_vs_<kind>.csv`` and ``.png`` (matplotlib, Agg) into ``out_dir``."""
    require_extra("plot", "save_sweep (its PNG)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out_dir / f"memory_vs_{kind}.csv", out_dir / f"memory_vs_{kind}.png"

    text = io.StringIO()
    writer = csv.DictWriter(
        text, fieldnames=[kind, "implementation", "peak_mb", "estimate_mb"], lineterminator="\n"
    )
    writer.writeheader()
    writer.writerows(rows)

    def write_png(f) -> None:
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
        fig.savefig(f, format="png", dpi=120)
        plt.close(fig)

    atomic_write(csv_path, text.getvalue().encode())
    atomic_write(png_path, write_png)
    return csv_path, png_path
