"""``densenet-efficient train``: train a DenseNet-BC, or fine-tune a pretrained DenseNet.

Replaces the original efficient-DenseNet demo (same options and defaults for CIFAR) and adds
fine-tuning, resumable checkpoints, mixed precision and multi-GPU training through ``torchrun``.

    densenet-efficient train                                   # embedded digits, a few CPU minutes
    densenet-efficient train --dataset cifar10 --data ~/data --save runs/bc100 --depth 100
    densenet-efficient train --save runs/bc100 --resume        # continue a stopped run
    densenet-efficient train --arch densenet121 --pretrained --data ~/flowers --freeze-features
    densenet-efficient train --arch densenet201 --data ~/flowers --memory 4GiB --batch-size 16 --accum-steps 4
    torchrun --nproc_per_node 4 -m densenet_efficient train --dataset cifar10 --data ~/data
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys

from ..models import engine
from ..models.config import list_architectures
from ..training.config import NonFiniteLossError, TrainConfig, describe_default
from ..training.data import DATASETS
from ..training.loop import train

__all__ = ["configure_parser", "run"]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``train`` options to ``parser`` (one per :class:`TrainConfig` field, same names)."""
    d = describe_default  # every default shown is read from training/config.py and data.py
    g = parser.add_argument_group("data")
    g.add_argument(
        "--dataset",
        choices=DATASETS,
        help=f"default {d('dataset')}; auto: digits without --data, CIFAR if DIR holds it, else an ImageFolder",
    )
    g.add_argument("--data", metavar="DIR", help="data directory (none: the embedded digits set)")
    g.add_argument(
        "--valid-size",
        type=_count_or_fraction,
        metavar="N",
        help="training images held out for validation: a count or a fraction "
        f"(default {d('valid_size')}; 0 for CIFAR validates on the test set)",
    )
    g.add_argument(
        "--download",
        action=argparse.BooleanOptionalAction,
        help=f"download CIFAR when missing (needs network access; default {d('download')})",
    )
    g.add_argument(
        "--image-size",
        type=int,
        metavar="PX",
        help=f"ImageFolder crop size (default: the pretrained weights' preset, else {d('image_size')})",
    )
    g = parser.add_argument_group("model")
    g.add_argument(
        "--arch",
        help=f"a named architecture ({', '.join(list_architectures())}); default: DenseNet-BC of --depth",
    )
    g.add_argument("--depth", type=int, help=f"DenseNet-BC depth, 6n+4 (default {d('depth')})")
    g.add_argument("--growth-rate", type=int, help=f"default {d('growth_rate')}")
    g.add_argument("--drop-rate", type=float, help=f"default {d('drop_rate')}")
    g.add_argument(
        "--mode",
        "--memory-efficient",
        dest="mode",
        choices=engine.MODES,
        help=f"how dense blocks execute (default {d('mode')})",
    )
    g.add_argument(
        "--pretrained", action="store_true", help="start from the architecture's published weights"
    )
    g.add_argument("--freeze-features", action="store_true", help="train only the classifier")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--n-epochs", type=int, help=f"default {d('n_epochs')}")
    g.add_argument(
        "--batch-size",
        type=_batch_size,
        metavar="N|auto",
        help=f"images per step and process (default {d('batch_size')}); auto: the largest that fits --memory",
    )
    g.add_argument(
        "--accum-steps",
        type=int,
        metavar="N",
        help="accumulate gradients over N batches per optimizer step: an effective batch of N x "
        f"--batch-size (batch norm still normalises each batch on its own; default {d('accum_steps')})",
    )
    g.add_argument("--lr", type=float, help=f"initial learning rate (default {d('lr')})")
    g.add_argument("--momentum", type=float, help=f"default {d('momentum')}")
    g.add_argument("--weight-decay", type=float, help=f"default {d('weight_decay')}")
    g.add_argument("--seed", type=int, help=f"default {d('seed')}")
    g = parser.add_argument_group("performance")
    g.add_argument(
        "--memory",
        metavar="SIZE|auto",
        help="train within this memory (e.g. 4GiB): chooses the memory plan instead of --mode, and the "
        "batch with --batch-size auto; auto (CUDA): the GPU's free memory minus a reserve, the default "
        "with --batch-size auto",
    )
    g.add_argument("--amp", choices=("bf16", "fp16"), help="mixed precision (fp16 needs CUDA)")
    g.add_argument("--channels-last", action="store_true")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--sync-bn", action="store_true", help="synchronised batch norm under torchrun, every mode and backend")
    g.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms")
    g.add_argument("--workers", type=int, help=f"DataLoader worker processes (default {d('workers')})")
    g.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    g = parser.add_argument_group("output")
    g.add_argument("--save", metavar="DIR", help="run directory (default runs/<dataset>-<time>)")
    g.add_argument("--resume", action="store_true", help="continue the run saved in --save")
    g.add_argument("--overwrite", action="store_true", help="start afresh over a run already in --save")
    g.add_argument(
        "--stop-after",
        type=int,
        metavar="N",
        help="stop (checkpoint kept) after N epochs of this invocation; --resume continues",
    )
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    # Every option defaults to None ("not given"), so that ``run`` passes only the options the user
    # gave: a --resume must tell "--lr 0.1 asked for" from "--lr left alone". The defaults shown in
    # the help are TrainConfig's, which fills in whatever is not given.
    parser.set_defaults(**{f.name: None for f in dataclasses.fields(TrainConfig)})


def _batch_size(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of images or auto, got {text}") from None


def _count_or_fraction(text: str) -> float:
    """A whole number as an int (a count), anything else as the float it spells; whether it is a
    valid size (not NaN, not negative, a fraction below 1) is checked with every other setting."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a count >= 0 or a fraction in (0, 1), got {text}"
        ) from None
    return int(value) if math.isfinite(value) and value == int(value) else value


def run(args: argparse.Namespace) -> int:
    """The ``train`` subcommand: :func:`train` with the parsed options; 1 if the loss diverged."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    try:
        train(**given)  # keyword settings count as asked for (see train's docstring)
    except NonFiniteLossError as err:
        print(f"densenet-efficient train: {err}", file=sys.stderr)
        return 1
    return 0
