"""The training loop: build the model and data, run epochs, checkpoint, evaluate.

    from densenet_efficient.training import TrainConfig, train
    result = train(TrainConfig(depth=16, n_epochs=5, save="runs/tiny"))
    print(result.best_valid_error)

See :mod:`.checkpoint` for what a run folder holds and :mod:`.config` for every setting.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import math
import os
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from ..errors import UsageError
from ..models.builders import create_model, densenet_bc
from ..models.config import ArchConfig, densenet_bc_config, resolve_arch
from ..models.densenet import DenseNet
from ..models.memory_plan import MemoryPlan
from ..models.parameters import check_model_size
from ..models.sync_batchnorm import convert_sync_batchnorm
from ..models.weights import resolve_weights
from ..perf.measure import peak_rss_bytes
from .budget import BudgetChoice, accumulation_weights, choose_budget
from .checkpoint import (
    CHECKPOINT_NAME,
    BestModel,
    check_resumable,
    check_run_folder,
    read_run_checkpoint,
    restore_training_state,
    save_epoch,
)
from .config import (
    RUNTIME_FIELDS,
    NonFiniteLossError,
    TrainConfig,
    TrainResult,
    check_settings,
    given_fields,
    lr_milestones,
    resolve_config,
    resume_config,
)
from .data import DataBundle, TransformedSubset, build_data, detect_dataset, mix_seed
from .distributed import DistInfo, all_reduce, init_distributed

__all__ = ["evaluate", "train"]

# The loss, as a module attribute so tests can inject non-finite values.
_loss_fn = F.cross_entropy


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
    spec = resolve_weights(c.arch, None, True)
    transforms = getattr(spec, "transforms", None)
    return transforms() if callable(transforms) else None


def _loader(
    dataset: Dataset, c: TrainConfig, info: DistInfo, *, shuffle: bool, device: torch.device
) -> tuple[DataLoader, DistributedSampler | None]:
    drop_last = False
    if shuffle:
        # A DistributedSampler even on one process: it reshuffles from (seed, epoch), so a resumed
        # run sees exactly the order an uninterrupted one would.
        sampler = DistributedSampler(
            dataset, info.world_size, info.rank, shuffle=True, seed=c.seed, drop_last=info.enabled
        )
        if len(sampler) < 2:
            raise UsageError(
                f"training needs at least 2 images per process (batch norm normalises over the batch); "
                f"found {len(dataset)} training image(s) for {info.world_size} process(es)"
            )
        # A final batch of one image cannot be batch-normalised in training mode (one value per
        # channel at the last block's resolution): drop it rather than merge it into the previous
        # batch (which would change the batch size); the sampler reshuffles every epoch, so the
        # image dropped differs from epoch to epoch. Every rank has the same count: same decision.
        drop_last = len(sampler) % c.batch_size == 1
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
        drop_last=drop_last,
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
    return peak_rss_bytes() / 2**20


def _seed_epoch(seed: int, epoch: int, rank: int, loader: DataLoader) -> None:
    """Seed every RNG from (seed, epoch, rank) and the augmentation from (seed, epoch, image): an
    epoch then does not depend on how the run got there (resumed or not, how many workers)."""
    s = mix_seed(seed, epoch * 1_009 + rank)
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)
    loader.generator.manual_seed(s)  # worker base seeds
    if isinstance(loader.dataset, TransformedSubset):
        loader.dataset.set_seed(mix_seed(seed, epoch))


def _batches(
    loader: DataLoader, device: torch.device, channels_last: bool
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for x, y in loader:
        yield (x.to(device, non_blocking=True, memory_format=fmt), y.to(device, non_blocking=True))


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: DataLoader, device: torch.device, c: TrainConfig, info: DistInfo
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
    loss_sum, err_sum, count = all_reduce([loss_sum, err_sum, count], info, device)
    return loss_sum / max(count, 1), err_sum / max(count, 1)


# -- the training run -------------------------------------------------------------------------------


def train(config: TrainConfig | None = None, **overrides: Any) -> TrainResult:
    """Run (or resume) training as ``config`` describes; see the module docstring.

        result = train(depth=10, n_epochs=1, save="runs/doc", progress=False)
        result.epochs_completed
        # 1

    With ``resume=True`` the run continues with the checkpoint's settings. Settings given in
    ``overrides`` or set in ``config`` to other than :class:`TrainConfig`'s defaults count as asked
    for: a larger ``n_epochs`` extends the run (logged), runtime settings apply, and any other
    one that differs from the run's is refused (see :func:`.config.resume_config`).

    Raises ``ValueError``/``FileNotFoundError``/``FileExistsError`` for bad settings or data
    (before anything is written) and :class:`NonFiniteLossError` if the loss diverges.
    """
    given = given_fields(config, overrides)
    config = dataclasses.replace(config or TrainConfig(), **overrides)
    check_settings(config.to_dict())  # types and ranges first: nothing below trusts a value unchecked
    info, device = init_distributed(config.device)
    try:
        with contextlib.ExitStack() as held:  # the run folder's lock, until the run ends
            return _train(config, info, device, given, held)
    finally:
        if info.enabled and dist.is_initialized():
            dist.destroy_process_group()


class _Log:
    """Rank 0's log lines on stdout, which outlive their reader.

    ``densenet-efficient train ... | head -1`` closes the pipe after one line; the next print would
    raise BrokenPipeError and kill the run between two checkpoints. Instead the first failed write
    turns stdout into ``/dev/null`` (so neither a later line nor the interpreter's final flush
    raises again), says so once on stderr, and training goes on: log.csv keeps every epoch."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __call__(self, text: str) -> None:
        if not self.enabled:
            return
        try:
            try:
                print(text, flush=True)
            except UnicodeEncodeError:  # a path the terminal's encoding cannot show: escape it
                encoding = getattr(sys.stdout, "encoding", None) or "ascii"
                print(text.encode(encoding, "backslashreplace").decode(encoding), flush=True)
        except (BrokenPipeError, ValueError):  # ValueError: the stream was closed in this process
            self.enabled = False
            with contextlib.suppress(OSError, ValueError, AttributeError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            with contextlib.suppress(OSError, ValueError):
                print("densenet-efficient train: stdout was closed; training continues, see log.csv",
                      file=sys.stderr, flush=True)  # fmt: skip


@dataclass
class _Run:
    """What one invocation trains: its settings, folder, model, optimisation state and where it runs."""

    c: TrainConfig
    dataset: str
    save_dir: Path
    model: DenseNet
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    info: DistInfo
    device: torch.device
    net: nn.Module | None = None  # what the loop calls: the model, wrapped in DDP / torch.compile
    planned: bool = False  # the memory plan was chosen by --memory (and is checkpointed)
    resumed: bool = False
    log: _Log = dataclasses.field(default_factory=lambda: _Log(False))
    start_epoch: int = 0
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    best: BestModel = dataclasses.field(default_factory=BestModel)


def run_name(config: TrainConfig) -> str:
    """What a run folder is named after: the data set (``digits``, ``cifar10``, ``cifar100``), or an
    ImageFolder's own folder name; never the ``auto`` selector."""
    dataset = _dataset(config)
    if dataset == "imagefolder" and config.data is not None:
        return Path(config.data).expanduser().resolve().name
    return dataset


def _dataset(config: TrainConfig) -> str:
    return detect_dataset(config.data) if config.dataset == "auto" else config.dataset


def _open_run(
    config: TrainConfig, given: frozenset[str]
) -> tuple[TrainConfig, Path, dict[str, Any] | None, os.stat_result | None, list[str]]:
    """The run folder, and with ``resume`` the checkpoint, its ``os.stat`` from before it was read
    (the run folder's lock checks it is still that file) and the settings it continues with
    (:func:`.config.resume_config`), plus notices about settings the resume changed."""
    save_dir = Path(config.save or f"runs/{run_name(config)}-{time.strftime('%Y%m%d-%H%M%S')}")
    ckpt_path = save_dir / CHECKPOINT_NAME
    if config.resume:
        read_stat = os.stat(ckpt_path) if os.path.exists(ckpt_path) else None
        ckpt = read_run_checkpoint(ckpt_path)  # refuses a missing one; type-checks every stored setting
        asked = dataclasses.replace(config, save=str(save_dir))
        config, notices = resume_config(TrainConfig(**ckpt["config"]), asked, given, ckpt["epoch"])
        return config, save_dir, ckpt, read_stat, notices
    if ckpt_path.exists() and not config.overwrite:
        raise FileExistsError(
            f"{save_dir} already holds a training run ({CHECKPOINT_NAME}); pass --resume to continue it "
            "or --overwrite to start again"
        )
    return config, save_dir, None, None, []


def _configure_backends(c: TrainConfig, device: torch.device) -> None:
    if c.amp == "fp16" and device.type != "cuda":
        raise UsageError("--amp fp16 needs a CUDA GPU (it relies on GradScaler); on CPU use --amp bf16")
    if c.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def _load_data(c: TrainConfig, dataset: str, info: DistInfo) -> DataBundle:
    torch.manual_seed(c.seed)
    data = build_data(
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
    return data


def _choose_budget(
    c: TrainConfig, data: DataBundle, info: DistInfo, device: torch.device, ckpt: dict[str, Any] | None
) -> tuple[TrainConfig, BudgetChoice | None]:
    """The settings with the batch and the memory plan ``--memory``/``--batch-size auto`` choose
    (before the model is built), and the choice; ``(c, None)`` when neither is asked for.

    A resumed run keeps the plan its checkpoint stored (its batch is already the stored one): the
    same run continues with the same computation, whatever memory the device has free today."""
    if c.memory is None and c.batch_size != "auto":
        return c, None
    stored_plan = ckpt.get("memory_plan") if ckpt is not None else None
    if stored_plan is not None:  # type-checked by read_run_checkpoint
        plan = MemoryPlan.from_json(stored_plan)
        choice = BudgetChoice(plan.budget or 0, int(c.batch_size), plan, "the run's stored plan")
    else:
        choice = choose_budget(
            _arch_config(c, data.num_classes),
            memory=c.memory,
            batch_size=c.batch_size,
            accum_steps=c.accum_steps,
            image_size=data.image_size,
            amp=c.amp,
            # the loop's SGD keeps one momentum buffer per parameter (none without momentum)
            optimizer="momentum" if c.momentum else "sgd",
            train_images=len(data.train),
            device=device,
            info=info,
            sync_bn=c.sync_bn,
            channels_last=c.channels_last,
            drop_rate=c.drop_rate,
            freeze_features=c.freeze_features,
        )
    return dataclasses.replace(c, batch_size=choice.batch_size, memory=c.memory or "auto"), choice


def _arch_config(c: TrainConfig, num_classes: int) -> ArchConfig:
    """The architecture :func:`_build_model` builds, without building it."""
    if c.arch is None:
        return densenet_bc_config(c.depth, c.growth_rate, num_classes=num_classes)
    return resolve_arch(c.arch).with_classes(num_classes)


def _build_run(
    c: TrainConfig, dataset: str, save_dir: Path, data: DataBundle, info: DistInfo, device: torch.device,
    choice: BudgetChoice | None,
) -> _Run:  # fmt: skip
    """Model (same initial weights on every rank and for every data set), in the memory plan
    ``choice`` holds if any, SGD + Nesterov with the original demo's schedule (LR x0.1 at 50% and
    75% of the epochs), and the AMP scaler."""
    torch.manual_seed(c.seed)
    model = _build_model(c, data.num_classes).to(device)
    if choice is not None:
        model.set_memory_efficient(choice.plan)
    if c.freeze_features:
        model.features.requires_grad_(False)
    if c.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if c.sync_bn and info.enabled:  # ours: any backend, every mode, eager and compiled
        model = convert_sync_batchnorm(model)
    params = [p for p in model.parameters() if p.requires_grad]
    # Fused: the whole update is one kernel (not a few per parameter), and it takes a device-side
    # ``found_inf`` that skips the update, which is how the loop skips a step after a non-finite
    # loss without reading the loss on the host (:func:`_optimizer_step`).
    optimizer = torch.optim.SGD(
        params,
        lr=c.lr,
        momentum=c.momentum,
        nesterov=c.momentum > 0,
        weight_decay=c.weight_decay,
        fused=True,
    )
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=lr_milestones(c.n_epochs), gamma=0.1
    )
    scaler = torch.amp.GradScaler(device.type, enabled=c.amp == "fp16")
    run = _Run(c, dataset, save_dir, model, optimizer, scheduler, scaler, info, device)
    run.planned, run.log = choice is not None, _Log(info.main)
    return run


def _restore(run: _Run, ckpt: dict[str, Any]) -> None:
    """Continue exactly where the checkpoint stopped: weights, optimiser, schedule (for the run's
    epoch count), RNGs, history (:func:`.checkpoint.restore_training_state`)."""
    restore_training_state(
        ckpt,
        run.save_dir / CHECKPOINT_NAME,
        model=run.model,
        optimizer=run.optimizer,
        scheduler=run.scheduler,
        scaler=run.scaler,
        n_epochs=run.c.n_epochs,
    )
    run.start_epoch, run.history, run.resumed = int(ckpt["epoch"]), list(ckpt["history"]), True
    run.best = BestModel(ckpt.get("best_valid_error"), ckpt.get("best_epoch"), ckpt.get("best_model"))


def _wrap(run: _Run) -> nn.Module:
    """The module the loop calls: DDP across processes and/or ``torch.compile`` around the model."""
    net: nn.Module = run.model
    if run.info.enabled:
        net = nn.parallel.DistributedDataParallel(
            run.model, device_ids=[run.device.index] if run.device.type == "cuda" else None
        )
    if run.c.compile:
        net = torch.compile(net, mode=compile_mode(run.device))
    return net


def compile_mode(device: torch.device) -> str | None:
    """``torch.compile``'s mode for ``train --compile``: on CUDA ``"reduce-overhead"``, which replays
    the whole step (engine blocks included, models/engine/ops.py) as CUDA graphs, the remedy for a step
    bound by kernel launches; elsewhere the default (CPU has no graphs to replay)."""
    return "reduce-overhead" if device.type == "cuda" else None


def _train(
    config: TrainConfig,
    info: DistInfo,
    device: torch.device,
    given: frozenset[str],
    held: contextlib.ExitStack,
) -> TrainResult:
    config, save_dir, ckpt, read_stat, notices = _open_run(config, given)
    dataset = _dataset(config)
    c = resolve_config(config, dataset, given=given, save_dir=save_dir)
    if ckpt is None:  # a --growth-rate of a million: refused before any data is read or written (a
        # resumed run's stored settings are compared with its weights first, naming the file)
        check_model_size(_arch_config(c, 0))
    _configure_backends(c, device)
    data = _load_data(c, dataset, info)
    c, choice = _choose_budget(c, data, info, device, ckpt)
    if ckpt is not None:
        arch, plan = _arch_config(c, data.num_classes), choice.plan if choice is not None else None
        check_resumable(ckpt, save_dir / CHECKPOINT_NAME, arch=arch, classes=data.classes, plan=plan)
    run = _build_run(c, dataset, save_dir, data, info, device, choice)
    if ckpt is not None:
        _restore(run, ckpt)
    train_loader, sampler = _loader(data.train, c, info, shuffle=True, device=device)
    valid_loader = _loader(data.valid, c, info, shuffle=False, device=device)[0] if data.valid else None
    _check_run_folder(save_dir, info, device, held, read_stat, c.overwrite)
    run.net = _wrap(run)
    _announce(run, data, choice, notices)
    provenance = {
        "training": {k: v for k, v in c.to_dict().items() if k not in RUNTIME_FIELDS},
        "dataset": data.name,
        "classes": data.classes,
        "memory_plan": str(run.model.memory_plan),
    }
    end_epoch = c.n_epochs if c.stop_after is None else min(c.n_epochs, run.start_epoch + c.stop_after)
    for epoch in range(run.start_epoch, end_epoch):
        _seed_epoch(c.seed, epoch, info.rank, train_loader)
        sampler.set_epoch(epoch)
        row = _run_epoch(run, epoch, train_loader, valid_loader)
        _check_finite(row, valid_loader is not None)
        run.history.append(row)
        improved = run.best.update(
            row["valid_error"] if valid_loader else row["train_error"], epoch + 1, run.model
        )
        run.log(
            f"epoch {epoch + 1}/{c.n_epochs}: train loss {row['train_loss']:.4f} error {row['train_error']:.4f} | "
            f"valid loss {row['valid_loss']:.4f} error {row['valid_error']:.4f} | lr {row['lr']:g} | "
            f"{row['epoch_seconds']:.1f}s"
        )
        if info.main:
            _save(run, epoch, improved, provenance)
    return _finish(run, data, end_epoch)


def _announce(run: _Run, data: DataBundle, choice: BudgetChoice | None, notices: list[str]) -> None:
    """Log what is trained, where, in which batches, and what a resume changed."""
    c, info = run.c, run.info
    run.log(_describe_run(run, data))
    if choice is not None:
        run.log(choice.describe(c.accum_steps, info.world_size))
    elif c.accum_steps > 1:
        effective = c.batch_size * c.accum_steps * info.world_size
        run.log(f"batch {c.batch_size} x {c.accum_steps} accumulation steps (effective {effective})")
    for notice in notices:
        run.log(f"resuming with {notice}")
    if run.resumed and run.start_epoch >= c.n_epochs:
        run.log(
            f"the run in {run.save_dir} has already completed its {c.n_epochs} epochs: nothing to train "
            "(pass a larger --n-epochs to continue it)"
        )


def _check_finite(row: dict[str, Any], validated: bool) -> None:
    """Refuse an epoch whose losses are not finite, before it can be selected as best or saved.

    A model whose outputs are NaN still has an error rate (NaN logits argmax to class 0), so
    such an epoch could even look best; its weights are never written and the last good
    checkpoint stays (the run stops as for a diverged training loss)."""
    names = ("train_loss", "valid_loss") if validated else ("train_loss",)
    bad = [(name, row[name]) for name in names if not math.isfinite(row[name])]
    if bad:
        label = {"train_loss": "training", "valid_loss": "validation"}
        what = " and ".join(f"the {label[name]} loss is {value}" for name, value in bad)
        raise NonFiniteLossError(
            f"{what} in epoch {row['epoch']}: the model's outputs are not finite; stopping, nothing of "
            "this epoch is saved and the last good checkpoint is kept. Try a lower --lr, or --amp bf16 "
            "instead of fp16"
        )


#: errno values that mean "the run folder cannot take the files", not a bug.
_STORAGE_ERRORS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO}
)


def _save(run: _Run, epoch: int, improved: bool, provenance: dict[str, Any]) -> None:
    """Rank 0 saves the epoch (:func:`.checkpoint.save_epoch`); a folder that cannot take it is one
    sentence saying which checkpoint is kept."""
    trainables = {
        "model": run.model,
        "optimizer": run.optimizer,
        "scheduler": run.scheduler,
        "scaler": run.scaler,
    }
    if run.planned:
        trainables["memory_plan"] = run.model.memory_plan
    try:
        save_epoch(run.save_dir, trainables, run.c, epoch + 1, run.history, run.best, improved, provenance)
    except OSError as err:
        if err.errno not in _STORAGE_ERRORS:
            raise
        kept = (
            f"the checkpoint of epoch {epoch} is kept: make room (or fix the folder) and continue with --resume"
            if epoch > run.start_epoch or run.resumed
            else "make room (or fix the folder) and start the run again"
        )
        raise UsageError(
            f"could not save epoch {epoch + 1} in {run.save_dir}: {os.strerror(err.errno)}; {kept}"
        ) from None


def _finish(run: _Run, data: DataBundle, end_epoch: int) -> TrainResult:
    """The result; a finished run is tested (best model) when the data has a separate test set."""
    c = run.c
    finished = end_epoch == c.n_epochs
    result = TrainResult(
        run.save_dir, end_epoch, finished, run.history, run.best.epoch, run.best.error, model=run.model
    )
    if finished and data.test is not None and data.test is not data.valid:
        result.test_loss, result.test_error = _test_best(run, data)
        run.log(
            f"test (best model, epoch {run.best.epoch}): loss {result.test_loss:.4f} "
            f"error {result.test_error:.4f} (accuracy {100 * (1 - result.test_error):.2f}%)"
        )
    elif not finished:
        run.log(
            f"stopped after epoch {end_epoch} of {c.n_epochs}; continue with --save {run.save_dir} --resume"
        )
    return result


def _check_run_folder(
    save_dir: Path, info: DistInfo, device: torch.device, held: contextlib.ExitStack,
    read_stat: os.stat_result | None, overwrite: bool,
) -> None:  # fmt: skip
    """Rank 0 claims the run folder and checks it can be written (:func:`.checkpoint.check_run_folder`)
    before any training, holding its lock in ``held``; every rank raises together, or the others
    would wait for rank 0 forever. ``read_stat``: a resumed run's checkpoint as it was read."""
    problem: Exception | None = None
    if info.main:
        try:
            held.enter_context(check_run_folder(save_dir, expect_checkpoint=read_stat, overwrite=overwrite))
        except (UsageError, FileExistsError) as err:
            problem = err
    (failed,) = all_reduce([float(problem is not None)], info, device)
    if problem is not None:
        raise problem
    if failed:
        raise UsageError(f"rank 0 cannot write the run folder {save_dir}")


def _describe_run(run: _Run, data: DataBundle) -> str:
    c, model, info = run.c, run.model, run.info
    where = f"{run.device}" + (f" x {info.world_size} processes" if info.enabled else "")
    return (
        f"{model.arch_summary()} mode={c.mode if c.memory is None else 'plan (--memory)'}, {sum(p.numel() for p in model.parameters()):,} "
        f"parameters; {data.name} {data.image_size}x{data.image_size}: {len(data.train)} train / "
        f"{len(data.valid) if data.valid else 0} valid images, {data.num_classes} classes; {where}; "
        f"saving to {run.save_dir}" + (f" (resuming after epoch {run.start_epoch})" if run.resumed else "")
    )


def _run_epoch(
    run: _Run, epoch: int, train_loader: DataLoader, valid_loader: DataLoader | None
) -> dict[str, Any]:
    """Train one epoch, step the schedule, validate; return the log row."""
    c, device = run.c, run.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    lr = run.optimizer.param_groups[0]["lr"]
    t0 = time.perf_counter()
    train_loss, train_error = _train_epoch(run, train_loader, f"epoch {epoch + 1}/{c.n_epochs}")
    run.scheduler.step()
    valid_loss, valid_error = (
        evaluate(run.net, valid_loader, device, c, run.info) if valid_loader else (math.nan, math.nan)
    )
    return {
        "epoch": epoch + 1,
        "train_loss": train_loss,
        "train_error": train_error,
        "valid_loss": valid_loss,
        "valid_error": valid_error,
        "lr": lr,
        "epoch_seconds": round(time.perf_counter() - t0, 3),
        "peak_memory_mb": round(_peak_memory_mb(device), 1),
    }


def _test_best(run: _Run, data: DataBundle) -> tuple[float, float]:
    """Test figures of the model selected on validation (the last weights are put back after)."""
    model, best = run.model, run.best
    if best.state is not None:
        last = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(best.state)
    test_loader = _loader(data.test, run.c, run.info, shuffle=False, device=run.device)[0]
    figures = evaluate(run.net, test_loader, run.device, run.c, run.info)
    if best.state is not None:
        model.load_state_dict(last)
    return figures


def _batch_sizes(loader: DataLoader) -> list[int]:
    """The size of every batch ``loader`` yields in an epoch (its sampler's images, in order)."""
    n, size = len(loader.sampler), loader.batch_size
    full, rest = divmod(n, size)
    return [size] * full + ([rest] if rest and not loader.drop_last else [])


#: Seconds between two host reads of the epoch's running sums (progress bar, non-finite check).
READ_INTERVAL = 0.25


class _Tally:
    """The epoch's running loss and error sums, kept on the device and read a few times a second.

    Reading a value on the host waits for everything queued before it: a read per micro-batch
    would keep the CPU from queueing the next step while the device runs this one. So the sums
    grow on the device, and :meth:`read` fetches them in one transfer when :meth:`due` says (the
    first micro-batch, then about every :data:`READ_INTERVAL` seconds, and the epoch's last). A
    non-finite loss makes the loss sum non-finite, which is also the flag that skips every
    optimizer step after it (:func:`_optimizer_step`) until the read that stops the run.

    The read schedule is a count of micro-batches, re-planned at each read from how long the last
    ones took (at most doubling); under DDP the time is all-reduced with the sums, so every rank
    reads, and stops, at the same micro-batch: a rank that stopped alone would leave the others
    waiting in the next gradient all-reduce."""

    def __init__(self, device: torch.device, info: DistInfo) -> None:
        self.info = info
        # float64 sums add exactly what a Python float did (a float32 loss times a count is exact in
        # float64); MPS has no float64
        dtype = torch.float32 if device.type == "mps" else torch.float64
        self.loss_sum = torch.zeros((), dtype=dtype, device=device)
        self.err_sum = torch.zeros((), dtype=torch.int64, device=device)
        self.count = 0  # images: known on the host
        self.done = 0  # micro-batches
        self.started = self.last_read_at = time.perf_counter()
        self.last_read_done, self.next_read = 0, 1

    def add(self, loss: torch.Tensor, out: torch.Tensor, y: torch.Tensor) -> None:
        """Add a micro-batch's mean ``loss`` (x its images) and its errors, on the device."""
        n = y.numel()
        self.loss_sum.add_(loss.detach(), alpha=n)
        self.err_sum.add_((out.argmax(1) != y).sum())
        self.count += n
        self.done += 1

    def found_inf(self) -> torch.Tensor:
        """1.0 once a loss of this epoch (on any rank) was non-finite, else 0.0: a float32 scalar on
        the device, as fused optimizers take it (a fused step is skipped where it is exactly 1)."""
        found = torch.isfinite(self.loss_sum).logical_not().float()
        if self.info.enabled:  # asynchronous on NCCL: it orders the device's work, not the host's
            dist.all_reduce(found, op=dist.ReduceOp.MAX)
        return found

    def poison(self) -> torch.Tensor:
        """1.0, or NaN once a loss of this epoch was non-finite: a factor that makes the gradients NaN."""
        return torch.where(torch.isfinite(self.loss_sum), 1.0, math.nan)

    def due(self, last: bool) -> bool:
        """Whether the micro-batch just added ends with a read (:meth:`read`)."""
        return last or self.done >= self.next_read

    def read(self) -> tuple[float, float, float, float]:
        """``(loss sum, error count, image count)`` of every rank so far, read in one transfer, and
        this rank's seconds since the epoch began; plans the next read."""
        now = time.perf_counter()
        dtype, device = self.loss_sum.dtype, self.loss_sum.device
        host = torch.tensor([self.count, now - self.last_read_at], dtype=dtype).to(device)
        sums = torch.cat([torch.stack([self.loss_sum, self.err_sum.to(dtype)]), host])
        if self.info.enabled:  # every rank reads at the same micro-batch: the collective is matched
            dist.all_reduce(sums)
        loss_sum, err_sum, count, interval = sums.tolist()
        interval /= self.info.world_size  # the mean over ranks: every rank plans the same next read
        steps = self.done - self.last_read_done
        every = min(2 * steps, int(steps * READ_INTERVAL / max(interval, 1e-9)))
        self.next_read = self.done + max(1, every)
        self.last_read_done, self.last_read_at = self.done, time.perf_counter()
        return loss_sum, err_sum, count, now - self.started


def _forward_backward(run: _Run, x: torch.Tensor, y: torch.Tensor, weight: float, tally: _Tally) -> None:
    """One micro-batch: forward, the loss (added to ``tally`` on the device), and backward of
    ``weight`` x the loss into the gradients already accumulated. Nothing is read on the host: a
    non-finite loss is found at ``tally``'s next read, and until then every optimizer step is
    skipped on the device (:func:`_optimizer_step`)."""
    with _autocast(run.c, run.device):
        out = run.net(x)
        loss = _loss_fn(out.float(), y)
    tally.add(loss, out, y)
    scaled = loss if weight == 1.0 else loss * weight
    if run.scaler.is_enabled():
        # GradScaler decides from the gradients whether to step: NaN gradients once a loss was
        # non-finite make it skip every step until the read, as it skips any inf step (x 1.0 is exact)
        scaled = scaled * tally.poison()
    # fp16: every micro-batch's loss is scaled; the scaler unscales the sum once, at the step
    run.scaler.scale(scaled).backward()


def _optimizer_step(run: _Run, tally: _Tally) -> None:
    """Step on the accumulated gradients, unless a loss of this epoch was non-finite: decided on the
    device, so the parameters and momentum buffers stay exactly as after the last finite step."""
    if run.scaler.is_enabled():
        run.scaler.step(run.optimizer)  # fp16: unscales inside the fused step, skips it on inf/NaN
        run.scaler.update()
        return
    # The contract GradScaler itself has with fused optimizers: the step reads ``found_inf``.
    run.optimizer.found_inf = tally.found_inf()  # type: ignore[attr-defined]
    try:
        run.optimizer.step()
    finally:
        del run.optimizer.found_inf  # type: ignore[attr-defined]


def _train_epoch(run: _Run, loader: DataLoader, desc: str) -> tuple[float, float]:
    c, info = run.c, run.info
    run.net.train()
    if c.freeze_features:
        run.model.features.eval()  # frozen features keep their pretrained BN statistics too
    bar = tqdm(
        loader,
        desc=desc,
        unit="batch",
        leave=False,
        disable=not (c.progress and info.main),
        dynamic_ncols=True,
    )
    weights = accumulation_weights(_batch_sizes(loader), c.accum_steps)
    ddp = getattr(run.net, "_orig_mod", run.net)  # under torch.compile, the DDP module (if any) inside
    tally = _Tally(run.device, info)
    run.optimizer.zero_grad(set_to_none=True)
    for i, ((x, y), weight) in enumerate(
        zip(_batches(bar, run.device, c.channels_last), weights, strict=True)
    ):
        steps = (i + 1) % c.accum_steps == 0 or i + 1 == len(weights)
        # DDP all-reduces gradients in backward: only on the micro-batch that ends the group
        sync = ddp.no_sync() if not steps and isinstance(ddp, DDP) else contextlib.nullcontext()
        with sync:
            _forward_backward(run, x, y, weight, tally)
        if steps:
            _optimizer_step(run, tally)
            run.optimizer.zero_grad(set_to_none=True)
        if tally.due(last=i + 1 == len(weights)):
            loss_sum, err_sum, count, seconds = tally.read()
            if not math.isfinite(loss_sum):  # a non-finite loss made the sum so (inf or nan)
                raise NonFiniteLossError(
                    f"the training loss became {loss_sum} in {desc}; stopping. The last good checkpoint "
                    "is kept; try a lower --lr, or --amp bf16 instead of fp16"
                )
            bar.set_postfix(
                loss=f"{loss_sum / count:.3f}",
                acc=f"{100 * (1 - err_sum / count):.1f}%",
                img_s=f"{count / seconds:.0f}",
            )
    return loss_sum / count, err_sum / count
