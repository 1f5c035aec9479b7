"""A run folder on disk: the resumable checkpoint, the CSV log and the best/last model folders.

A save directory holds ``checkpoint.pt`` (everything needed to resume, rewritten atomically each
epoch), ``log.csv`` (one row per epoch), and ``best/`` and ``last/`` Hugging Face-ready model
folders that :func:`densenet_efficient.from_pretrained` loads. The checkpoint is written last,
so a checkpoint for epoch e implies everything else of epoch e is on disk.

A run owns its folder through one marker file, ``.densenet-efficient-run`` (:func:`check_run_folder`):
a folder holding files of the run's names without it is someone else's, never written over, and
the run holds the marker locked (``flock``) from its check until it ends, so a second training
into the same folder is refused instead of silently replacing the first one's files.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import random
import stat
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..errors import UsageError, shown
from ..io.atomic import atomic_write, lock_exclusive, remove_stale_temporaries
from ..io.checkpoint import CheckpointError, load_torch_file
from ..io.files import file_kind
from ..io.state_dict import StateDictMismatchError
from ..models.config import ArchConfig
from ..models.hub import save_hub_folder
from ..models.memory_plan import MemoryPlan, resolve_memory_plan
from .config import TrainConfig, check_settings, lr_milestones

__all__ = [
    "CHECKPOINT_NAME",
    "LOG_COLUMNS",
    "LOG_NAME",
    "RUN_MARKER",
    "BestModel",
    "RunFolder",
    "check_resumable",
    "check_run_folder",
    "read_run_checkpoint",
    "rescheduled",
    "restore_rng_state",
    "restore_training_state",
    "rng_state",
    "save_epoch",
    "write_log",
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
#: The run folder's ownership marker and lock (see the module docstring).
RUN_MARKER = ".densenet-efficient-run"
_MARKER_FORMAT = "densenet_efficient.run/1"
#: What a run writes in its folder: files, then model folders.
_OUTPUT_FILES, _OUTPUT_FOLDERS = (CHECKPOINT_NAME, LOG_NAME), ("last", "best")
#: What a run writes in its folder, atomically (so a killed save may leave their temporaries).
_PROBE = "write-probe"
_RUN_FILES = (*_OUTPUT_FILES, *_OUTPUT_FOLDERS, _PROBE)
_CHECKPOINT_FORMAT = "densenet_efficient.train/1"  # the format tag of existing run files: never renamed


def rng_state() -> dict[str, Any]:
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


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def read_run_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a training run's checkpoint safely (``weights_only=True``) and check it is one.

    Raises ``ValueError`` naming the file when it is truncated, corrupt or something else.
    """
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"cannot resume from {path}: it is a folder, expected the run's checkpoint file")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint to resume from: {path} does not exist")
    try:
        ckpt = load_torch_file(path, map_location=map_location)
    except CheckpointError as err:  # truncated zip, bad pickle, disallowed global: all mean "not usable"
        raise UsageError(
            f"checkpoint {path} is corrupt or not a densenet-efficient training checkpoint ({err})"
        ) from None
    needed = ("format", "epoch", "model", "optimizer", "scheduler", "config", "rng", "history")
    if (
        not isinstance(ckpt, dict)
        or ckpt.get("format") != _CHECKPOINT_FORMAT
        or any(k not in ckpt for k in needed)
    ):
        raise UsageError(
            f"checkpoint {path} is not a densenet-efficient training checkpoint "
            f"(expected format {_CHECKPOINT_FORMAT!r} with keys {', '.join(needed)})"
        )
    problem = _checkpoint_problem(ckpt)
    if problem:
        raise UsageError(f"checkpoint {path} cannot be resumed: {problem}")
    # Every stored setting and the stored plan type-checked, naming the file, the field and the
    # value, before any of it builds a model or allocates anything (the file may have been edited).
    check_settings(ckpt["config"], lambda name: f"checkpoint {path}: its setting {name}")
    if ckpt.get("memory_plan") is not None:
        plan = MemoryPlan.from_json(ckpt["memory_plan"], f"checkpoint {path}: its memory_plan")
        # a run stores a plan only when its --memory chose one, fitted to the batch it stores: a
        # resumed run trains that batch in that plan (loop._choose_budget), so they must agree
        config = ckpt["config"]
        if config.get("memory") is None:
            raise UsageError(
                f"checkpoint {path} cannot be resumed: it has a memory_plan but its setting memory is "
                "None (a run stores a plan only when --memory chose it)"
            )
        if plan.batch_size is not None and plan.batch_size != config.get("batch_size"):
            raise UsageError(
                f"checkpoint {path} cannot be resumed: its memory_plan was fitted to a batch of "
                f"{plan.batch_size}, but its setting batch_size is {shown(config.get('batch_size'))}"
            )
    return ckpt


def _checkpoint_problem(ckpt: dict[str, Any]) -> str | None:
    """What makes a checkpoint of the right format unusable (None when its bookkeeping is sound).

    Only the cheap, structural facts; whether the weights, optimiser and RNG states fit the model
    is checked when they are restored (:func:`restore_training_state`)."""
    config = ckpt["config"]
    if not isinstance(config, dict):
        return f"its config is a {type(config).__name__}, expected a dict of settings"
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(config) - known)
    if unknown:
        return (
            f"its config has settings this version does not know ({', '.join(map(str, unknown))}); "
            "was it written by a newer densenet-efficient?"
        )
    if config.get("batch_size") == "auto":  # a run stores the batch "auto" resolved to, never "auto"
        return (
            "its config's batch_size is 'auto', expected the batch size the run trained with "
            "(an integer: a run stores the batch --batch-size auto chose)"
        )
    epoch, history, n_epochs = ckpt["epoch"], ckpt["history"], config.get("n_epochs")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1:
        return f"its epoch is {shown(epoch)}, expected a count of completed epochs >= 1"
    if isinstance(n_epochs, bool) or not isinstance(n_epochs, int) or n_epochs < epoch:
        return f"its config's n_epochs is {shown(n_epochs)}, expected an epoch count >= its epoch {epoch}"
    if (
        not isinstance(history, list)
        or len(history) != epoch
        or not all(isinstance(r, dict) for r in history)
    ):
        found = len(history) if isinstance(history, list) else type(history).__name__
        return f"its history should hold one row per completed epoch ({epoch}), found {found}"
    for row in history:
        odd = {k: v for k, v in row.items() if k not in LOG_COLUMNS or not _is_number(v)}
        if odd:
            return f"its history has a row with {shown(odd)}; expected numbers under {', '.join(LOG_COLUMNS)}"
    for key in ("model", "optimizer", "scheduler", "rng"):
        if not isinstance(ckpt[key], dict):
            return f"its {key} entry is a {type(ckpt[key]).__name__}, expected a dict"
    for key in ("scaler", "best_model"):
        if ckpt.get(key) is not None and not isinstance(ckpt[key], dict):
            return f"its {key} entry is a {type(ckpt[key]).__name__}, expected a dict or None"
    classes = ckpt.get("classes")  # absent in checkpoints written before it was stored
    if classes is not None and (
        not isinstance(classes, list) or not all(isinstance(c, str) for c in classes)
    ):
        return f"its classes are {shown(classes)}, expected a list of class names"
    best_error, best_epoch = ckpt.get("best_valid_error"), ckpt.get("best_epoch")
    if best_error is not None and not _is_number(best_error):
        return f"its best_valid_error is {shown(best_error)}, expected a number or None"
    if best_epoch is not None and (
        isinstance(best_epoch, bool) or not isinstance(best_epoch, int) or not 1 <= best_epoch <= epoch
    ):
        return f"its best_epoch is {shown(best_epoch)}, expected an epoch in 1..{epoch} or None"
    if ckpt["scheduler"].get("last_epoch") != epoch:
        return (
            f"its LR schedule is at epoch {shown(ckpt['scheduler'].get('last_epoch'))} but the checkpoint "
            f"is for epoch {epoch}"
        )
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class RunFolder:
    """A run folder this process owns: its marker held locked until :meth:`release` (or the end of
    a ``with`` block, or the process). Leaving a ``with`` block on an error removes the folder again
    when the run created it and wrote nothing into it but the marker."""

    def __init__(self, path: Path, fd: int, created: bool) -> None:
        self.path, self._fd, self._created = path, fd, created

    def release(self, failed: bool = False) -> None:
        if self._fd < 0:
            return
        try:
            if failed and self._created and set(os.listdir(self.path)) <= {RUN_MARKER}:
                (self.path / RUN_MARKER).unlink(missing_ok=True)  # our own, in a folder we made
                self.path.rmdir()
        except OSError:
            pass  # someone else put a file there meanwhile: the folder stays
        finally:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release(failed=kind is not None)


def check_run_folder(
    save_dir: Path, *, expect_checkpoint: os.stat_result | None = None, overwrite: bool = False
) -> RunFolder:
    """Claim ``save_dir`` for a run before any training time is spent, and make sure it can be saved.

    Returns the claimed :class:`RunFolder`: hold it (``with``) for as long as the run writes there.
    The folder is the run's when it holds the run marker, or is new, or holds none of the names
    the run writes (``checkpoint.pt``, ``log.csv``, ``last/``, ``best/``), or holds a checkpoint of
    this package's (a run of a version before the marker). Otherwise it is refused, naming the
    files: they are someone else's. The marker is then created and locked; a folder another run
    holds locked is refused. Under the lock: the run's own names must not be links
    (a ``last`` linking elsewhere would be written through); a checkpoint that appeared since the
    run was set up (another run finished there) is refused unless ``overwrite``; a resumed run's
    checkpoint must be the one it read (``expect_checkpoint``, its ``os.stat``). Then what an
    interrupted save left is removed (:func:`..io.atomic.remove_stale_temporaries`) and a probe
    file is written and removed. Raises :class:`UsageError` naming the folder and the reason."""
    if save_dir.exists() and not save_dir.is_dir():
        raise UsageError(f"--save {save_dir} is a file; expected a folder for the run (new or existing)")
    marker = save_dir / RUN_MARKER
    try:
        created = not save_dir.exists()
        save_dir.mkdir(parents=True, exist_ok=True)
        if not os.path.lexists(marker):
            _check_unowned(save_dir, expect_checkpoint)
        fd = os.open(marker, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | os.O_NONBLOCK, 0o666)
    except OSError as err:
        if os.path.islink(marker) or (os.path.lexists(marker) and not os.path.isfile(marker)):
            raise UsageError(
                f"--save {save_dir}: its {RUN_MARKER} is not a regular file; this package did not write it"
            ) from None
        raise UsageError(f"cannot write the run folder {save_dir}: {err.strerror or err}") from None
    folder = RunFolder(save_dir, fd, created)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UsageError(
                f"--save {save_dir}: its {RUN_MARKER} is not a regular file; this package did not write it"
            )
        if not lock_exclusive(fd):
            raise UsageError(
                f"--save {save_dir} is in use by another training run (it holds {RUN_MARKER} locked); "
                "wait for it to end, or choose another folder"
            )
        if os.fstat(fd).st_size == 0:  # written once, when the run folder is claimed
            os.pwrite(fd, (json.dumps({"format": _MARKER_FORMAT}) + "\n").encode(), 0)
        _check_outputs(save_dir, expect_checkpoint, overwrite)
        remove_stale_temporaries(save_dir, _RUN_FILES)
        probe_fd, probe = tempfile.mkstemp(prefix=f".{_PROBE}.", suffix=".tmp", dir=save_dir)
        try:
            with os.fdopen(probe_fd, "wb") as f:
                f.write(b"densenet-efficient write probe\n")
                f.flush()
                os.fsync(f.fileno())
        finally:
            os.unlink(probe)
    except FileExistsError:  # an OSError, but ours: a checkpoint appeared (_check_outputs)
        folder.release(failed=True)
        raise
    except OSError as err:
        folder.release(failed=True)
        raise UsageError(f"cannot write the run folder {save_dir}: {err.strerror or err}") from None
    except BaseException:
        folder.release(failed=True)
        raise
    return folder


def _check_unowned(save_dir: Path, expect_checkpoint: os.stat_result | None) -> None:
    """Refuse a folder without the marker that holds files of the run's names, unless they are a
    run of this package's from before the marker (its checkpoint reads as one)."""
    found = [n for n in (*_OUTPUT_FILES, *_OUTPUT_FOLDERS) if os.path.lexists(save_dir / n)]
    if not found:
        return
    checkpoint = save_dir / CHECKPOINT_NAME
    if expect_checkpoint is not None or _is_run_checkpoint(checkpoint):
        return  # resumed (read and checked already), or an --overwrite of such a run
    shown_names = ", ".join(f"{n}/" if (save_dir / n).is_dir() else n for n in found)
    raise UsageError(
        f"--save {save_dir} already holds {shown_names}, which no training run of this package wrote "
        f"there (it has no {RUN_MARKER}); a run would write over them: choose a new or empty folder, "
        "or move them away"
    )


def _is_run_checkpoint(path: Path) -> bool:
    if not os.path.isfile(path) or os.path.islink(path):
        return False
    try:
        read_run_checkpoint(path)
    except (UsageError, OSError):
        return False
    return True


def _check_outputs(save_dir: Path, expect_checkpoint: os.stat_result | None, overwrite: bool) -> None:
    """Under the lock: the run's names are ours to replace (no links, the right kinds), and the
    checkpoint is still the one the run was set up with."""
    for name in (*_OUTPUT_FILES, *_OUTPUT_FOLDERS):
        path = save_dir / name
        if path.is_symlink():
            raise UsageError(
                f"--save {save_dir}: its {name} is a symbolic link (to {os.readlink(path)}); the run "
                "would write through it into another folder: remove the link"
            )
        if os.path.lexists(path):
            mode = path.lstat().st_mode
            want_folder = name in _OUTPUT_FOLDERS
            if stat.S_ISDIR(mode) != want_folder or not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                raise UsageError(
                    f"--save {save_dir}: its {name} is {file_kind(mode)}, expected "
                    f"{'a folder' if want_folder else 'a regular file'}: move it away"
                )
    checkpoint = save_dir / CHECKPOINT_NAME
    now = _stat(checkpoint)
    if expect_checkpoint is None:
        if now is not None and not overwrite:
            raise FileExistsError(
                f"{save_dir} already holds a training run ({CHECKPOINT_NAME}, written while this one was "
                "being set up); pass --resume to continue it or --overwrite to start again"
            )
    elif now is None or not _same_file(now, expect_checkpoint):
        raise UsageError(
            f"{checkpoint} changed after it was read (another run wrote it meanwhile); run --resume again"
        )


def _stat(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_ino, a.st_dev, a.st_size, a.st_mtime_ns) == (b.st_ino, b.st_dev, b.st_size, b.st_mtime_ns)


def write_log(path: Path, history: list[dict[str, float]]) -> None:
    """Rewrite the whole CSV from the history (so a resumed run never duplicates rows)."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=LOG_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic_write(path, text.getvalue().encode())


def _save_model_folder(model: nn.Module, out_dir: Path, provenance: dict[str, Any]) -> None:
    """Save ``model`` as a Hugging Face-ready folder (safetensors + config.json + model card),
    atomically, loadable by :func:`densenet_efficient.from_pretrained`."""
    save_hub_folder(model, out_dir, provenance=provenance, overwrite=True)


@dataclass
class BestModel:
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


def save_epoch(
    save_dir: Path,
    trainables: dict[str, Any],
    c: TrainConfig,
    epoch: int,
    history: list[dict[str, Any]],
    best: BestModel,
    improved: bool,
    provenance: dict[str, Any],
) -> None:
    """Rank 0, end of an epoch: model folders, the CSV log, then the checkpoint (last, so that a
    checkpoint for epoch e implies everything else of epoch e is on disk).

    ``trainables`` holds the ``model``, ``optimizer``, ``scheduler``, (AMP) ``scaler`` and, for a
    run whose plan ``--memory`` chose, the ``memory_plan``."""
    model, scaler = trainables["model"], trainables["scaler"]
    meta = dict(provenance, epoch=epoch, valid_error=history[-1]["valid_error"])
    _save_model_folder(model, save_dir / "last", meta)
    if improved:
        _save_model_folder(model, save_dir / "best", meta)
    write_log(save_dir / LOG_NAME, history)
    state = {
        "format": _CHECKPOINT_FORMAT,
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": trainables["optimizer"].state_dict(),
        "scheduler": trainables["scheduler"].state_dict(),
        "scaler": scaler.state_dict() if scaler.is_enabled() else None,
        "rng": rng_state(),
        "config": c.to_dict(),
        "history": history,
        "best_valid_error": best.error,
        "best_epoch": best.epoch,
        "best_model": best.state,
        # what each label means: a resumed run refuses data whose classes are others (loop._check_classes)
        "classes": [str(name) for name in provenance["classes"]],
    }
    if trainables.get("memory_plan") is not None:  # chosen by --memory: a resumed run keeps it
        state["memory_plan"] = trainables["memory_plan"].to_json()
    # Serialised in memory first: torch.save streaming into a file turns the file's OSError (disk
    # full, quota) into an opaque "enforce fail" RuntimeError; writing bytes keeps the OSError.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(save_dir / CHECKPOINT_NAME, buffer.getvalue())


# -- resuming: what a checkpoint must fit, and restoring from it -----------------------------------


def check_resumable(
    ckpt: dict[str, Any], path: Path, *, arch: ArchConfig, classes: Sequence[str], plan: MemoryPlan | None
) -> None:
    """Refuse, before any model is built, a checkpoint the run cannot continue from: data whose
    classes are not the run's (:func:`_check_classes`), stored weights or a stored plan that do not
    fit ``arch``, the architecture its settings describe (:func:`_check_fits`)."""
    _check_classes(ckpt, classes, path)
    _check_fits(ckpt, arch, plan, path)


def _check_classes(ckpt: dict[str, Any], classes: Sequence[str], path: Path) -> None:
    """Label i must mean the class it meant when the weights were trained (a renamed class folder
    shifts the sorted order, and the run would go on learning every label as another class)."""
    stored = ckpt.get("classes")
    if stored is None or list(stored) == list(classes):
        return  # the same classes (or a checkpoint from before they were stored: shapes only)
    differ = next(
        (i for i, (a, b) in enumerate(zip(stored, classes, strict=False)) if a != b),
        min(len(stored), len(classes)),
    )
    run_has = shown(stored[differ]) if differ < len(stored) else "nothing"
    data_has = shown(classes[differ]) if differ < len(classes) else "nothing"
    raise UsageError(
        f"checkpoint {path} was trained on {len(stored)} classes {shown(stored)}, the data has "
        f"{len(classes)}: {shown(list(classes))}; label {differ} is {run_has} in the run and "
        f"{data_has} in the data, so resuming would train labels as other classes. Resume with the "
        "run's class folders, or start a new run (--overwrite or another --save)"
    )


def _check_fits(ckpt: dict[str, Any], arch: ArchConfig, plan: MemoryPlan | None, path: Path) -> None:
    """Compared from the numbers alone, so an edited ``growth_rate=100000`` is an error naming the
    file, not an allocation of gigabytes."""
    for key in ("model", "best_model"):
        state = ckpt.get(key)
        if state is None:
            continue
        odd = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
        try:
            if odd is not None:
                raise StateDictMismatchError(
                    f"its entry {shown(odd)} is a {type(state[odd]).__name__}, not a tensor"
                )
            arch.check_shapes(state)
        except StateDictMismatchError as err:
            detail = str(err).removeprefix(f"checkpoint does not fit {arch.describe()}: ")
            raise UsageError(
                f"checkpoint {path}: its {key.replace('_', ' ')} does not fit the {arch.name} its settings "
                f"describe: {detail}"
            ) from None
    if plan is not None:
        try:
            resolve_memory_plan(plan, arch)
        except UsageError as err:
            raise UsageError(
                f"checkpoint {path}: its memory_plan does not fit the {arch.name}: {err}"
            ) from None


def restore_training_state(
    ckpt: dict[str, Any],
    path: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.MultiStepLR,
    scaler: torch.amp.GradScaler,
    n_epochs: int,
) -> None:
    """Load the checkpoint's weights, optimiser, LR schedule (for ``n_epochs``, see
    :func:`rescheduled`), AMP scaler and RNG states into the run's fresh objects.

    The weights were compared with the architecture before it was built (:func:`check_resumable`);
    a part that still cannot be restored is refused with a :class:`UsageError` naming it, before
    anything is trained or written.
    """
    steps = {
        "model": lambda: model.load_state_dict(ckpt["model"]),
        "optimizer": lambda: _load_optimizer(optimizer, ckpt["optimizer"]),
        "scheduler": lambda: _load_schedule(
            scheduler, optimizer, ckpt["scheduler"], ckpt["config"]["n_epochs"], n_epochs
        ),
        "scaler": lambda: ckpt.get("scaler") and scaler.load_state_dict(ckpt["scaler"]),
        "rng": lambda: restore_rng_state(ckpt["rng"]),
    }
    for key, step in steps.items():
        try:
            step()
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as err:
            reason = (str(err).strip().splitlines() or [""])[0][:200]
            raise UsageError(
                f"checkpoint {path}: its {key} state cannot be restored ({type(err).__name__}: {reason})"
            ) from None


def _load_optimizer(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """``optimizer.load_state_dict(state)``, refusing what it would accept and fail on later:
    ``torch.optim`` takes a hyperparameter of another type, or a momentum buffer of another
    shape, as it is, and the first step would raise in the middle of an epoch."""
    fresh = optimizer.state_dict()["param_groups"]
    optimizer.load_state_dict(state)
    for group, template in zip(optimizer.param_groups, fresh, strict=True):
        for name in _IMPLEMENTATION_KEYS:  # this build's choice, whatever the checkpoint's was
            group[name] = template[name]
        for name, want in template.items():
            got = group.get(name)
            if name != "params" and _kind(got) != _kind(want):
                raise TypeError(f"param group {name} is {shown(got)}, expected a {_kind(want)}")
        for p in group["params"]:
            buf = optimizer.state.get(p, {}).get("momentum_buffer")
            if buf is not None and (not isinstance(buf, torch.Tensor) or buf.shape != p.shape):
                raise ValueError(
                    f"a momentum buffer of shape {shown(getattr(buf, 'shape', buf))} for a parameter of {tuple(p.shape)}"
                )


#: Param-group keys that say how torch computes the step, not what it computes: a checkpoint
#: written before the loop used fused SGD holds ``fused=None``, and the step must stay fused.
_IMPLEMENTATION_KEYS = ("foreach", "fused")


def _kind(value: Any) -> str:
    """A value's kind as a type check needs it: an int where a float was is still a number."""
    if isinstance(value, bool) or value is None:
        return type(value).__name__
    return "number" if isinstance(value, (int, float)) else type(value).__name__


def _load_schedule(
    scheduler: torch.optim.lr_scheduler.MultiStepLR,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    planned: int,
    n_epochs: int,
) -> None:
    """The stored schedule, planned for ``planned`` epochs, continued for ``n_epochs``; the
    optimiser's LR is the one the schedule gives now."""
    scheduler.load_state_dict(state if n_epochs == planned else rescheduled(state, n_epochs))
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr(), strict=True):
        group["lr"] = lr


def rescheduled(state: dict[str, Any], n_epochs: int) -> dict[str, Any]:
    """A ``MultiStepLR`` state dict as a run planned for ``n_epochs`` from the start holds it at
    the same epoch: that run's milestones (:func:`.config.lr_milestones`) and the LR they give now.

    The LR is multiplied milestone by milestone, as MultiStepLR itself does, so it is bit for bit
    what that run uses at this epoch. The result goes through the scheduler's ``load_state_dict``.
    """
    milestones = Counter(lr_milestones(n_epochs))
    passed = sorted(m for m in milestones if m <= state["last_epoch"])
    lrs = []
    for base in state["base_lrs"]:
        lr = base
        for milestone in passed:
            lr *= state["gamma"] ** milestones[milestone]
        lrs.append(lr)
    return {**state, "milestones": milestones, "_last_lr": lrs}
