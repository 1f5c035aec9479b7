#!/usr/bin/env python
"""Print the benchmark table as Markdown (for docs/benchmarks.md and the README).

A thin wrapper over ``densenet-efficient benchmark --markdown``; any of its arguments pass through:

    python scripts/benchmark_table.py                                   # DenseNet-BC-100, batch 64
    python scripts/benchmark_table.py --arch densenet121 --batch-size 8 --image-size 224
    python scripts/benchmark_table.py --sweep depth --out docs/

It imports the installed package: run it from a checkout after
``pip install -e .`` (or with ``PYTHONPATH=.``).
"""

import sys

from densenet_efficient.cli import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--json" not in argv and "--sweep" not in argv and "--markdown" not in argv:
        argv.append("--markdown")
    sys.exit(main(["benchmark", *argv]))
