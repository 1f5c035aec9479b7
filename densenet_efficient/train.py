"""``densenet-efficient train``: train a DenseNet-BC, or fine-tune a pretrained DenseNet.

Replaces the original efficient-DenseNet demo (same options and defaults for CIFAR) and adds
fine-tuning, resumable checkpoints, mixed precision and multi-GPU training through ``torchrun``.

    densenet-efficient train                                   # embedded digits, a few CPU minutes
    densenet-efficient train --dataset cifar10 --data ~/data --save runs/bc100 --depth 100
    densenet-efficient train --save runs/bc100 --resume        # continue a stopped run
    densenet-efficient train --arch densenet121 --pretrained --data ~/flowers --freeze-features
    torchrun --nproc_per_node 4 -m densenet_efficient train --dataset cifar10 --data ~/data

Python::

    from densenet_efficient.train import TrainConfig, train
    result = train(TrainConfig(depth=16, n_epochs=5, save="runs/tiny"))
    print(result.best_valid_error)

A save directory holds ``checkpoint.pt`` (everything needed to resume, rewritten atomically each
epoch), ``log.csv`` (one row per epoch), and ``best/`` and ``last/`` Hugging Face-ready model
folders that :func:`densenet_efficient.from_pretrained` loads.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import dataclasses
import io
import math
import os
import random
import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from . import engine
from .data import DATASETS, DataBundle, TransformedSubset, build_data, detect_dataset
from .hub import save_hub_folder
from .models import DenseNet, create_model, densenet_bc
from .registry import densenet_bc_config, list_architectures

__all__ = [
    "CHECKPOINT_NAME",
    "LOG_COLUMNS",
    "NonFiniteLossError",
    "TrainConfig",
    "TrainResult",
    "configure_parser",
    "load_checkpoint",
    "run",
    "train",
]

CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "log.csv"
LOG_COLUMNS = (
    "epoch",
    "train_loss",
    "train_error",
    "valid_loss",
    "valid_error",
    "lr",
    "epoch_seconds",
    "peak_memory_mb",
)
_CHECKPOINT_FORMAT = "densenet_efficient.train/1"

#: Execution mode of the dense blocks when none is asked for.
DEFAULT_MODE = engine.EFFICIENT

# Defaults that depend on the data: the CIFAR ones are the original demo's; the digits ones give a
# run of a few minutes on a 2-core laptop CPU; fine-tuning uses a smaller learning rate.
_DATA_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": {"depth": 22, "n_epochs": 15, "workers": 0},
    "cifar10": {"depth": 100, "n_epochs": 300},
    "cifar100": {"depth": 100, "n_epochs": 300},
    "imagefolder": {"n_epochs": 30},
}

# Fields a resumed run may change: they affect speed and output, never the numbers computed.
_RUNTIME_FIELDS = frozenset({"resume", "workers", "progress", "stop_after", "device", "overwrite"})

# The loss, as a module attribute so tests can inject non-finite values.
_loss_fn = F.cross_entropy


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainConfig:
    """Every setting of a training run (the ``train`` subcommand's options, same names).

    ``None`` means "the default for this data": see :data:`_DATA_DEFAULTS`.
    """

    # data
    dataset: str = "auto"
    data: str | None = None
    valid_size: float | None = None
    download: bool = True
    image_size: int | None = None
    # model
    arch: str | None = None
    depth: int | None = None
    growth_rate: int = 12
    drop_rate: float = 0.0
    mode: str = DEFAULT_MODE
    pretrained: bool = False
    freeze_features: bool = False
    # optimisation (the original demo's: SGD + Nesterov, LR x0.1 at 50% and 75% of the epochs)
    n_epochs: int | None = None
    batch_size: int = 64
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 1e-4
    seed: int = 0
    # performance
    amp: str | None = None
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = False
    deterministic: bool = False
    workers: int | None = None
    device: str | None = None
    # output
    save: str | None = None
    resume: bool = False
    overwrite: bool = False
    stop_after: int | None = None
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    """What :func:`train` returns (rank 0 has the full picture; other ranks the same numbers)."""

    save_dir: Path
    epochs_completed: int
    finished: bool  # False when stopped early by ``stop_after``
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int | None = None
    best_valid_error: float | None = None
    test_loss: float | None = None
    test_error: float | None = None
    model: nn.Module | None = None  # the last model (unwrapped), on its training device


# -- CLI --------------------------------------------------------------------------------------------


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``train`` options to ``parser`` (called by :mod:`densenet_efficient.cli`)."""
    d = TrainConfig()
    g = parser.add_argument_group("data")
    g.add_argument(
        "--dataset",
        choices=DATASETS,
        default=d.dataset,
        help="auto: digits without --data, CIFAR if DIR holds it, else an ImageFolder",
    )
    g.add_argument("--data", metavar="DIR", help="data directory (none: the embedded digits set)")
    g.add_argument(
        "--valid-size",
        type=_count_or_fraction,
        metavar="N",
        help="training images held out for validation: a count or a fraction "
        "(default 5000 for CIFAR, 0.1 otherwise; 0 for CIFAR validates on the test set)",
    )
    g.add_argument(
        "--download",
        action=argparse.BooleanOptionalAction,
        default=d.download,
        help="download CIFAR when missing (needs network access)",
    )
    g.add_argument(
        "--image-size",
        type=int,
        metavar="PX",
        help="ImageFolder crop size (default: the pretrained weights' preset, else 224)",
    )
    g = parser.add_argument_group("model")
    g.add_argument(
        "--arch",
        help=f"a named architecture ({', '.join(list_architectures())}); default: DenseNet-BC of --depth",
    )
    g.add_argument("--depth", type=int, help="DenseNet-BC depth, 6n+4 (default 100 for CIFAR, 22 for digits)")
    g.add_argument("--growth-rate", type=int, default=d.growth_rate)
    g.add_argument("--drop-rate", type=float, default=d.drop_rate)
    g.add_argument(
        "--mode",
        "--memory-efficient",
        dest="mode",
        choices=engine.MODES,
        default=d.mode,
        help=f"how dense blocks execute (default {d.mode})",
    )
    g.add_argument(
        "--pretrained", action="store_true", help="start from the architecture's published weights"
    )
    g.add_argument("--freeze-features", action="store_true", help="train only the classifier")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--n-epochs", type=int, help="default 300 for CIFAR, 15 for digits, 30 for ImageFolders")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="per process")
    g.add_argument("--lr", type=float, help="initial learning rate (default 0.1; 0.01 with --pretrained)")
    g.add_argument("--momentum", type=float, default=d.momentum)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--seed", type=int, default=d.seed)
    g = parser.add_argument_group("performance")
    g.add_argument("--amp", choices=("bf16", "fp16"), help="mixed precision (fp16 needs CUDA)")
    g.add_argument("--channels-last", action="store_true")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm under torchrun (naive mode only)")
    g.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms")
    g.add_argument("--workers", type=int, help="DataLoader worker processes")
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


def _count_or_fraction(text: str) -> float:
    value = float(text)
    if value < 0 or (value >= 1 and value != int(value)):
        raise argparse.ArgumentTypeError(f"expected a count >= 0 or a fraction in (0, 1), got {text}")
    return int(value) if value >= 1 or value == 0 else value


def run(args: argparse.Namespace) -> int:
    """The ``train`` subcommand: :func:`train` with the parsed options; 1 if the loss diverged."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    try:
        train(config)
    except NonFiniteLossError as err:
        print(f"densenet-efficient train: {err}", file=sys.stderr)
        return 1
    return 0


# -- distributed ------------------------------------------------------------------------------------


@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device_arg: str | None) -> tuple[_Dist, torch.device]:
    """Join the process group that ``torchrun`` describes in the environment (if any)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist(), _pick_device(device_arg)
    info = _Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    cuda = torch.cuda.is_available() and not (device_arg or "").startswith("cpu")
    device = torch.device("cuda", info.local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return info, device


def _pick_device(device_arg: str | None) -> torch.device:
    if device_arg:
        device = torch.device(device_arg)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {device_arg} asked for, but CUDA is not available here")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _all_reduce(values: list[float], info: _Dist, device: torch.device) -> list[float]:
    if not info.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# -- checkpoints ------------------------------------------------------------------------------------


def _atomic_write(path: Path, write) -> None:
    """Write ``path`` through a temporary file in the same folder, then rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _rng_state() -> dict[str, Any]:
    """Every RNG state as tensors and plain types, so the checkpoint loads with ``weights_only``."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": [version, list(internal), gauss_next],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a training checkpoint safely (``weights_only=True``) and check it is one.

    Raises ``ValueError`` naming the file when it is truncated, corrupt or something else.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint to resume from: {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated zip, bad pickle, disallowed global: all mean "not usable"
        raise ValueError(
            f"checkpoint {path} is corrupt or not a densenet-efficient training checkpoint "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from None
    needed = ("format", "epoch", "model", "optimizer", "scheduler", "config", "rng", "history")
    if (
        not isinstance(ckpt, dict)
        or ckpt.get("format") != _CHECKPOINT_FORMAT
        or any(k not in ckpt for k in needed)
    ):
        raise ValueError(
            f"checkpoint {path} is not a densenet-efficient training checkpoint "
            f"(expected format {_CHECKPOINT_FORMAT!r} with keys {', '.join(needed)})"
        )
    return ckpt


def _write_log(path: Path, history: list[dict[str, float]]) -> None:
    """Rewrite the whole CSV from the history (so a resumed run never duplicates rows)."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=LOG_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    _atomic_write(path, lambda f: f.write(text.getvalue().encode()))


def _save_model_folder(model: DenseNet, out_dir: Path, provenance: dict[str, Any]) -> None:
    """Save ``model`` as a Hugging Face-ready folder (safetensors + config.json + model card),
    atomically, loadable by :func:`densenet_efficient.from_pretrained`."""
    save_hub_folder(model, out_dir, provenance=provenance, overwrite=True)


# -- building blocks --------------------------------------------------------------------------------


def _resolve(config: TrainConfig, dataset: str) -> TrainConfig:
    """Fill the data-dependent defaults and check the settings before anything is read or written."""
    c = copy.copy(config)
    defaults = _DATA_DEFAULTS.get(dataset, {})
    if c.arch is None and c.depth is None:
        c.depth = defaults.get("depth", 100)
    if c.arch is not None:
        if c.depth is not None:
            raise ValueError(f"--arch {c.arch} and --depth {c.depth} both given; choose one")
        if c.arch not in list_architectures():
            raise ValueError(
                f"unknown architecture {c.arch!r}; expected one of {', '.join(list_architectures())}"
            )
    else:
        densenet_bc_config(c.depth, c.growth_rate)  # validates depth = 6n+4 with a clear message
        if c.pretrained:
            raise ValueError("--pretrained needs --arch (weights are published per named architecture)")
    if c.n_epochs is None:
        c.n_epochs = defaults.get("n_epochs", 300)
    if c.lr is None:
        c.lr = 0.01 if c.pretrained else 0.1
    if c.workers is None:
        c.workers = defaults.get("workers", min(4, os.cpu_count() or 1))
    for name in ("n_epochs", "batch_size"):
        if getattr(c, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(c, name)}")
    if c.stop_after is not None and c.stop_after < 1:
        raise ValueError(f"--stop-after must be >= 1, got {c.stop_after}")
    c.mode = engine.resolve_mode(c.mode)
    if c.sync_bn and c.mode != engine.NAIVE:
        raise ValueError(
            f"--sync-bn works only with --mode naive: the {c.mode} engine computes batch statistics "
            "per process and does not support SyncBatchNorm"
        )
    if c.amp not in (None, "bf16", "fp16"):
        raise ValueError(f"--amp must be bf16 or fp16, got {c.amp!r}")
    return c


def _build_model(c: TrainConfig, num_classes: int) -> DenseNet:
    kwargs = {"num_classes": num_classes, "memory_efficient": c.mode, "drop_rate": c.drop_rate}
    if c.arch is None:
        return densenet_bc(c.depth, c.growth_rate, **kwargs)
    # With pretrained weights, the builder loads everything but the classifier when the class count
    # differs, and leaves the classifier freshly initialised for the new classes.
    return create_model(c.arch, pretrained=c.pretrained, progress=c.progress, **kwargs)


def _weights_preset(c: TrainConfig) -> Any:
    """The pretrained weights' eval transforms (``spec.transforms()``), or None."""
    if not c.pretrained:
        return None
    from .weights import resolve_weights

    spec = resolve_weights(c.arch, None, True)
    transforms = getattr(spec, "transforms", None)
    return transforms() if callable(transforms) else None


def _loader(
    dataset: Dataset, c: TrainConfig, info: _Dist, *, shuffle: bool, device: torch.device
) -> tuple[DataLoader, DistributedSampler | None]:
    if shuffle:
        # A DistributedSampler even on one process: it reshuffles from (seed, epoch), so a resumed
        # run sees exactly the order an uninterrupted one would.
        sampler = DistributedSampler(
            dataset, info.world_size, info.rank, shuffle=True, seed=c.seed, drop_last=info.enabled
        )
    else:
        # Evaluation: each rank takes every world_size-th image, no padding, sums reduced later.
        if info.enabled:
            dataset = TransformedSubset(dataset, range(info.rank, len(dataset), info.world_size), None)
        sampler = None
    loader = DataLoader(
        dataset,
        batch_size=c.batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=c.workers,
        pin_memory=device.type == "cuda",
        drop_last=False,
        generator=torch.Generator(),
        persistent_workers=False,
    )
    return loader, sampler


def _autocast(c: TrainConfig, device: torch.device):
    if c.amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if c.amp == "bf16" else torch.float16)


def _peak_memory_mb(device: torch.device) -> float:
    """GPU: peak allocated tensor memory this epoch. CPU: the process's peak RSS so far."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _seed_epoch(seed: int, epoch: int, rank: int, loader: DataLoader) -> None:
    """Seed every RNG from (seed, epoch, rank) and the augmentation from (seed, epoch, image): an
    epoch then does not depend on how the run got there (resumed or not, how many workers)."""
    s = (seed * 1_000_003 + epoch * 1_009 + rank) % 2**31
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)
    loader.generator.manual_seed(s)  # worker base seeds
    if isinstance(loader.dataset, TransformedSubset):
        loader.dataset.set_seed((seed * 1_000_003 + epoch) % 2**31)


def _batches(
    loader: DataLoader, device: torch.device, channels_last: bool
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for x, y in loader:
        yield (x.to(device, non_blocking=True, memory_format=fmt), y.to(device, non_blocking=True))


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: DataLoader, device: torch.device, c: TrainConfig, info: _Dist
) -> tuple[float, float]:
    """``(mean loss, error rate)`` of ``model`` over ``loader`` (all ranks' shards together)."""
    model.eval()
    loss_sum = err_sum = count = 0.0
    for x, y in _batches(loader, device, c.channels_last):
        with _autocast(c, device):
            out = model(x)
        loss_sum += float(F.cross_entropy(out.float(), y, reduction="sum"))
        err_sum += float((out.argmax(1) != y).sum())
        count += y.numel()
    loss_sum, err_sum, count = _all_reduce([loss_sum, err_sum, count], info, device)
    return loss_sum / max(count, 1), err_sum / max(count, 1)


# -- the training run -------------------------------------------------------------------------------


def train(config: TrainConfig | None = None, **overrides: Any) -> TrainResult:
    """Run (or resume) training as ``config`` describes; see the module docstring.

    >>> result = train(depth=10, n_epochs=1, save="runs/doc", progress=False)  # doctest: +SKIP
    >>> result.epochs_completed  # doctest: +SKIP
    1

    Raises ``ValueError``/``FileNotFoundError``/``FileExistsError`` for bad settings or data
    (before anything is written) and :class:`NonFiniteLossError` if the loss diverges.
    """
    config = dataclasses.replace(config or TrainConfig(), **overrides)
    info, device = _init_distributed(config.device)
    try:
        return _train(config, info, device)
    finally:
        if info.enabled and dist.is_initialized():
            dist.destroy_process_group()


def _train(config: TrainConfig, info: _Dist, device: torch.device) -> TrainResult:
    save_dir = Path(
        config.save
        or f"runs/{config.dataset if config.data is None else Path(config.data).name}-"
        f"{time.strftime('%Y%m%d-%H%M%S')}"
    )
    ckpt_path = save_dir / CHECKPOINT_NAME
    ckpt = None
    if config.resume:
        ckpt = load_checkpoint(ckpt_path)
        stored = TrainConfig(**ckpt["config"])
        # The checkpoint's settings win, except those that do not change the numbers.
        config = dataclasses.replace(
            stored, **{k: getattr(config, k) for k in _RUNTIME_FIELDS}, save=str(save_dir)
        )
    elif ckpt_path.exists() and not config.overwrite:
        raise FileExistsError(
            f"{save_dir} already holds a training run ({CHECKPOINT_NAME}); pass --resume to continue it "
            "or --overwrite to start again"
        )

    dataset = config.dataset
    if dataset == "auto":
        dataset = detect_dataset(config.data)
    c = _resolve(config, dataset)
    if c.amp == "fp16" and device.type != "cuda":
        raise ValueError("--amp fp16 needs a CUDA GPU (it relies on GradScaler); on CPU use --amp bf16")
    if c.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    torch.manual_seed(c.seed)
    data: DataBundle = build_data(
        dataset,
        c.data,
        valid_size=c.valid_size,
        seed=c.seed,
        download=c.download and info.main,
        preset=_weights_preset(c),
        image_size=c.image_size,
    )
    if info.enabled and dataset in ("cifar10", "cifar100") and c.download:
        dist.barrier()  # rank 0 downloaded; the others can read now
    torch.manual_seed(c.seed)  # same initial weights on every rank and for every data set
    model = _build_model(c, data.num_classes).to(device)
    if c.freeze_features:
        model.features.requires_grad_(False)
    if c.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if c.sync_bn and info.enabled:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        params, lr=c.lr, momentum=c.momentum, nesterov=c.momentum > 0, weight_decay=c.weight_decay
    )
    milestones = [int(0.5 * c.n_epochs), int(0.75 * c.n_epochs)]
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
    scaler = torch.amp.GradScaler(device.type, enabled=c.amp == "fp16")

    start_epoch, history, best = 0, [], _Best()
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        _set_rng_state(ckpt["rng"])
        start_epoch, history = int(ckpt["epoch"]), list(ckpt["history"])
        best = _Best(ckpt.get("best_valid_error"), ckpt.get("best_epoch"), ckpt.get("best_model"))

    net: nn.Module = model
    if info.enabled:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if c.compile:
        net = torch.compile(net)

    train_loader, sampler = _loader(data.train, c, info, shuffle=True, device=device)
    valid_loader = _loader(data.valid, c, info, shuffle=False, device=device)[0] if data.valid else None
    log = print if info.main else (lambda *a, **k: None)
    if info.main:
        where = f"{device}" + (f" x {info.world_size} processes" if info.enabled else "")
        log(
            f"{model.arch_summary()} mode={c.mode}, {sum(p.numel() for p in model.parameters()):,} "
            f"parameters; {data.name} {data.image_size}x{data.image_size}: {len(data.train)} train / "
            f"{len(data.valid) if data.valid else 0} valid images, {data.num_classes} classes; {where}; "
            f"saving to {save_dir}" + (f" (resuming after epoch {start_epoch})" if ckpt else "")
        )

    provenance = {
        "training": {k: v for k, v in c.to_dict().items() if k not in _RUNTIME_FIELDS},
        "dataset": data.name,
        "classes": data.classes,
    }
    end_epoch = c.n_epochs if c.stop_after is None else min(c.n_epochs, start_epoch + c.stop_after)
    for epoch in range(start_epoch, end_epoch):
        _seed_epoch(c.seed, epoch, info.rank, train_loader)
        sampler.set_epoch(epoch)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        lr = optimizer.param_groups[0]["lr"]
        t0 = time.perf_counter()
        train_loss, train_error = _train_epoch(
            net, model, train_loader, optimizer, scaler, c, info, device, f"epoch {epoch + 1}/{c.n_epochs}"
        )
        scheduler.step()
        valid_loss, valid_error = (
            evaluate(net, valid_loader, device, c, info) if valid_loader else (math.nan, math.nan)
        )
        seconds = time.perf_counter() - t0
        row = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "train_error": train_error,
            "valid_loss": valid_loss,
            "valid_error": valid_error,
            "lr": lr,
            "epoch_seconds": round(seconds, 3),
            "peak_memory_mb": round(_peak_memory_mb(device), 1),
        }
        history.append(row)
        score = valid_error if valid_loader else train_error
        improved = best.update(score, epoch + 1, model)
        log(
            f"epoch {epoch + 1}/{c.n_epochs}: train loss {train_loss:.4f} error {train_error:.4f} | "
            f"valid loss {valid_loss:.4f} error {valid_error:.4f} | lr {lr:g} | {seconds:.1f}s"
        )
        if info.main:
            trainables = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}
            _save_epoch(save_dir, trainables, c, epoch + 1, history, best, improved, provenance)

    finished = end_epoch == c.n_epochs
    result = TrainResult(save_dir, end_epoch, finished, history, best.epoch, best.error, model=model)
    if finished and data.test is not None and data.test is not data.valid:
        if best.state is not None:  # report the test figures of the model selected on validation
            last = {k: v.detach().clone() for k, v in model.state_dict().items()}
            model.load_state_dict(best.state)
        test_loader = _loader(data.test, c, info, shuffle=False, device=device)[0]
        result.test_loss, result.test_error = evaluate(net, test_loader, device, c, info)
        if best.state is not None:
            model.load_state_dict(last)
        log(
            f"test (best model, epoch {best.epoch}): loss {result.test_loss:.4f} "
            f"error {result.test_error:.4f} (accuracy {100 * (1 - result.test_error):.2f}%)"
        )
    elif not finished:
        log(f"stopped after epoch {end_epoch} of {c.n_epochs}; continue with --save {save_dir} --resume")
    return result


def _train_epoch(
    net: nn.Module,
    model: DenseNet,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    c: TrainConfig,
    info: _Dist,
    device: torch.device,
    desc: str,
) -> tuple[float, float]:
    net.train()
    if c.freeze_features:
        model.features.eval()  # frozen features keep their pretrained BN statistics too
    loss_sum = err_sum = count = 0.0
    t0 = time.perf_counter()
    bar = tqdm(
        loader,
        desc=desc,
        unit="batch",
        leave=False,
        disable=not (c.progress and info.main),
        dynamic_ncols=True,
    )
    for x, y in _batches(bar, device, c.channels_last):
        with _autocast(c, device):
            out = net(x)
            loss = _loss_fn(out.float(), y)
        bad = torch.tensor(float(not torch.isfinite(loss.detach()).item()), device=device)
        if info.enabled:  # every rank must stop together, or the others hang in all-reduce
            dist.all_reduce(bad)
        if bad.item():
            raise NonFiniteLossError(
                f"the training loss became {loss.item()} in {desc}; stopping. The last good checkpoint "
                "is kept; try a lower --lr, or --amp bf16 instead of fp16"
            )
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        n = y.numel()
        loss_sum += loss.item() * n
        err_sum += float((out.argmax(1) != y).sum())
        count += n
        bar.set_postfix(
            loss=f"{loss_sum / count:.3f}",
            acc=f"{100 * (1 - err_sum / count):.1f}%",
            img_s=f"{count * info.world_size / (time.perf_counter() - t0):.0f}",
        )
    loss_sum, err_sum, count = _all_reduce([loss_sum, err_sum, count], info, device)
    return loss_sum / count, err_sum / count


@dataclass
class _Best:
    """The model selected on validation error so far: its error, 1-based epoch and CPU weights."""

    error: float | None = None
    epoch: int | None = None
    state: dict[str, torch.Tensor] | None = None

    def update(self, score: float, epoch: int, model: nn.Module) -> bool:
        """Keep ``model`` if ``score`` beats the best so far; return whether it did."""
        if self.error is not None and score >= self.error:
            return False
        self.error, self.epoch = score, epoch
        self.state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        return True


def _save_epoch(
    save_dir: Path,
    trainables: dict[str, Any],
    c: TrainConfig,
    epoch: int,
    history: list[dict[str, Any]],
    best: _Best,
    improved: bool,
    provenance: dict[str, Any],
) -> None:
    """Rank 0, end of an epoch: model folders, the CSV log, then the checkpoint (last, so that a
    checkpoint for epoch e implies everything else of epoch e is on disk).

    ``trainables`` holds the ``model``, ``optimizer``, ``scheduler`` and (AMP) ``scaler``."""
    model, scaler = trainables["model"], trainables["scaler"]
    meta = dict(provenance, epoch=epoch, valid_error=history[-1]["valid_error"])
    _save_model_folder(model, save_dir / "last", meta)
    if improved:
        _save_model_folder(model, save_dir / "best", meta)
    _write_log(save_dir / LOG_NAME, history)
    state = {
        "format": _CHECKPOINT_FORMAT,
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": trainables["optimizer"].state_dict(),
        "scheduler": trainables["scheduler"].state_dict(),
        "scaler": scaler.state_dict() if scaler.is_enabled() else None,
        "rng": _rng_state(),
        "config": c.to_dict(),
        "history": history,
        "best_valid_error": best.error,
        "best_epoch": best.epoch,
        "best_model": best.state,
    }
    _atomic_write(save_dir / CHECKPOINT_NAME, lambda f: torch.save(state, f))
