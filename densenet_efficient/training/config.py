"""Every setting of a training run, its data-dependent defaults and their validation.

>>> c = resolve_config(TrainConfig(n_epochs=2), "digits")
>>> c.depth, c.lr, c.mode
(22, 0.1, 'efficient')
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.nn as nn

from ..errors import UsageError
from ..models import engine
from ..models.config import densenet_bc_config, list_architectures
from ..models.planner.units import parse_memory

__all__ = [
    "DEFAULT_MODE",
    "RUNTIME_FIELDS",
    "NonFiniteLossError",
    "TrainConfig",
    "TrainResult",
    "given_fields",
    "lr_milestones",
    "resolve_config",
    "resume_config",
]

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
RUNTIME_FIELDS = frozenset({"resume", "workers", "progress", "stop_after", "device", "overwrite"})
# Also taken from the resuming invocation: whether CIFAR may be downloaded changes no number (the
# data are checksummed), so it is not worth refusing a resume over.
_RESUME_FREE = RUNTIME_FIELDS | {"download", "save"}


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
    batch_size: int | str = 64  # "auto": the largest that fits --memory (stored resolved)
    accum_steps: int = 1
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 1e-4
    seed: int = 0
    # performance
    memory: str | None = None  # a budget ("4GiB") or "auto": chooses the memory plan (and batch)
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


def lr_milestones(n_epochs: int) -> list[int]:
    """Epochs after which the learning rate is multiplied by 0.1: the original demo's 50% and 75%.

    Never epoch 0, so that the first epoch runs at ``--lr`` whatever the epoch count (with one
    epoch, ``int(0.5)`` would make both milestones 0 and the only epoch run at ``lr / 100``).

    >>> lr_milestones(300), lr_milestones(1)
    ([150, 225], [1, 1])
    """
    return [max(1, int(0.5 * n_epochs)), max(1, int(0.75 * n_epochs))]


def given_fields(config: TrainConfig | None, overrides: dict[str, Any]) -> frozenset[str]:
    """The settings a caller asked for: ``overrides`` (keyword arguments, the command line's
    options) and the fields of ``config`` that differ from :class:`TrainConfig`'s defaults."""
    given = set(overrides)
    if config is not None:
        defaults = TrainConfig()
        given |= {
            f.name
            for f in dataclasses.fields(TrainConfig)
            if getattr(config, f.name) != getattr(defaults, f.name)
        }
    return frozenset(given)


def _same_setting(name: str, asked: Any, stored: Any, stored_config: TrainConfig) -> bool:
    """Whether asking for ``asked`` on resume means the run's ``stored`` value."""
    if asked == stored:
        return True
    if name == "batch_size" and asked == "auto":
        return True  # the run's batch was resolved once (from auto or not) and stays
    if name == "data" and asked is not None and stored is not None:
        return Path(asked).expanduser().resolve() == Path(stored).expanduser().resolve()
    if name == "dataset" and stored == "auto" and stored_config.data is not None:
        from .data import detect_dataset  # same layer; imported late as data imports torchvision

        with contextlib.suppress(OSError, UsageError):
            return asked == detect_dataset(stored_config.data)
    return False


def resume_config(
    stored: TrainConfig, asked: TrainConfig, given: frozenset[str], completed: int
) -> tuple[TrainConfig, list[str]]:
    """The settings a resumed run continues with, and notices to log about what changed.

    The checkpoint's settings win, except runtime ones (:data:`RUNTIME_FIELDS`, taken from
    ``asked``). Of the settings that change the numbers, only a larger ``n_epochs`` is honoured
    (training continues; the LR schedule is recomputed for the new length, see
    :func:`lr_milestones`); any other one given (``given``) with a value other than the run's is
    refused with a :class:`UsageError` naming them all, rather than silently ignored.
    """
    changes = {"save": asked.save, **{k: getattr(asked, k) for k in _RESUME_FREE - {"save"}}}
    notices: list[str] = []
    refused = []
    for name in sorted(given - _RESUME_FREE):
        value, kept = getattr(asked, name), getattr(stored, name)
        if name == "n_epochs" and value is not None and value != kept:
            if value <= completed:
                raise UsageError(
                    f"--n-epochs {value} on --resume: the run has already completed {completed} epochs; "
                    f"give more than {completed} to continue it"
                )
            changes["n_epochs"] = value
            notices.append(
                f"--n-epochs {value} (the run had {kept}): training continues to epoch {value}, with the "
                f"LR schedule recomputed for {value} epochs (x0.1 after epochs "
                f"{', '.join(map(str, lr_milestones(value)))})"
            )
        elif not _same_setting(name, value, kept, stored):
            refused.append(f"--{name.replace('_', '-')} {value} (the run has {kept})")
    if refused:
        raise UsageError(
            f"--resume continues the run in {asked.save} with its own settings, but "
            f"{'; '.join(refused)} would change its numbers; drop "
            f"{'it' if len(refused) == 1 else 'them'}, or start a new run (another --save, or --overwrite)"
        )
    return dataclasses.replace(stored, **changes), notices


def resolve_config(config: TrainConfig, dataset: str) -> TrainConfig:
    """Fill the data-dependent defaults and check the settings before anything is read or written."""
    c = copy.copy(config)
    defaults = _DATA_DEFAULTS.get(dataset, {})
    if c.arch is None and c.depth is None:
        c.depth = defaults.get("depth", 100)
    if c.arch is not None:
        if c.depth is not None:
            raise UsageError(f"--arch {c.arch} and --depth {c.depth} both given; choose one")
        if c.arch not in list_architectures():
            raise UsageError(
                f"unknown architecture {c.arch!r}; expected one of {', '.join(list_architectures())}"
            )
    else:
        densenet_bc_config(c.depth, c.growth_rate)  # validates depth = 6n+4 with a clear message
        if c.pretrained:
            raise UsageError("--pretrained needs --arch (weights are published per named architecture)")
    if c.n_epochs is None:
        c.n_epochs = defaults.get("n_epochs", 300)
    if c.lr is None:
        c.lr = 0.01 if c.pretrained else 0.1
    if c.workers is None:
        c.workers = defaults.get("workers", min(4, os.cpu_count() or 1))
    if c.batch_size != "auto" and (isinstance(c.batch_size, str) or c.batch_size < 1):
        raise UsageError(f"--batch-size must be >= 1 or auto, got {c.batch_size!r}")
    for name in ("n_epochs", "accum_steps"):
        if getattr(c, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(c, name)}")
    if c.stop_after is not None and c.stop_after < 1:
        raise UsageError(f"--stop-after must be >= 1, got {c.stop_after}")
    if c.memory not in (None, "auto"):
        parse_memory(c.memory)  # a malformed budget is refused before any data is read
    c.mode = engine.resolve_mode(c.mode)
    if c.sync_bn and c.memory is not None:
        raise UsageError(
            "--sync-bn works only with --mode naive, and --memory chooses an engine plan; drop one"
        )
    if c.sync_bn and c.mode != engine.NAIVE:
        raise UsageError(
            f"--sync-bn works only with --mode naive: the {c.mode} engine computes batch statistics "
            "per process and does not support SyncBatchNorm"
        )
    if c.amp not in (None, "bf16", "fp16"):
        raise UsageError(f"--amp must be bf16 or fp16, got {c.amp!r}")
    return c
