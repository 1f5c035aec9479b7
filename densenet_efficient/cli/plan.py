"""``densenet-efficient plan``: the largest batch per memory mode for a budget, from the planner.

densenet-efficient plan --arch densenet121 --image-size 224 --memory 8GiB --amp bf16
"""

from __future__ import annotations

import argparse
import json

from ..errors import UsageError
from ..models.engine import MODES
from ..models.planner import (
    DEFAULT_OPTIMIZER,
    ESTIMABLE,
    OPTIMIZER_STATES,
    TORCHVISION,
    TORCHVISION_EFFICIENT,
    MemoryBudgetError,
    fit_memory,
    format_bytes,
    parse_memory,
    plan,
)
from ..models.planner.simulate import MAX_SYNC_WORLD
from ._common import add_arch_arguments, arch_from_args, format_table

__all__ = ["configure_parser", "run"]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``densenet-efficient plan``."""
    add_arch_arguments(parser, "densenet121")
    parser.add_argument(
        "--image-size",
        dest="image_size",
        type=int,
        help="input height/width (default 224, CIFAR configs 32)",
    )
    parser.add_argument("--memory", required=True, help="the budget, e.g. 8GiB, 12GB, 16000MiB")
    parser.add_argument("--amp", choices=("bf16", "fp16"), help="autocast: half-precision activations")
    parser.add_argument(
        "--dtype", default="fp32", choices=("fp32", "bf16", "fp16", "fp64"), help="parameter dtype"
    )
    parser.add_argument(
        "--mode", action="append", choices=ESTIMABLE, help=f"mode(s) to plan (default: {', '.join(MODES)})"
    )
    parser.add_argument(
        "--torchvision",
        action="store_true",
        help="also plan torchvision's own DenseNet, plain and memory_efficient=True, for comparison "
        "(imports torchvision and simulates two more steps: seconds, not one)",
    )
    parser.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        help="where training will run (default: cuda when this machine has it, else cpu); a CUDA "
        "step also holds the CUDA context, which the plan counts",
    )
    parser.add_argument(
        "--optimizer",
        default=DEFAULT_OPTIMIZER,
        choices=tuple(OPTIMIZER_STATES),
        help=f"optimizer state: momentum (SGD with momentum), sgd (plain), adam (default {DEFAULT_OPTIMIZER})",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        help="also report the estimate at this batch size, and the dial setting fit_memory picks for it",
    )
    parser.add_argument(
        "--sync-bn",
        dest="sync_bn",
        type=int,
        default=1,
        metavar="PROCESSES",
        help="plan synchronised batch norm over this many processes (train --sync-bn under torchrun)",
    )
    parser.add_argument(
        "--channels-last", dest="channels_last", action="store_true", help="model and batches in channels_last"
    )
    parser.add_argument(
        "--drop-rate", dest="drop_rate", type=float, default=0.0, help="dropout after each dense layer (default 0)"
    )
    parser.add_argument(
        "--freeze-features",
        dest="freeze_features",
        action="store_true",
        help="only the classifier trains (train --freeze-features): backward stops there",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    """``densenet-efficient plan``: print the largest batch per mode for a memory budget."""
    arch = arch_from_args(args)
    name = arch.name
    budget = parse_memory(args.memory)
    if args.device is None:  # the machine at hand, as `train` and `benchmark` default; said below
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if not 1 <= args.sync_bn <= MAX_SYNC_WORLD:
        raise UsageError(
            f"--sync-bn takes the number of processes, 1 to {MAX_SYNC_WORLD}, found {args.sync_bn}"
        )
    modes = (*(args.mode or MODES), *((TORCHVISION, TORCHVISION_EFFICIENT) if args.torchvision else ()))
    modes = tuple(dict.fromkeys(modes))
    kwargs = dict(
        image_size=args.image_size,
        dtype=args.dtype,
        amp=args.amp,
        device=args.device,
        optimizer=args.optimizer,
        sync_bn_world_size=args.sync_bn,
        channels_last=args.channels_last,
        drop_rate=args.drop_rate,
        freeze_features=args.freeze_features,
    )
    rows = plan(arch, budget, modes=modes, batch_size=args.batch_size, **kwargs)
    fitted = _fit(arch, budget, args.batch_size, kwargs) if args.batch_size else None
    if all(r["max_batch_size"] == 0 for r in rows):
        least = min(r["minimum"] for r in rows)
        raise UsageError(
            f"a budget of {format_bytes(budget)} fits no batch in any mode: the smallest step "
            f"(batch 1, {min(rows, key=lambda r: r['minimum'])['mode']}) needs {format_bytes(least)}"
        )
    if args.json:
        print(json.dumps({"arch": name, "memory": budget, "rows": rows, "fit": fitted}, indent=2))
    else:
        res = args.image_size or arch.default_resolution
        print(
            f"{name} at {res}x{res}, {args.amp or args.dtype} activations, optimizer {args.optimizer}, "
            f"training on {args.device}"
            + (", channels_last" if args.channels_last else "")
            + (f", dropout {args.drop_rate:g}" if args.drop_rate else "")
            + (", features frozen" if args.freeze_features else "")
            + (f", batch norm synchronised over {args.sync_bn} processes" if args.sync_bn > 1 else "")
            + f": budget {format_bytes(budget)}"
        )
        header = ["mode", "per image", "max batch", "peak step", "total at max"]
        if args.batch_size:
            header.append(f"total at batch {args.batch_size}")
        table = []
        for r in rows:
            at = r.get("at_max")
            cells = [r["mode"], format_bytes(r["per_image"]), str(r["max_batch_size"])]
            cells += [format_bytes(at["peak"]), format_bytes(at["total"])] if at else ["-", "-"]
            if args.batch_size:
                cells.append(format_bytes(r["at_batch"]["total"]))
            table.append(cells)
        print(format_table(header, table))
        if fitted is not None:
            print(f"fit_memory at batch {args.batch_size}: " + (fitted.get("error") or fitted["summary"]))
    return 0


def _fit(arch, budget: int, batch_size: int, kwargs: dict) -> dict:
    """What ``model.fit_memory`` picks for this batch (or why nothing fits), JSON-ready."""
    try:
        p = fit_memory(arch, budget, batch_size=batch_size, **kwargs)
    except MemoryBudgetError as err:
        return {"error": str(err), "floor": err.floor, "max_batch_size": err.max_batch_size}
    summary = f"{p}; planner total {format_bytes(p.estimated_peak)}, +{p.estimated_extra_time:.1%} recompute"
    return {**p.to_json(), "summary": summary}
