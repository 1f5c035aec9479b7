#!/usr/bin/env python
"""Train or fine-tune a DenseNet: the original efficient-DenseNet demo's entry point.

A thin wrapper over ``densenet-efficient train`` (all options: ``python scripts/train.py --help``):

    python scripts/train.py                                            # embedded digits, CPU minutes
    python scripts/train.py --dataset cifar10 --data ~/data --save runs/bc100 --depth 100
    torchrun --nproc_per_node 4 scripts/train.py --dataset cifar10 --data ~/data --save runs/bc100
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from densenet_efficient.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
