"""What several subcommands share: the architecture options and plain-text tables."""

from __future__ import annotations

import argparse

from ..models.config import ArchConfig, densenet_bc_config, resolve_arch

__all__ = ["add_arch_arguments", "arch_from_args", "format_table"]


def add_arch_arguments(parser: argparse.ArgumentParser, default: str) -> None:
    """``--arch NAME``, ``--depth D`` (a DenseNet-BC, overriding --arch) and ``--growth-rate K``."""
    parser.add_argument(
        "--arch", default=default, help=f"architecture name or densenet_bc_<depth> (default {default})"
    )
    parser.add_argument("--depth", type=int, help="DenseNet-BC depth 6n+4 (overrides --arch)")
    parser.add_argument("--growth-rate", type=int, help="DenseNet-BC growth rate k (default 12)")


def arch_from_args(args: argparse.Namespace) -> ArchConfig:
    """The architecture :func:`add_arch_arguments`'s options describe."""
    if args.depth is not None:
        return densenet_bc_config(args.depth, 12 if args.growth_rate is None else args.growth_rate)
    return resolve_arch(args.arch, args.growth_rate)


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """Left-aligned columns under a dashed rule."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
