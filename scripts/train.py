#!/usr/bin/env python
"""Train or fine-tune a DenseNet: the original efficient-DenseNet demo's entry point.

A thin wrapper over ``densenet-efficient train`` (all options: ``python scripts/train.py --help``):

    python scripts/train.py                                            # embedded digits, CPU minutes
    python scripts/train.py --dataset cifar10 --data ~/data --save runs/bc100 --depth 100
    torchrun --nproc_per_node 4 scripts/train.py --dataset cifar10 --data ~/data --save runs/bc100

It imports the installed package: run it from a checkout after
``pip install -e .`` (or with ``PYTHONPATH=.``).
"""

import sys

from densenet_efficient.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
