"""Collectives per training step of synchronised batch norm: the engine's modes against naive.

Runs one training step of each model in each mode on 2 gloo processes (CPU, batch 1 per rank)
with every batch norm converted by ``densenet_efficient.convert_sync_batchnorm``, counts the
collectives the synchronisation issues and the elements each rank sends, and prints a table.
Naive runs one gather per BN forward and one all-reduce per BN backward, as torch's
``nn.SyncBatchNorm`` does::

    python scripts/sync_bn_count.py --models densenet121 densenet_bc_100
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import densenet_efficient as de
from densenet_efficient.models.engine import sync

MODES = ("naive", "efficient", "max_saving")


def _worker(rank: int, models: list[str], folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=2)
    counts = {"gather": 0, "reduce": 0, "gathered": 0, "reduced": 0}
    originals = {"gather": sync._all_gather, "reduce": sync._all_reduce}

    def counted(kind: str):
        def run(t: torch.Tensor, group):
            counts[kind] += 1
            counts[kind + ("ed" if kind == "gather" else "d")] += t.numel()
            return originals[kind](t, group)

        return run

    sync._all_gather, sync._all_reduce = counted("gather"), counted("reduce")
    rows = []
    for name in models:
        for mode in MODES:
            model = de.convert_sync_batchnorm(de.create_model(name, memory_efficient=mode))
            size = 32 if model.arch_config.small_inputs else 64
            counts.update(gather=0, reduce=0, gathered=0, reduced=0)
            model(torch.randn(1, 3, size, size)).sum().backward()
            rows.append((name, mode, dict(counts)))
    if rank == 0:
        torch.save(rows, Path(folder) / "rows.pt")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["densenet121", "densenet_bc_100"])
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_worker, args=(args.models, folder), nprocs=2, join=True)
        rows = torch.load(Path(folder) / "rows.pt", weights_only=True)
    print("| model | mode | gathers (forward) | elements sent | all-reduces (backward) | elements sent |")
    print("|---|---|---:|---:|---:|---:|")
    for name, mode, c in rows:
        print(f"| {name} | {mode} | {c['gather']} | {c['gathered']:,} | {c['reduce']} | {c['reduced']:,} |")


if __name__ == "__main__":
    main()
