"""``densenet-efficient benchmark``: training-step memory and time per implementation, side by side.

densenet-efficient benchmark                                   # DenseNet-BC-100, batch 64, 32x32
densenet-efficient benchmark --arch densenet121 --batch-size 8 --image-size 224 --markdown
densenet-efficient benchmark --sweep depth --out docs/         # memory vs depth: PNG + CSV
densenet-efficient benchmark --compiled-budgets                # + torch.compile rows (slow on a CPU)
densenet-efficient benchmark --compiled-budgets 0.3 --compile-ours efficient

The eager rows are the default: one fresh process per row for memory and one per row and speed
round (one round by default: a quick look; ``--rounds 5`` for a ratio with its range). The torch.compile rows compile in every one of their processes, minutes each on a 2-core
CPU, so they are asked for by name.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import UsageError, require_extra
from ..models.engine import MODES
from ..perf.benchmark import (
    DEFAULT_COMPILED_BUDGETS,
    HEADER,
    benchmark,
    error_notes,
    machine_description,
    resolve_device,
    row_cells,
    save_sweep,
    sweep,
    to_markdown,
)
from ..perf.measure import IMPLEMENTATIONS
from ._common import add_arch_arguments, arch_from_args, format_table

__all__ = ["configure_parser", "run"]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``densenet-efficient benchmark``."""
    add_arch_arguments(parser, "densenet_bc_100")
    parser.add_argument("--batch-size", type=int, help="default 64 (CIFAR configs) or 8 (ImageNet)")
    parser.add_argument(
        "--image-size", type=int, help="input height/width: default 32 (CIFAR configs) or 224 (ImageNet)"
    )
    parser.add_argument(
        "--modes", nargs="+", choices=IMPLEMENTATIONS, default=list(IMPLEMENTATIONS), help="rows to measure"
    )
    defaults = " ".join(str(b) for b in DEFAULT_COMPILED_BUDGETS)
    compiled = parser.add_mutually_exclusive_group()
    compiled.add_argument(
        "--compiled-budgets",
        type=float,
        nargs="*",
        metavar="BUDGET",
        help="add rows for torch.compile(torchvision naive) with torch._functorch.config."
        "activation_memory_budget set to each activation budget, a fraction in (0, 1] of what the "
        f"default partitioner saves, not bytes (given with no values: {defaults}; 1.0 is the "
        "compiler's default partitioner). Off by default: every such row compiles in each of its "
        "fresh processes (1 + --rounds of them), minutes per process on a 2-core CPU",
    )
    compiled.add_argument(
        "--no-compiled",
        action="store_true",
        help="no compiled rows (the default; kept for old command lines)",
    )
    parser.add_argument(
        "--compile-ours",
        nargs="*",
        choices=MODES,
        default=[],
        metavar="MODE",
        help=f"also measure these of our modes under torch.compile ({', '.join(MODES)}; default none)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="interleaved speed rounds (default 1, a quick look; 5 or more give the time ratio's range)",
    )
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


def run(args: argparse.Namespace) -> int:
    """``densenet-efficient benchmark``."""
    device = resolve_device(args.device)
    if args.sweep and (args.compiled_budgets or args.compile_ours):
        raise UsageError("--compiled-budgets and --compile-ours add table rows; --sweep does not take them")
    return _run_sweep(args, device) if args.sweep else _run_rows(args, device)


def _run_sweep(args: argparse.Namespace, device: str) -> int:
    require_extra("plot", "benchmark --sweep (its PNG)")  # before minutes of measuring, not after
    batch = args.batch_size if args.batch_size is not None else (64 if args.sweep == "depth" else 16)
    growth_rate = 12 if args.growth_rate is None else args.growth_rate  # 0 is refused, not the default
    arch = args.arch if args.arch != "densenet_bc_100" or args.sweep == "depth" else "densenet121"
    rows = sweep(
        args.sweep,
        values=args.values,
        arch=arch,
        batch_size=batch,
        image_size=args.image_size,
        growth_rate=growth_rate,
        implementations=args.modes,
        device=device,
        progress=not args.quiet,
    )
    what = f"DenseNet-BC k={growth_rate}, batch {batch}" if args.sweep == "depth" else arch
    title = f"{what}; {machine_description(device)}"
    csv_path, png_path = save_sweep(rows, args.sweep, Path(args.out), title)
    print(json.dumps(rows, indent=2) if args.json else f"wrote {csv_path} and {png_path}")
    return 0


def _run_rows(args: argparse.Namespace, device: str) -> int:
    config = arch_from_args(args)
    batch = args.batch_size if args.batch_size is not None else (64 if config.small_inputs else 8)
    activation_budgets = args.compiled_budgets
    if args.no_compiled or activation_budgets is None:  # compiled rows only when asked for
        activation_budgets = []
    elif not activation_budgets:  # the flag alone: the default sweep of budgets
        activation_budgets = list(DEFAULT_COMPILED_BUDGETS)
    rows = benchmark(
        config,
        batch_size=batch,
        image_size=args.image_size,
        implementations=args.modes,
        rounds=args.rounds,
        steps=args.steps,
        device=device,
        speed=not args.no_speed,
        progress=not args.quiet,
        compiled_budgets=activation_budgets,
        compile_ours=args.compile_ours,
    )
    if args.json:
        print(json.dumps({"machine": machine_description(device), "rows": rows}, indent=2))
        return 0
    r0 = rows[0]
    print(
        f"{r0['arch']}, batch {r0['batch_size']}, {r0['image_size']}x{r0['image_size']}; {machine_description(device)}"
    )
    print(to_markdown(rows) if args.markdown else format_table(HEADER, [row_cells(r) for r in rows]))
    for note in error_notes(rows):
        print(note)
    return 0
