"""Every setting of a training run, its data-dependent defaults and their validation.

>>> c = resolve_config(TrainConfig(n_epochs=2), "digits")
>>> c.depth, c.lr, c.mode
(22, 0.1, 'efficient')
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.nn as nn

from ..errors import UsageError, check_int, shown
from ..models import engine
from ..models.config import ArchConfig, densenet_bc_config, list_architectures, resolve_arch
from ..models.planner.units import parse_memory
from .data import DATA_DEFAULTS, DATASETS, detect_dataset

__all__ = [
    "DEFAULT_MODE",
    "RUNTIME_FIELDS",
    "NonFiniteLossError",
    "TrainConfig",
    "TrainResult",
    "check_settings",
    "describe_default",
    "given_fields",
    "lr_milestones",
    "resolve_config",
    "resume_config",
]

#: Execution mode of the dense blocks when none is asked for.
DEFAULT_MODE = engine.EFFICIENT

#: Used where :data:`.data.DATA_DEFAULTS` gives a data set no value of its own.
_FALLBACKS: dict[str, Any] = {"depth": 100, "n_epochs": 300, "workers": min(4, os.cpu_count() or 1)}
#: The initial learning rate: the original demo's from scratch, ten times smaller to fine-tune.
DEFAULT_LR, PRETRAINED_LR = 0.1, 0.01

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

    ``None`` means "the default for this data": see :data:`.data.DATA_DEFAULTS` and
    :func:`describe_default`; :func:`check_settings` says what each field accepts.
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
    # integer arithmetic: the same epochs as int(0.5 * n) and int(0.75 * n), without a float that
    # overflows for a count beyond 1e308
    return [max(1, n_epochs // 2), max(1, 3 * n_epochs // 4)]


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
    if name == "memory" and isinstance(asked, str) and isinstance(stored, str) and "auto" not in (asked, stored):
        return parse_memory(asked) == parse_memory(stored)  # one budget: "100MiB", "104857600"
    if name == "data" and asked is not None and stored is not None:
        return Path(asked).expanduser().resolve() == Path(stored).expanduser().resolve()
    if name == "dataset" and stored == "auto" and stored_config.data is not None:
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
        elif name == "mode" and stored.memory is not None:
            # the run's --memory chose its plan; its stored mode is the unused default, not what it runs
            refused.append(f"--mode {value} (the run's plan comes from --memory {stored.memory})")
        elif not _same_setting(name, value, kept, stored):
            refused.append(f"--{name.replace('_', '-')} {value} (the run has {kept})")
    if refused:
        raise UsageError(
            f"--resume continues the run in {asked.save} with its own settings, but "
            f"{'; '.join(refused)} would change its numbers; drop "
            f"{'it' if len(refused) == 1 else 'them'}, or start a new run (another --save, or --overwrite)"
        )
    return dataclasses.replace(stored, **changes), notices


def describe_default(name: str) -> str:
    """A setting's default in words, for ``--help``: read from :class:`TrainConfig` and
    :data:`.data.DATA_DEFAULTS`, so the help never states a default the code does not use.

    >>> describe_default("depth"), describe_default("momentum")
    ('22 for digits, 100 for CIFAR and ImageFolders', '0.9')
    """
    if name == "lr":
        return f"{DEFAULT_LR}; {PRETRAINED_LR} with --pretrained"
    if not any(name in d for d in DATA_DEFAULTS.values()):
        value = getattr(TrainConfig(), name)
        return ("on" if value else "off") if isinstance(value, bool) else str(value)
    names = {"digits": "digits", "cifar10": "CIFAR", "cifar100": "CIFAR", "imagefolder": "ImageFolders"}
    by_value: dict[Any, list[str]] = {}
    for dataset, defaults in DATA_DEFAULTS.items():
        value = defaults.get(name, _FALLBACKS.get(name))
        if value is not None and names[dataset] not in by_value.setdefault(value, []):
            by_value[value].append(names[dataset])
    return ", ".join(f"{value} for {' and '.join(where)}" for value, where in by_value.items())


# -- what each setting accepts ----------------------------------------------------------------------

#: The largest --workers (each is a process) and --image-size (a 3 x 8192 x 8192 float image is 800 MB).
MAX_WORKERS, MAX_IMAGE_SIZE = 256, 8192
_MAX_SEED = 2**63 - 1  # torch seeds are 64-bit; the sampler adds the epoch to the seed
#: The largest batch: the DataLoader's batch sampler slices its indices with ``itertools.islice``,
#: which refuses a stop beyond ``sys.maxsize`` (a ValueError traceback in the first epoch). A batch
#: above the training set is the whole set; this only bounds the number.
_MAX_BATCH = 2**63 - 1


def _flag(value: Any, label: str) -> Any:
    if not isinstance(value, bool):
        raise UsageError(f"{label} must be true or false, found {shown(value)}")
    return value


def _text(value: Any, label: str) -> Any:
    if value is not None and not isinstance(value, (str, os.PathLike)):
        raise UsageError(f"{label} must be a string, found {shown(value)}")
    return value


def _number(low: float, high: float | None = None, *, above: bool = False):
    """A check for a finite real number in ``[low, high)`` (``(low, high)`` when ``above``)."""
    interval = f"{'(' if above else '['}{low}, {'inf' if high is None else high})"

    def check(value: Any, label: str) -> Any:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or not (value > low if above else value >= low) or (high is not None and value >= high):
            raise UsageError(f"{label} must be a finite number in {interval}, found {shown(value)}")
        return value

    return check


#: The largest float32: the optimiser multiplies float32 parameters by the rates, so a larger one
#: is infinity at the first step (and the run would fail there, after its folder was made).
_FLOAT32_MAX = 3.4028234663852886e38


def _float32(check: Callable[[Any, str], Any]) -> Callable[[Any, str], Any]:
    """``check``, then refuse a value float32 cannot hold."""

    def checked(value: Any, label: str) -> Any:
        check(value, label)
        if value is not None and abs(value) > _FLOAT32_MAX:
            raise UsageError(
                f"{label} must be at most {_FLOAT32_MAX:.8g} (the largest float32, the parameters' type), "
                f"found {shown(value)}"
            )
        return value

    return checked


def _integer(minimum: int, maximum: int | None = None, *, optional: bool = False, also: tuple = ()):
    def check(value: Any, label: str) -> Any:
        if (optional and value is None) or (value in also and isinstance(value, str)):
            return value
        return check_int(value, label, minimum, maximum)

    return check


def _at_most(maximum: int, check: Callable[[Any, str], Any]) -> Callable[[Any, str], Any]:
    """``check``, then refuse an integer above ``maximum``."""

    def checked(value: Any, label: str) -> Any:
        check(value, label)
        if isinstance(value, int) and value > maximum:
            raise UsageError(f"{label} must be at most {maximum}, found {shown(value)}")
        return value

    return checked


def _choice(options: tuple[Any, ...]):
    def check(value: Any, label: str) -> Any:
        if not any(value is o or (isinstance(value, str) and value == o) for o in options):
            raise UsageError(f"{label} must be one of {', '.join(map(str, options))}, found {shown(value)}")
        return value

    return check


def _valid_size(value: Any, label: str) -> Any:
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return value
    if isinstance(value, float) and math.isfinite(value) and (0 < value < 1 or value == 0):
        return value
    raise UsageError(f"{label} must be a count >= 0 or a fraction in (0, 1), found {shown(value)}")


def _memory(value: Any, label: str) -> Any:
    if value is None or value == "auto":
        return value
    if not isinstance(value, str):
        raise UsageError(f"{label} must be a size such as 4GiB, or auto, found {shown(value)}")
    try:  # a malformed budget is refused before any data is read, naming where it came from
        parse_memory(value)
    except UsageError as err:
        raise UsageError(f"{label} must be a size such as 4GiB, or auto, found {shown(value)} ({err})") from None
    return value


def _mode(value: Any, label: str) -> Any:
    if not isinstance(value, (str, bool)):
        raise UsageError(f"{label} must be one of {', '.join(engine.MODES)}, found {shown(value)}")
    try:
        return engine.resolve_mode(value)
    except UsageError:
        raise UsageError(f"{label} must be one of {', '.join(engine.MODES)}, found {shown(value)}") from None


#: What every field of :class:`TrainConfig` accepts: a check ``(value, label) -> value`` that
#: raises a :class:`UsageError` saying so. One table for the options, the API and the settings a
#: checkpoint stores (a file users may edit).
_CHECKS: dict[str, Callable[[Any, str], Any]] = {
    "dataset": _choice(DATASETS),
    "data": _text,
    "valid_size": _valid_size,
    "download": _flag,
    "image_size": _integer(1, MAX_IMAGE_SIZE, optional=True),
    "arch": _text,
    "depth": _integer(10, optional=True),
    "growth_rate": _integer(1),
    "drop_rate": _number(0, 1),
    "mode": _mode,
    "pretrained": _flag,
    "freeze_features": _flag,
    "n_epochs": _integer(1, optional=True),
    "batch_size": _at_most(_MAX_BATCH, _integer(1, also=("auto",))),
    "accum_steps": _integer(1),
    "lr": _float32(lambda v, label: v if v is None else _number(0, above=True)(v, label)),
    "momentum": _number(0, 1),
    "weight_decay": _float32(_number(0)),
    "seed": _integer(0, _MAX_SEED),
    "memory": _memory,
    "amp": _choice((None, "bf16", "fp16")),
    "channels_last": _flag,
    "compile": _flag,
    "sync_bn": _flag,
    "deterministic": _flag,
    "workers": _integer(0, MAX_WORKERS, optional=True),
    "device": _text,
    "save": _text,
    "resume": _flag,
    "overwrite": _flag,
    "stop_after": _integer(1, optional=True),
    "progress": _flag,
}


def _option(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def check_settings(settings: Mapping[str, Any], label: Callable[[str], str] = _option) -> None:
    """Check every setting's type and range (see :data:`_CHECKS`) before anything is built.

    ``settings`` is a :class:`TrainConfig`'s ``to_dict()`` or a checkpoint's stored config;
    ``label(name)`` says where a value came from in the error (default: the option, ``--lr``).

    >>> check_settings({"lr": -0.1})
    Traceback (most recent call last):
    ...
    densenet_efficient.errors.UsageError: --lr must be a finite number in (0, inf), found -0.1
    """
    for name, value in settings.items():
        if name in _CHECKS:
            _CHECKS[name](value, label(name))


def _arch_config(c: TrainConfig) -> ArchConfig:
    """The architecture ``c`` names (its classifier width aside), checked."""
    if c.arch is None:
        return densenet_bc_config(c.depth, c.growth_rate)  # validates depth = 6n+4 with a clear message
    if c.arch not in list_architectures():
        raise UsageError(
            f"unknown architecture {shown(c.arch)}; expected one of {', '.join(list_architectures())}"
        )
    return resolve_arch(c.arch)


def resolve_config(
    config: TrainConfig,
    dataset: str,
    *,
    given: frozenset[str] = frozenset(),
    save_dir: str | os.PathLike | None = None,
) -> TrainConfig:
    """Fill the data-dependent defaults and check the settings before anything is read or written.

    ``given`` names the settings the caller asked for (see :func:`given_fields`) and ``save_dir``
    is the run folder, when known: both are needed to refuse contradictory requests.
    """
    check_settings(config.to_dict())
    c = copy.copy(config)
    defaults = {**_FALLBACKS, **DATA_DEFAULTS.get(dataset, {})}
    if c.arch is None and c.depth is None:
        c.depth = defaults["depth"]
    if c.arch is not None and c.depth is not None:
        raise UsageError(f"--arch {c.arch} and --depth {c.depth} both given; choose one")
    arch = _arch_config(c)
    if c.arch is None and c.pretrained:
        raise UsageError("--pretrained needs --arch (weights are published per named architecture)")
    if c.n_epochs is None:
        c.n_epochs = defaults["n_epochs"]
    if c.lr is None:
        c.lr = PRETRAINED_LR if c.pretrained else DEFAULT_LR
    if c.workers is None:
        c.workers = defaults["workers"]
    if c.image_size is not None:
        if dataset != "imagefolder":
            raise UsageError(
                f"--image-size {c.image_size} applies to ImageFolders; the {dataset} images are 32x32 "
                "and are not resized (drop --image-size)"
            )
        if c.image_size < arch.min_input_size():
            raise UsageError(
                f"--image-size {c.image_size} is below the smallest input {arch.name} accepts "
                f"({arch.min_input_size()} pixels)"
            )
    if {"memory", "mode"} <= given and not c.resume:
        raise UsageError(
            f"--memory {c.memory} and --mode {c.mode} both given: --memory chooses the memory "
            "plan (the mode of each block) for the budget; give one of them"
        )
    data_dir = Path(c.data).expanduser().resolve() if c.data is not None else None
    if (
        dataset == "imagefolder"
        and data_dir
        and save_dir
        and Path(save_dir).resolve().is_relative_to(data_dir)
    ):
        raise UsageError(
            f"--save {save_dir} is inside --data {c.data}: the run folder would be read as a "
            "class of images (or as images of one); save the run outside the data folder"
        )
    c.mode = engine.resolve_mode(c.mode)
    return c
