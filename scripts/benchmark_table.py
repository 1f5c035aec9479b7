#!/usr/bin/env python
"""Print the benchmark table as Markdown (for docs/benchmarks.md and the README).

A thin wrapper over ``densenet-efficient benchmark --markdown``; any of its arguments pass through:

    python scripts/benchmark_table.py                                   # DenseNet-BC-100, batch 64
    python scripts/benchmark_table.py --arch densenet121 --batch-size 8 --resolution 224
    python scripts/benchmark_table.py --sweep depth --out docs/
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from densenet_efficient.cli import main  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--json" not in argv and "--sweep" not in argv and "--markdown" not in argv:
        argv.append("--markdown")
    sys.exit(main(["benchmark", *argv]))
