#!/usr/bin/env python
"""GPU readiness in one run: correctness, the benchmark table, bf16 at scale, planner vs measurement.

Writes docs/gpu_check.md (atomically) and prints the same Markdown. Sections:

(a) correctness: each of our modes (and every entry of :data:`EXTRA_SETTINGS`) against the naive
    model with identical weights, one training-mode forward/backward: float64 outputs and
    gradients within 1e-10 relative, fp32 outputs within 1e-4, bf16 autocast outputs within 2e-2.
(b) the benchmark table (CUDA): torchvision, torchvision_efficient, our modes, torch.compile of
    torchvision at activation_memory_budget 1.0/0.5/0.3/0.1 and our efficient mode compiled.
(c) densenet121, batch 256, 224x224, bf16 autocast, channels_last: peak memory and img/s.
(d) the planner's estimate against the CUDA measurement.
(g) graphs, in one process and under 4 minutes plus compile time: our efficient step compiled
    (``fullgraph=True``; on CUDA ``mode="reduce-overhead"``: CUDA graphs) against naive eager and
    ``torch.compile(torchvision)`` (default mode; ``activation_memory_budget`` 0.3) at fp32 batch 64
    (DenseNet-BC-100, densenet121): step time, peak memory, compile seconds, against the targets.
(s) speed, in one process and under 4 minutes: step time (CUDA events, median of interleaved rounds
    after warm-up), peak memory and ops/step for torchvision naive, torchvision
    ``memory_efficient=True`` and our modes at fp32 batch 64 (DenseNet-BC-100, densenet121) and
    densenet121 bf16 batch 256 channels_last (img/s), against the targets printed with it.

Each section is wrapped: an exception is reported in its place and the other sections still run.
The compiled rows of (b) run last, while ``--time-budget`` lasts (each compiles anew).

    bash scripts/gpu_check.sh                                    # on a CUDA machine, ~8 minutes
    python scripts/gpu_check.py --sections s                     # the speed section alone, < 4 minutes
    python scripts/gpu_check.py --sections g                     # captured steps vs naive and the compiler
    python scripts/gpu_check.py --quick --device cpu --out /tmp/gpu_check.md   # plumbing on CPU

Run it after ``pip install -e .`` or with ``PYTHONPATH=.`` (gpu_check.sh sets it).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import operator
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from densenet_efficient.io.atomic import atomic_write
from densenet_efficient.models.config import ArchConfig, densenet_bc_config, get_config
from densenet_efficient.models.engine import MODES, engine_status
from densenet_efficient.models.memory_plan import MemoryPlan
from densenet_efficient.perf.benchmark import DEFAULT_COMPILED_BUDGETS, benchmark
from densenet_efficient.perf.measure import time_step

#: More ``memory_efficient=`` settings for (a), checked like the modes: (label, config -> setting),
#: the memory dial's per-block and per-layer settings.
EXTRA_SETTINGS: list[tuple[str, Callable[[ArchConfig], Any]]] = [
    (
        "per block: naive, keep last half, max_saving...",
        lambda cfg: ["naive", cfg.block_config[1] // 2] + ["max_saving"] * (len(cfg.block_config) - 2),
    ),
    (
        "per layer: every other layer keeps, max_saving stem",
        lambda cfg: MemoryPlan(
            tuple(tuple(i % 2 == 0 for i in range(n)) for n in cfg.block_config), "max_saving"
        ),
    ),
]

#: (a): precision -> (parameter/input dtype, autocast dtype, relative tolerance, gradients checked)
PRECISIONS = {
    "float64": (torch.float64, None, 1e-10, True),
    "fp32": (torch.float32, None, 1e-4, False),
    "bf16 autocast": (torch.float32, torch.bfloat16, 2e-2, False),
}
MB, GB = 1 << 20, 1 << 30


# --- (a) correctness ------------------------------------------------------------------------------


def correctness_configs(quick: bool) -> list[tuple[str, ArchConfig, int, int]]:
    """(name, config, resolution, batch): a small DenseNet-BC and a small ImageNet-stem DenseNet."""
    imagenet = ArchConfig(growth_rate=8, block_config=(2, 3, 4, 2), num_init_features=16, num_classes=10)
    if quick:
        tiny = ArchConfig(growth_rate=4, block_config=(1, 2, 1, 1), num_init_features=8, num_classes=10)
        return [
            ("DenseNet-BC-10 (k=12)", densenet_bc_config(10), 16, 2),
            ("ImageNet stem, tiny", tiny, 32, 2),
        ]
    return [
        ("DenseNet-BC-40 (k=12)", densenet_bc_config(40), 32, 8),
        ("ImageNet stem, k=8, blocks (2,3,4,2)", imagenet, 64, 8),
    ]


def _rel(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-300) -> float:
    """max |a - b| / max(max |b|, floor), in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(floor))


def _grad_rel(grads: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    """The largest per-tensor relative error, each tensor's scale floored at 1e-3 of the largest
    gradient: a gradient that cancels to nearly zero (``norm0.weight``, which the next batch-norm
    makes almost scale-invariant, is ~1e-4 of the others) is rounding noise, not a signal."""
    floor = 1e-3 * max(float(g.detach().abs().max()) for g in ref.values())
    return max(_rel(grads[k], ref[k], floor) for k in ref)


def _forward_backward(
    model: torch.nn.Module, x: torch.Tensor, amp
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x = x.clone().requires_grad_(True)
    with torch.autocast(x.device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
        out = model(x)
    out.float().square().mean().backward()  # every output matters, not only the arg-max
    grads = {n: p.grad for n, p in model.named_parameters()}
    grads["(input)"] = x.grad
    return out.detach(), grads


def _build(setting: Any, config: ArchConfig) -> torch.nn.Module:
    if setting == "torchvision":
        from densenet_efficient.models.reference import torchvision_densenet

        return torchvision_densenet(config)
    from densenet_efficient.models.densenet import DenseNet

    return DenseNet(**config.to_kwargs(), memory_efficient=setting)


def correctness_rows(device: str, quick: bool) -> list[dict[str, Any]]:
    """One row per (config, precision, setting): relative errors against the naive model and pass/fail."""
    rows = []
    for name, config, res, batch in correctness_configs(quick):
        # naive first: the other rows' allowance depends on its error
        settings: list[tuple[str, Any]] = [("naive", "naive"), ("torchvision", "torchvision")]
        settings += [(m, m) for m in MODES if m != "naive"] + [
            (label, fn(config)) for label, fn in EXTRA_SETTINGS
        ]
        torch.manual_seed(0)
        state = {k: v.clone() for k, v in _build("naive", config).state_dict().items()}
        for precision, (dtype, amp, tol, check_grads) in PRECISIONS.items():
            gen = torch.Generator().manual_seed(1)
            x = torch.randn(batch, 3, res, res, generator=gen, dtype=dtype).to(device)

            def run(setting: Any, dtype=dtype, amp=amp, x=x, config=config, state=state):
                model = _build(setting, config)
                model.load_state_dict(state)
                return _forward_backward(model.to(device=device, dtype=dtype).train(), x, amp)

            # Reference: the naive model in float64 on the same input. Lower precisions are judged by
            # their error against it: within the tolerance, or no worse than twice the naive model's
            # own error in that precision (bf16 rounding compounds over depth for every implementation).
            ref_out, ref_grads = run("naive", dtype=torch.float64, amp=None, x=x.double())
            naive_err = None
            for label, setting in settings:
                row = {"config": name, "precision": precision, "setting": label, "tolerance": tol}
                try:
                    out, grads = run(setting)
                    row["output_rel"] = _rel(out, ref_out)
                    row["grad_rel"] = _grad_rel(grads, ref_grads)
                    if setting == "naive":
                        naive_err = row["output_rel"]
                    allowed = max(tol, 2 * naive_err) if naive_err is not None else tol
                    row["allowed"] = allowed
                    row["passed"] = row["output_rel"] <= allowed and (
                        not check_grads or row["grad_rel"] <= tol
                    )
                except Exception as err:  # reported on the row; the other rows still run
                    row.update(passed=False, error=f"{type(err).__name__}: {err}".splitlines()[0])
                rows.append(row)
    return rows


def correctness_markdown(rows: list[dict[str, Any]]) -> str:
    def e(x: float | None) -> str:
        return "-" if x is None else f"{x:.1e}"

    lines = [
        "| config | precision | setting | output rel. err | grad rel. err | allowed | result |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        result = "PASS" if r["passed"] else "FAIL" + (f" ({r['error']})" if "error" in r else "")
        lines.append(
            f"| {r['config']} | {r['precision']} | {r['setting']} | {e(r.get('output_rel'))} "
            f"| {e(r.get('grad_rel'))} | {r.get('allowed', r['tolerance']):.1e} | {result} |"
        )
    passed = sum(r["passed"] for r in rows)
    lines.append("")
    lines.append(
        f"{passed}/{len(rows)} rows pass. Relative error: max |a - b| / max |b| against our naive mode "
        "(torchvision's exact operations) in float64 with identical weights and input, one "
        "training-mode forward and backward (loss: mean of the squared logits). Allowed: the "
        "precision's tolerance (float64 1e-10, fp32 1e-4, bf16 2e-2) or twice the naive model's own "
        "error in that precision, whichever is larger. Gradients (every parameter and the input): "
        "the largest per-tensor error, each tensor's scale floored at 1e-3 of the largest gradient "
        "(near-zero gradients such as norm0.weight's are cancellation noise); checked in float64, "
        "shown for information in fp32 and bf16. TF32 is off for this section."
    )
    return "\n".join(lines)


# --- (b) benchmark table --------------------------------------------------------------------------


def benchmark_points(quick: bool) -> list[tuple[ArchConfig, int, int]]:
    if quick:
        return [(densenet_bc_config(10), 8, 32)]
    return [(densenet_bc_config(100), 64, 32), (get_config("densenet121"), 64, 224)]


def eager_rows(config: ArchConfig, batch: int, res: int, device: str) -> list[dict[str, Any]]:
    from densenet_efficient.perf.measure import IMPLEMENTATIONS

    return benchmark(
        config, batch_size=batch, image_size=res, implementations=IMPLEMENTATIONS, rounds=2, steps=5,
        device=device, progress=False,
    )  # fmt: skip


def compiled_row(
    config: ArchConfig, batch: int, res: int, device: str, variant: Any, base: dict[str, Any] | None
) -> dict[str, Any]:
    """One compiled variant (a budget for torchvision, or ``"efficient"``), measured once; ratios to ``base``."""
    kwargs = {"compile_ours": [variant]} if isinstance(variant, str) else {"compiled_budgets": [variant]}
    (row,) = benchmark(
        config, batch_size=batch, image_size=res, implementations=[], rounds=1, steps=5, device=device,
        progress=False, **kwargs,
    )  # fmt: skip
    if base and row.get("peak_mb") is not None:
        row["memory_ratio"] = row["peak_mb"] / base["peak_mb"]
        row["time_ratio"] = row["seconds"] / base["seconds"]
    return row


def benchmark_markdown(rows: list[dict[str, Any]]) -> str:
    from densenet_efficient.perf.benchmark import HEADER, error_notes, row_cells

    header = [*HEADER[:4], "img/s", *HEADER[4:]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = row_cells(r)
        ips = "-" if not r.get("seconds") else f"{r['batch_size'] / r['seconds']:.0f}"
        lines.append("| " + " | ".join([*cells[:4], ips, *cells[4:]]) + " |")
    notes = error_notes(rows)
    return "\n".join(lines + ([""] + [f"- {n}" for n in notes] if notes else []))


# --- (c) densenet121 at scale, bf16 channels_last -------------------------------------------------


_COMPARE = {"<=": operator.le, ">=": operator.ge, "<": operator.lt}


def _verdict(prefix: str, ratio: float, what: str, op: str, target: str) -> str:
    """One line against a target: ``- point: efficient at 1.020x naive's step time (target <= 1.15x): met``."""
    met = _COMPARE[op](ratio, float(target.removesuffix("x")))
    return f"{prefix}{ratio:.3f}x {what} (target {op} {target}): {'met' if met else 'NOT met'}"


def _memory_verdict(ratio: float) -> str:
    return _verdict("  memory ", ratio, "naive's", "<=", "0.25x")


def bf16_point(impl: str, batch: int, res: int, steps: int) -> dict[str, Any]:
    """Peak ``max_memory_allocated`` (total) and img/s for one implementation, in this process."""
    from densenet_efficient.perf.measure import build_implementation

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    config = get_config("densenet121")
    model = x = y = None
    try:
        model = build_implementation(impl, config).cuda().to(memory_format=torch.channels_last).train()
        x = torch.randn(batch, 3, res, res, device="cuda").to(memory_format=torch.channels_last)
        y = torch.randint(0, config.num_classes, (batch,), device="cuda")

        def step() -> None:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), y)
            loss.backward()

        for _ in range(2):
            step()
        torch.cuda.synchronize()
        times = []
        for _ in range(steps):
            times.append(time_step(step, "cuda"))
        peak = torch.cuda.max_memory_allocated()
        return {"impl": impl, "peak_gb": peak / GB, "img_s": batch / statistics.median(times)}
    except torch.OutOfMemoryError:
        return {"impl": impl, "oom": True}
    finally:
        model = x = y = None  # freed before the next implementation is measured
        gc.collect()
        torch.cuda.empty_cache()


def bf16_markdown(rows: list[dict[str, Any]], batch: int, res: int) -> str:
    lines = ["| implementation | peak GB (total) | img/s | <= 8 GB |", "|---|---|---|---|"]
    for r in rows:
        if r.get("oom"):
            lines.append(f"| {r['impl']} | OOM | - | - |")
        else:
            goal = "-" if r["impl"] == "torchvision" else ("yes" if r["peak_gb"] <= 8 else "NO")
            lines.append(f"| {r['impl']} | {r['peak_gb']:.2f} | {r['img_s']:.0f} | {goal} |")
    lines += [
        "",
        f"densenet121, batch {batch}, {res}x{res}, bf16 autocast, channels_last model and input; "
        "peak `max_memory_allocated` over the whole run (weights, gradients and input included), "
        "img/s from the median of CUDA-event step times after two warm-up steps. "
        "Goal: <= 8 GB for our modes.",
    ]
    return "\n".join(lines)


# --- (s) speed, in one process ---------------------------------------------------------------------

SPEED_IMPLS = ("torchvision", "torchvision_efficient", "efficient", "max_saving")


def speed_points(quick: bool) -> list[tuple[str, ArchConfig, int, int, bool]]:
    """(label, config, batch, resolution, bf16 autocast + channels_last)."""
    if quick:
        tiny = ArchConfig(growth_rate=4, block_config=(1, 2, 1, 1), num_init_features=8, num_classes=10)
        return [
            ("DenseNet-BC-10 fp32", densenet_bc_config(10), 4, 16, False),
            ("tiny bf16 CL", tiny, 2, 32, True),
        ]
    return [
        ("DenseNet-BC-100 b64 fp32", densenet_bc_config(100), 64, 32, False),
        ("densenet121 b64 224 fp32", get_config("densenet121"), 64, 224, False),
        ("densenet121 b256 224 bf16 channels_last", get_config("densenet121"), 256, 224, True),
    ]


def speed_rows(device: str, quick: bool, rounds: int = 10) -> list[dict[str, Any]]:
    """Every implementation of every point, timed interleaved (A B C D A B C D ...) in this process."""
    from densenet_efficient.perf.measure import build_implementation
    from densenet_efficient.perf.opcount import count_step_ops

    cuda = device == "cuda"
    rows = []
    for label, config, batch, res, low in speed_points(quick):
        fmt = torch.channels_last if low else torch.contiguous_format
        x = torch.randn(batch, 3, res, res, device=device).contiguous(memory_format=fmt)
        y = torch.randint(0, config.num_classes, (batch,), device=device)
        models = {
            i: build_implementation(i, config).to(device, memory_format=fmt).train() for i in SPEED_IMPLS
        }

        def step(model: torch.nn.Module, x=x, y=y, low=low) -> None:
            with torch.autocast(device, dtype=torch.bfloat16, enabled=low):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            model.zero_grad(set_to_none=True)

        def timed(model: torch.nn.Module, step=step) -> float:
            return time_step(lambda: step(model), device)

        peaks = {}
        for impl, model in models.items():
            for _ in range(2):
                step(model)
            if cuda:
                torch.cuda.synchronize()
                before = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                step(model)
                torch.cuda.synchronize()
                peaks[impl] = (torch.cuda.max_memory_allocated() - before) / MB
        times: dict[str, list[float]] = {i: [] for i in models}
        for _ in range(2 if quick else rounds):
            for impl, model in models.items():
                times[impl].append(timed(model))
        base = statistics.median(times["torchvision"])
        for impl, model in models.items():
            t = statistics.median(times[impl])
            ops = count_step_ops(model, x, y, autocast=torch.bfloat16 if low else None).total
            rows.append({
                "point": label, "impl": impl, "batch": batch, "seconds": t, "time_ratio": t / base,
                "img_s": batch / t, "peak_mb": peaks.get(impl), "ops": ops, "low": low,
                "memory_ratio": peaks[impl] / peaks["torchvision"] if cuda else None,
            })  # fmt: skip
        del models
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return rows


def _memory_cells(row: dict[str, Any]) -> tuple[str, str]:
    """A row's peak MB and memory ratio as table cells ("-" where not measured, e.g. on CPU)."""
    mem = "-" if row["peak_mb"] is None else f"{row['peak_mb']:.0f}"
    return mem, "-" if row["memory_ratio"] is None else f"{row['memory_ratio']:.3f}x"


def speed_markdown(rows: list[dict[str, Any]], device: str) -> str:
    lines = [
        "| point | implementation | ms/step | time vs tv | img/s | activation MB | memory vs tv | ops/step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for r in rows:
        mem, mratio = _memory_cells(r)
        lines.append(
            f"| {r['point']} | {r['impl']} | {r['seconds'] * 1e3:.1f} | {r['time_ratio']:.3f}x | "
            f"{r['img_s']:.0f} | {mem} | {mratio} | {r['ops']} |"
        )
        if r["impl"] == "efficient":  # the targets, judged here
            if r["low"]:
                verdicts.append(
                    _verdict(
                        f"- {r['point']}: efficient at ",
                        1 / r["time_ratio"],
                        "torchvision's img/s",
                        ">=",
                        "0.95x",
                    )
                )
            else:
                verdicts.append(
                    _verdict(
                        f"- {r['point']}: efficient at ", r["time_ratio"], "naive's step time", "<=", "1.15x"
                    )
                )
            if r["memory_ratio"] is not None:
                verdicts.append(_memory_verdict(r["memory_ratio"]))
    lines += [
        "",
        f"One process on {device.upper()}; implementations interleaved over rounds after two warm-up "
        "steps each; ms/step is the median (CUDA events on a GPU); activation MB is "
        "`max_memory_allocated` over one step minus the memory allocated before it; ops/step counts "
        "kernel-launching ATen ops (docs/measurement.md).",
        "",
        *verdicts,
    ]
    return "\n".join(lines)


# --- (g) graphs: the captured step ----------------------------------------------------------------

#: (label, implementation, torch.compile mode or None for eager, activation_memory_budget)
GRAPH_VARIANTS = (
    ("naive eager", "torchvision", None, None),
    ("efficient eager", "efficient", None, None),
    ("efficient captured", "efficient", "graphs", None),
    ("torchvision compiled", "torchvision", "default", None),
    ("torchvision compiled (budget 0.3)", "torchvision", "default", 0.3),
)


def _compiled(model: torch.nn.Module, mode: str | None, budget: float | None, cuda: bool) -> torch.nn.Module:
    if mode is None:
        return model
    if mode == "graphs":  # our blocks are custom ops: one graph, and on CUDA graphs replay it
        return torch.compile(
            model,
            fullgraph=True,
            mode="reduce-overhead" if cuda else None,
            backend="inductor" if cuda else "aot_eager",
        )
    return torch.compile(model, backend="inductor" if cuda else "aot_eager")


def graph_rows(device: str, quick: bool, rounds: int = 10) -> list[dict[str, Any]]:
    """Every variant of every fp32 point, one at a time in this process (each compiles anew:
    ``activation_memory_budget`` is read when compiling): built, compiled (and captured) in three
    warm-up steps, whose wall time is recorded, then timed. On CPU (plumbing) the compiler runs
    ``aot_eager``, which checks the capture but not inductor's speed."""
    from densenet_efficient.perf.measure import build_implementation

    cuda = device == "cuda"
    rows = []
    for label, config, batch, res, low in speed_points(quick):
        if low:
            continue
        x = torch.randn(batch, 3, res, res, device=device)
        y = torch.randint(0, config.num_classes, (batch,), device=device)
        measured = {}
        for name, impl, mode, budget in GRAPH_VARIANTS:
            torch._dynamo.reset()
            gc.collect()
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                before = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            model = build_implementation(impl, config).to(device).train()
            net = _compiled(model, mode, budget, cuda)

            def step(net=net, model=model, x=x, y=y) -> None:
                if cuda:
                    torch.compiler.cudagraph_mark_step_begin()
                F.cross_entropy(net(x), y).backward()
                model.zero_grad(set_to_none=True)

            t0 = time.perf_counter()
            with torch._functorch.config.patch(activation_memory_budget=budget or 1.0):
                for _ in range(3):  # compile (and capture) happen here
                    step()
            if cuda:
                torch.cuda.synchronize()
            warm = time.perf_counter() - t0
            peak = (torch.cuda.max_memory_allocated() - before) / MB if cuda else None
            times = [time_step(step, device) for _ in range(2 if quick else rounds)]
            measured[name] = (statistics.median(times), peak, warm)
            del net, model, step
        base_t, base_m, _ = measured["naive eager"]
        for name, (t, peak, warm) in measured.items():
            rows.append({
                "point": label, "variant": name, "seconds": t, "time_ratio": t / base_t,
                "peak_mb": peak, "compile_s": warm, "memory_ratio": peak / base_m if cuda else None,
            })  # fmt: skip
    return rows


def graph_markdown(rows: list[dict[str, Any]], device: str) -> str:
    lines = [
        "| point | variant | ms/step | time vs naive | peak MB | memory vs naive | warm-up s (compile) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mem, mratio = _memory_cells(r)
        lines.append(
            f"| {r['point']} | {r['variant']} | {r['seconds'] * 1e3:.1f} | {r['time_ratio']:.3f}x | {mem} | "
            f"{mratio} | {r['compile_s']:.1f} |"
        )
    verdicts = []
    for point in dict.fromkeys(r["point"] for r in rows):
        by = {r["variant"]: r for r in rows if r["point"] == point}
        ours = by["efficient captured"]
        verdicts.append(
            _verdict(
                f"- {point}: captured efficient at ", ours["time_ratio"], "naive eager's time", "<", "1.00x"
            )
        )
        for peer in ("torchvision compiled", "torchvision compiled (budget 0.3)"):
            verdicts.append(
                _verdict(f"  vs {peer}: ", ours["seconds"] / by[peer]["seconds"], "its time", "<=", "1.00x")
            )
            if ours["peak_mb"] is not None:
                verdicts.append(
                    _verdict("  memory ", ours["peak_mb"] / by[peer]["peak_mb"], "its", "<=", "0.5x")
                )
        if ours["memory_ratio"] is not None:
            verdicts.append(_memory_verdict(ours["memory_ratio"]))
    lines += [
        "",
        f"One process on {device.upper()}; one variant at a time, compiled (and on CUDA captured) in "
        "its three warm-up steps, whose wall time is the last column, then timed: ms/step is the "
        "median (CUDA events on a GPU); peak MB is `max_memory_allocated` from before the model is "
        "built through warm-up, capture and the steps (a CUDA graph's pool is allocated there), minus "
        "the memory allocated before it."
        + ("" if device == "cuda" else " On CPU the compiler ran `aot_eager` (plumbing only)."),
        "",
        *verdicts,
    ]
    return "\n".join(lines)


# --- (d) planner vs measurement -------------------------------------------------------------------


def planner_rows(eager: list[dict[str, Any]], device: str, quick: bool) -> list[dict[str, Any]]:
    """The benchmark's eager rows (fp32) plus a few bf16 points measured in fresh processes."""
    from densenet_efficient.models.planner import estimate_memory
    from densenet_efficient.perf.measure import StepSpec, measure

    rows = [
        {"arch": r["arch"], "mode": r["implementation"], "batch": r["batch_size"], "resolution": r["image_size"],
         "amp": None, "estimate_mb": r["estimate_mb"], "measured_mb": r["peak_mb"]}
        for r in eager if r.get("estimate_mb") and r.get("peak_mb")
    ]  # fmt: skip
    extra = (
        [(densenet_bc_config(10), "efficient", 8, 32)]
        if quick
        else [
            (get_config("densenet121"), "efficient", 32, 224),
            (get_config("densenet121"), "max_saving", 32, 224),
            (densenet_bc_config(100), "efficient", 128, 32),
        ]
    )
    for config, mode, batch, res in extra:
        r = measure(StepSpec(mode, config, batch, res, device=device, amp="bf16"))
        est = estimate_memory(config, batch_size=batch, image_size=res, mode=mode, device=device, amp="bf16")
        rows.append(
            {"arch": config.name, "mode": mode, "batch": batch, "resolution": res, "amp": "bf16",
             "estimate_mb": est.peak / MB, "measured_mb": r["peak_bytes"] / MB}
        )  # fmt: skip
    return rows


def planner_markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| arch | mode | batch | resolution | amp | planner MB | measured MB | estimate / measured |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['arch']} | {r['mode']} | {r['batch']} | {r['resolution']} | {r['amp'] or 'fp32'} "
            f"| {r['estimate_mb']:.0f} | {r['measured_mb']:.0f} | {r['estimate_mb'] / r['measured_mb']:.3f} |"
        )
    lines += [
        "",
        "Measured: `max_memory_allocated` over one step after a warm-up, minus the memory allocated "
        "before the step (a fresh process per point); planner: `estimate_memory(...).peak`.",
    ]
    return "\n".join(lines)


# --- driver: the table of sections ----------------------------------------------------------------


@dataclass
class Run:
    """What the sections share: the command line's choices, and what earlier sections measured."""

    device: str
    quick: bool
    deadline: float  #: ``time.monotonic()`` after which (b)'s compiled rows are skipped
    failures: list[str] = field(default_factory=list)  #: failed correctness rows, for the exit status
    eager: dict[int, list[dict[str, Any]]] = field(default_factory=dict)  #: (b)'s eager rows; (d) reads them

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"


#: What a section's ``run`` returns: its Markdown, or a function that finishes it (and returns
#: its Markdown) after every other section has run.
Outcome = str | Callable[[], str]


@dataclass(frozen=True)
class Section:
    """One ``## (letter) title`` of the report."""

    letter: str
    title: Callable[[Run], str]
    run: Callable[[Run], Outcome]
    needs_cuda: bool


def section_a(run: Run) -> str:
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        rows = correctness_rows(run.device, run.quick)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    run.failures.extend(f"(a) {r['config']} {r['precision']} {r['setting']}" for r in rows if not r["passed"])
    return correctness_markdown(rows)


def section_b(run: Run) -> Callable[[], str]:
    """The eager rows now (``run.eager``, which (d) reads); the compiled rows, the expensive part,
    after every other section, while the time budget lasts."""
    points = benchmark_points(run.quick)
    for i, (config, batch, res) in enumerate(points):
        run.eager[i] = eager_rows(config, batch, res, run.device)
    return lambda: benchmark_section(run, points)


def compiled_rows(run: Run, points: list[tuple[ArchConfig, int, int]]) -> dict[int, list[dict[str, Any]]]:
    """(b)'s compiled rows, each variant on every configuration before the next variant, while
    ``run.deadline`` allows (the next one's compile time guessed from the last)."""
    variants: list[Any] = [0.5] if run.quick else [*DEFAULT_COMPILED_BUDGETS, "efficient"]
    rows: dict[int, list[dict[str, Any]]] = {i: [] for i in run.eager}
    last = 60.0  # the first compilation's guess, in seconds
    for variant in variants:
        for i, (config, batch, res) in enumerate(points):
            if i not in run.eager:
                continue
            label = (
                "efficient compiled" if variant == "efficient" else f"torchvision compiled (budget {variant})"
            )
            if time.monotonic() + last > run.deadline:
                rows[i].append(_not_measured(run.eager[i][0], label, "skipped: time budget spent"))
                continue
            t0 = time.monotonic()
            base = next((r for r in run.eager[i] if r["implementation"] == "torchvision"), None)
            try:
                rows[i].append(compiled_row(config, batch, res, run.device, variant, base))
            except Exception as err:
                rows[i].append(_not_measured(run.eager[i][0], label, f"{type(err).__name__}: {err}"))
            last = max(0.6 * last, time.monotonic() - t0)
    return rows


def benchmark_section(run: Run, points: list[tuple[ArchConfig, int, int]]) -> str:
    compiled = compiled_rows(run, points)
    parts = []
    for i, (config, batch, res) in enumerate(points):
        parts.append(f"### {config.name}, batch {batch}, {res}x{res}, fp32\n")
        parts.append(benchmark_markdown(run.eager[i] + compiled[i]) + "\n")
    parts.append(
        "Peak MB: `max_memory_allocated` over one step after a warm-up minus the memory allocated "
        "before it (fresh process per figure). Eager rows: 2 interleaved rounds of 5 timed steps, "
        "ratios paired by round with torchvision naive. Compiled rows (`torch.compile`, "
        "`activation_memory_budget` as labelled; `efficient compiled`: our blocks are custom ops "
        "inside one compiled graph) are measured once, warm (the compiling step and one more "
        "step excluded), their ratios against the eager rows' torchvision figures."
    )
    return "\n".join(parts)


def section_c(run: Run) -> str:
    batch, res, steps = (8, 64, 3) if run.quick else (256, 224, 10)
    impls = ["torchvision", "efficient", "max_saving"]
    return bf16_markdown([bf16_point(i, batch, res, steps) for i in impls], batch, res)


def section_d(run: Run) -> str:
    eager = [r for rows in run.eager.values() for r in rows]
    return planner_markdown(planner_rows(eager, run.device, run.quick))


def section_s(run: Run) -> str:
    """Runs on the CPU too (plumbing; the figures that matter are the GPU's)."""
    return speed_markdown(speed_rows(run.device, run.quick), run.device)


def section_g(run: Run) -> str:
    """The captured step; on the CPU plumbing with aot_eager."""
    return graph_markdown(graph_rows(run.device, run.quick), run.device)


#: The report, in order. Sections run in this order too, except what a section defers (the
#: compiled rows of (b)), which runs after all of them.
SECTIONS = (
    Section("a", lambda run: f"Correctness on {run.device.upper()}", section_a, needs_cuda=False),
    Section("b", lambda run: "Benchmark table", section_b, needs_cuda=True),
    Section(
        "c",
        lambda run: (
            "densenet121, bf16, channels_last (quick: small batch)"
            if run.quick
            else "densenet121, batch 256, bf16, channels_last"
        ),
        section_c,
        needs_cuda=True,
    ),
    Section("d", lambda run: "Planner estimate vs measurement", section_d, needs_cuda=True),
    Section("s", lambda run: "Speed: step time, memory and ops per step", section_s, needs_cuda=False),
    Section(
        "g",
        lambda run: "Graphs: the captured step against naive and the compiler",
        section_g,
        needs_cuda=False,
    ),
)
LETTERS = "".join(s.letter for s in SECTIONS)


def _guarded(fn: Callable[[], Outcome]) -> Outcome:
    """``fn()``'s outcome, or the exception in its place (the other sections still run)."""
    try:
        return fn()
    except Exception as err:
        traceback.print_exc()
        return f"**Section failed:** `{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}`"


def run_sections(run: Run, letters: str) -> dict[str, str]:
    """Every section's Markdown by letter: run, skipped (no CUDA) or not asked for."""
    texts: dict[str, str] = {}
    deferred: dict[str, Callable[[], str]] = {}
    for section in SECTIONS:
        if section.letter not in letters:
            texts[section.letter] = "not run (--sections)"
        elif section.needs_cuda and not run.cuda:
            texts[section.letter] = "skipped: no CUDA (this run used the CPU)"
        else:
            outcome = _guarded(lambda section=section: section.run(run))
            if callable(outcome):
                deferred[section.letter] = outcome
            else:
                texts[section.letter] = outcome
    for letter, finish in deferred.items():
        texts[letter] = _guarded(finish)
    return texts


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out", default="docs/gpu_check.md", help="Markdown report (default docs/gpu_check.md)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the plumbing in seconds")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument(
        "--time-budget",
        type=float,
        default=450,
        help="seconds; compiled rows of (b) stop when spent (default 450)",
    )
    parser.add_argument(
        "--sections", default=LETTERS, help=f"which sections to run, e.g. 'as' (default {LETTERS}: all)"
    )
    return parser


def report(run: Run, texts: dict[str, str], argv: list[str], wall_s: float) -> str:
    """The whole Markdown document: the machine, then every section in :data:`SECTIONS`' order."""
    import torchvision

    card = torch.cuda.get_device_name() if run.cuda else "none (CPU run)"
    lines = [
        "# GPU readiness check",
        "",
        f"- Card: {card}",
        f"- torch {torch.__version__}, torchvision {torchvision.__version__}, CUDA {torch.version.cuda}",
        f"- Engine: {engine_status()}",
        f"- Date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Command: `python scripts/gpu_check.py {' '.join(argv)}`".rstrip(),
        f"- Wall time: {wall_s:.0f} s" + (" (--quick: tiny sizes)" if run.quick else ""),
        "",
    ]
    for section in SECTIONS:
        lines += [f"## ({section.letter}) {section.title(run)}", "", texts[section.letter], ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.sections or set(args.sections) - set(LETTERS):
        parser.error(f"--sections takes letters from {LETTERS!r}, got {args.sections!r}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: error: --device cuda asked for, but CUDA is not available here", file=sys.stderr)
        return 2
    if device == "cpu":  # tiny models: one thread, immune to a busy machine's oversubscription
        torch.set_num_threads(1)
    started = time.monotonic()
    run = Run(device, args.quick, deadline=started + args.time_budget)
    texts = run_sections(run, args.sections)
    doc = report(run, texts, argv, time.monotonic() - started)
    atomic_write(Path(args.out), doc.encode())
    print(doc)
    print(f"wrote {args.out}", file=sys.stderr)
    if run.failures:
        print("FAILED: " + "; ".join(run.failures), file=sys.stderr)
    return 1 if run.failures or "**Section failed:**" in doc else 0


def _not_measured(like: dict[str, Any], label: str, why: str) -> dict[str, Any]:
    keys = ("arch", "batch_size", "image_size", "device")
    return {
        **{k: like[k] for k in keys}, "implementation": label, "peak_mb": None, "memory_ratio": None,
        "seconds": None, "time_ratio": None, "time_ratio_range": None, "estimate_mb": None, "error": why.splitlines()[0],
    }  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
