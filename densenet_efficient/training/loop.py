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
import time
from collections import Counter
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
from ..models.weights import resolve_weights
from ..perf.measure import peak_rss_bytes
from .budget import BudgetChoice, accumulation_weights, choose_budget
from .checkpoint import (
    CHECKPOINT_NAME,
    BestModel,
    check_run_folder,
    read_run_checkpoint,
    restore_rng_state,
    save_epoch,
)
from .config import (
    RUNTIME_FIELDS,
    NonFiniteLossError,
    TrainConfig,
    TrainResult,
    given_fields,
    lr_milestones,
    resolve_config,
    resume_config,
)
from .data import DataBundle, TransformedSubset, build_data, detect_dataset
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
    info, device = init_distributed(config.device)
    try:
        return _train(config, info, device, given)
    finally:
        if info.enabled and dist.is_initialized():
            dist.destroy_process_group()


@dataclass
class _Run:
    """What one invocation trains: its settings, folder, model and optimisation state."""

    c: TrainConfig
    dataset: str
    save_dir: Path
    model: DenseNet
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    start_epoch: int = 0
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    best: BestModel = dataclasses.field(default_factory=BestModel)


def run_name(config: TrainConfig) -> str:
    """What a run folder is named after: the data set (``digits``, ``cifar10``, ``cifar100``), or an
    ImageFolder's own folder name; never the ``auto`` selector."""
    dataset = detect_dataset(config.data) if config.dataset == "auto" else config.dataset
    if dataset == "imagefolder" and config.data is not None:
        return Path(config.data).expanduser().resolve().name
    return dataset


def _open_run(
    config: TrainConfig, given: frozenset[str]
) -> tuple[TrainConfig, Path, dict[str, Any] | None, list[str]]:
    """The run folder, and with ``resume`` the checkpoint and the settings it continues with
    (:func:`.config.resume_config`), plus notices about settings the resume changed."""
    save_dir = Path(config.save or f"runs/{run_name(config)}-{time.strftime('%Y%m%d-%H%M%S')}")
    ckpt_path = save_dir / CHECKPOINT_NAME
    if config.resume:
        ckpt = read_run_checkpoint(ckpt_path)  # also checks its config holds only known settings
        asked = dataclasses.replace(config, save=str(save_dir))
        config, notices = resume_config(TrainConfig(**ckpt["config"]), asked, given, ckpt["epoch"])
        return config, save_dir, ckpt, notices
    if ckpt_path.exists() and not config.overwrite:
        raise FileExistsError(
            f"{save_dir} already holds a training run ({CHECKPOINT_NAME}); pass --resume to continue it "
            "or --overwrite to start again"
        )
    return config, save_dir, None, []


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
    c: TrainConfig, data: DataBundle, info: DistInfo, device: torch.device, stored_plan: Any
) -> BudgetChoice:
    """The batch and memory plan for ``--memory``/``--batch-size auto`` (before the model is built).

    A resumed run keeps the plan its checkpoint stored (its batch is already the stored one): the
    same run continues with the same computation, whatever memory the device has free today."""
    arch = _build_model_config(c, data.num_classes)
    if stored_plan is not None:
        plan = MemoryPlan.from_json(stored_plan)
        return BudgetChoice(plan.budget or 0, int(c.batch_size), plan, "the run's stored plan")
    return choose_budget(
        arch,
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
    )


def _build_model_config(c: TrainConfig, num_classes: int) -> ArchConfig:
    """The architecture :func:`_build_model` builds, without building it."""
    if c.arch is None:
        return densenet_bc_config(c.depth, c.growth_rate, num_classes=num_classes)
    return resolve_arch(c.arch).with_classes(num_classes)


def _build_run(
    c: TrainConfig, dataset: str, save_dir: Path, data: DataBundle, info: DistInfo, device: torch.device
) -> _Run:
    """Model (same initial weights on every rank and for every data set), SGD + Nesterov with the
    original demo's schedule (LR x0.1 at 50% and 75% of the epochs), and the AMP scaler."""
    torch.manual_seed(c.seed)
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
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=lr_milestones(c.n_epochs), gamma=0.1
    )
    scaler = torch.amp.GradScaler(device.type, enabled=c.amp == "fp16")
    return _Run(c, dataset, save_dir, model, optimizer, scheduler, scaler)


def _restore(run: _Run, ckpt: dict[str, Any]) -> None:
    """Continue exactly where the checkpoint stopped: weights, optimiser, schedule, RNGs, history.

    A part that does not fit the model its settings build is refused with a :class:`UsageError`
    naming it, before anything is trained or written."""
    path = run.save_dir / CHECKPOINT_NAME
    for key in ("model", "best_model"):
        if ckpt.get(key) is not None:
            problem = _state_dict_problem(run.model, ckpt[key])
            if problem:
                raise UsageError(
                    f"checkpoint {path}: its {key.replace('_', ' ')} does not fit the {run.model.arch_summary()} "
                    f"its settings describe: {problem}"
                )
    steps = {
        "model": lambda: run.model.load_state_dict(ckpt["model"]),
        "optimizer": lambda: run.optimizer.load_state_dict(ckpt["optimizer"]),
        "scheduler": lambda: run.scheduler.load_state_dict(ckpt["scheduler"]),
        "scaler": lambda: ckpt.get("scaler") and run.scaler.load_state_dict(ckpt["scaler"]),
        "rng": lambda: restore_rng_state(ckpt["rng"]),
    }
    for key, step in steps.items():
        try:
            step()
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as err:
            raise UsageError(
                f"checkpoint {path}: its {key} state cannot be restored ({err!r:.200})"
            ) from None
    run.start_epoch, run.history = int(ckpt["epoch"]), list(ckpt["history"])
    run.best = BestModel(ckpt.get("best_valid_error"), ckpt.get("best_epoch"), ckpt.get("best_model"))
    if run.c.n_epochs != ckpt["config"]["n_epochs"]:
        _reschedule(run.scheduler, run.optimizer, run.c.n_epochs)


def _reschedule(
    scheduler: torch.optim.lr_scheduler.MultiStepLR, optimizer: torch.optim.Optimizer, n_epochs: int
) -> None:
    """Give a restored schedule the milestones of ``n_epochs`` and the LR that schedule has now.

    The LR is multiplied milestone by milestone, as MultiStepLR itself does, so it is bit for bit
    what a run planned for ``n_epochs`` from the start would use at this epoch."""
    scheduler.milestones = Counter(lr_milestones(n_epochs))
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
        lr = base
        for milestone in sorted(m for m in scheduler.milestones if m <= scheduler.last_epoch):
            lr *= scheduler.gamma ** scheduler.milestones[milestone]
        group["lr"] = lr
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def _state_dict_problem(model: nn.Module, state: Any) -> str | None:
    """What keeps ``state`` from loading into ``model`` exactly, in one line (None if it fits)."""
    if not isinstance(state, dict):
        return f"expected a state dict, found a {type(state).__name__}"
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} instead of {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and (not isinstance(state[k], torch.Tensor) or state[k].shape != v.shape)
    ]
    parts = [
        f"{label} {len(names)} ({', '.join(map(str, names[:3]))}{', ...' if len(names) > 3 else ''})"
        for label, names in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes))
        if names
    ]
    return "; ".join(parts) or None


def _wrap(run: _Run, info: DistInfo, device: torch.device) -> nn.Module:
    """The module the loop calls: DDP across processes and/or ``torch.compile`` around the model."""
    net: nn.Module = run.model
    if info.enabled:
        net = nn.parallel.DistributedDataParallel(
            run.model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if run.c.compile:
        net = torch.compile(net)
    return net


def _train(config: TrainConfig, info: DistInfo, device: torch.device, given: frozenset[str]) -> TrainResult:
    config, save_dir, ckpt, notices = _open_run(config, given)
    dataset = detect_dataset(config.data) if config.dataset == "auto" else config.dataset
    if dataset == "imagefolder" and config.data is not None:
        data_dir = Path(config.data).expanduser().resolve()
        if save_dir.resolve().is_relative_to(data_dir):
            raise UsageError(
                f"--save {save_dir} is inside --data {config.data}: the run folder would be read as a "
                "class of images (or as images of one); save the run outside the data folder"
            )
    if {"memory", "mode"} <= given and not config.resume:
        raise UsageError(
            f"--memory {config.memory} and --mode {config.mode} both given: --memory chooses the memory "
            "plan (the mode of each block) for the budget; give one of them"
        )
    c = resolve_config(config, dataset)
    _configure_backends(c, device)
    data = _load_data(c, dataset, info)
    choice = None
    if c.memory is not None or c.batch_size == "auto":
        stored_plan = ckpt.get("memory_plan") if ckpt is not None else None
        choice = _choose_budget(c, data, info, device, stored_plan)
        c = dataclasses.replace(c, batch_size=choice.batch_size, memory=c.memory or "auto")
    run = _build_run(c, dataset, save_dir, data, info, device)
    if choice is not None:
        run.model.set_memory_efficient(choice.plan)
    if ckpt is not None:
        _restore(run, ckpt)
    _check_run_folder(save_dir, info, device)
    net = _wrap(run, info, device)
    train_loader, sampler = _loader(data.train, c, info, shuffle=True, device=device)
    valid_loader = _loader(data.valid, c, info, shuffle=False, device=device)[0] if data.valid else None
    log = print if info.main else (lambda *a, **k: None)
    log(_describe_run(run, data, info, device, resumed=ckpt is not None))
    if choice is not None:
        log(choice.describe(c.accum_steps, info.world_size))
    elif c.accum_steps > 1:
        effective = c.batch_size * c.accum_steps * info.world_size
        log(f"batch {c.batch_size} x {c.accum_steps} accumulation steps (effective {effective})")
    for notice in notices:
        log(f"resuming with {notice}")
    if ckpt is not None and run.start_epoch >= c.n_epochs:
        log(
            f"the run in {save_dir} has already completed its {c.n_epochs} epochs: nothing to train "
            "(pass a larger --n-epochs to continue it)"
        )

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
        row = _run_epoch(run, net, epoch, train_loader, valid_loader, info, device)
        run.history.append(row)
        score = row["valid_error"] if valid_loader else row["train_error"]
        improved = run.best.update(score, epoch + 1, run.model)
        log(
            f"epoch {epoch + 1}/{c.n_epochs}: train loss {row['train_loss']:.4f} error {row['train_error']:.4f} | "
            f"valid loss {row['valid_loss']:.4f} error {row['valid_error']:.4f} | lr {row['lr']:g} | "
            f"{row['epoch_seconds']:.1f}s"
        )
        if info.main:
            trainables = {
                "model": run.model,
                "optimizer": run.optimizer,
                "scheduler": run.scheduler,
                "scaler": run.scaler,
            }
            if choice is not None:
                trainables["memory_plan"] = run.model.memory_plan
            try:
                save_epoch(save_dir, trainables, c, epoch + 1, run.history, run.best, improved, provenance)
            except OSError as err:
                if err.errno not in _STORAGE_ERRORS:
                    raise
                raise UsageError(
                    f"could not save epoch {epoch + 1} in {save_dir}: {os.strerror(err.errno)}; "
                    + (
                        f"the checkpoint of epoch {epoch} is kept: make room (or fix the folder) and "
                        "continue with --resume"
                        if epoch > run.start_epoch or ckpt is not None
                        else "make room (or fix the folder) and start the run again"
                    )
                ) from None

    finished = end_epoch == c.n_epochs
    result = TrainResult(
        save_dir, end_epoch, finished, run.history, run.best.epoch, run.best.error, model=run.model
    )
    if finished and data.test is not None and data.test is not data.valid:
        result.test_loss, result.test_error = _test_best(run, net, data, info, device)
        log(
            f"test (best model, epoch {run.best.epoch}): loss {result.test_loss:.4f} "
            f"error {result.test_error:.4f} (accuracy {100 * (1 - result.test_error):.2f}%)"
        )
    elif not finished:
        log(f"stopped after epoch {end_epoch} of {c.n_epochs}; continue with --save {save_dir} --resume")
    return result


#: errno values that mean "the run folder cannot take the files", not a bug.
_STORAGE_ERRORS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO}
)


def _check_run_folder(save_dir: Path, info: DistInfo, device: torch.device) -> None:
    """Rank 0 checks the run folder can be written (:func:`.checkpoint.check_run_folder`) before
    any training; every rank raises together, or the others would wait for rank 0 forever."""
    problem = None
    if info.main:
        try:
            check_run_folder(save_dir)
        except UsageError as err:
            problem = err
    (failed,) = all_reduce([float(problem is not None)], info, device)
    if problem is not None:
        raise problem
    if failed:
        raise UsageError(f"rank 0 cannot write the run folder {save_dir}")


def _describe_run(run: _Run, data: DataBundle, info: DistInfo, device: torch.device, resumed: bool) -> str:
    c, model = run.c, run.model
    where = f"{device}" + (f" x {info.world_size} processes" if info.enabled else "")
    return (
        f"{model.arch_summary()} mode={c.mode if c.memory is None else 'plan (--memory)'}, {sum(p.numel() for p in model.parameters()):,} "
        f"parameters; {data.name} {data.image_size}x{data.image_size}: {len(data.train)} train / "
        f"{len(data.valid) if data.valid else 0} valid images, {data.num_classes} classes; {where}; "
        f"saving to {run.save_dir}" + (f" (resuming after epoch {run.start_epoch})" if resumed else "")
    )


def _run_epoch(
    run: _Run,
    net: nn.Module,
    epoch: int,
    train_loader: DataLoader,
    valid_loader: DataLoader | None,
    info: DistInfo,
    device: torch.device,
) -> dict[str, Any]:
    """Train one epoch, step the schedule, validate; return the log row."""
    c = run.c
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    lr = run.optimizer.param_groups[0]["lr"]
    t0 = time.perf_counter()
    train_loss, train_error = _train_epoch(
        net,
        run.model,
        train_loader,
        run.optimizer,
        run.scaler,
        c,
        info,
        device,
        f"epoch {epoch + 1}/{c.n_epochs}",
    )
    run.scheduler.step()
    valid_loss, valid_error = (
        evaluate(net, valid_loader, device, c, info) if valid_loader else (math.nan, math.nan)
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


def _test_best(
    run: _Run, net: nn.Module, data: DataBundle, info: DistInfo, device: torch.device
) -> tuple[float, float]:
    """Test figures of the model selected on validation (the last weights are put back after)."""
    model, best = run.model, run.best
    if best.state is not None:
        last = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(best.state)
    test_loader = _loader(data.test, run.c, info, shuffle=False, device=device)[0]
    figures = evaluate(net, test_loader, device, run.c, info)
    if best.state is not None:
        model.load_state_dict(last)
    return figures


def _batch_sizes(loader: DataLoader) -> list[int]:
    """The size of every batch ``loader`` yields in an epoch (its sampler's images, in order)."""
    n, size = len(loader.sampler), loader.batch_size
    full, rest = divmod(n, size)
    return [size] * full + ([rest] if rest and not loader.drop_last else [])


def _forward_backward(
    net: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    weight: float,
    scaler: torch.amp.GradScaler,
    c: TrainConfig,
    info: DistInfo,
    device: torch.device,
    desc: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One micro-batch: forward, the loss (checked finite on every rank), and backward of
    ``weight`` x the loss into the gradients already accumulated; returns the output and the loss."""
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
    # fp16: every micro-batch's loss is scaled; the scaler unscales the sum once, at the step
    scaler.scale(loss if weight == 1.0 else loss * weight).backward()
    return out, loss


def _train_epoch(
    net: nn.Module,
    model: DenseNet,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    c: TrainConfig,
    info: DistInfo,
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
    weights = accumulation_weights(_batch_sizes(loader), c.accum_steps)
    ddp = getattr(net, "_orig_mod", net)  # under torch.compile, the DDP module (if any) inside
    optimizer.zero_grad(set_to_none=True)
    for i, ((x, y), weight) in enumerate(zip(_batches(bar, device, c.channels_last), weights, strict=True)):
        steps = (i + 1) % c.accum_steps == 0 or i + 1 == len(weights)
        # DDP all-reduces gradients in backward: only on the micro-batch that ends the group
        sync = ddp.no_sync() if not steps and isinstance(ddp, DDP) else contextlib.nullcontext()
        with sync:
            out, loss = _forward_backward(net, x, y, weight, scaler, c, info, device, desc)
        if steps:
            scaler.step(optimizer)  # fp16: unscales the accumulated gradients once, then steps
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        n = y.numel()
        loss_sum += loss.item() * n
        err_sum += float((out.argmax(1) != y).sum())
        count += n
        bar.set_postfix(
            loss=f"{loss_sum / count:.3f}",
            acc=f"{100 * (1 - err_sum / count):.1f}%",
            img_s=f"{count * info.world_size / (time.perf_counter() - t0):.0f}",
        )
    loss_sum, err_sum, count = all_reduce([loss_sum, err_sum, count], info, device)
    return loss_sum / count, err_sum / count
