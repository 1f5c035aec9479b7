"""A run folder on disk: the resumable checkpoint, the CSV log and the best/last model folders.

A save directory holds ``checkpoint.pt`` (everything needed to resume, rewritten atomically each
epoch), ``log.csv`` (one row per epoch), and ``best/`` and ``last/`` Hugging Face-ready model
folders that :func:`densenet_efficient.from_pretrained` loads. The checkpoint is written last,
so a checkpoint for epoch e implies everything else of epoch e is on disk.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..errors import UsageError, shown
from ..io.atomic import atomic_write, remove_stale_temporaries
from ..io.checkpoint import CheckpointError, load_torch_file
from ..models.hub import save_hub_folder
from ..models.memory_plan import MemoryPlan
from .config import TrainConfig, check_settings

__all__ = [
    "CHECKPOINT_NAME",
    "LOG_COLUMNS",
    "LOG_NAME",
    "BestModel",
    "check_run_folder",
    "read_run_checkpoint",
    "restore_rng_state",
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
#: What a run writes in its folder, atomically (so a killed save may leave their temporaries).
_PROBE = "write-probe"
_RUN_FILES = (CHECKPOINT_NAME, LOG_NAME, "last", "best", _PROBE)
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
        MemoryPlan.from_json(ckpt["memory_plan"], f"checkpoint {path}: its memory_plan")
    return ckpt


def _checkpoint_problem(ckpt: dict[str, Any]) -> str | None:
    """What makes a checkpoint of the right format unusable (None when its bookkeeping is sound).

    Only the cheap, structural facts; whether the weights, optimiser and RNG states fit the model
    is checked when they are restored (``loop._restore``)."""
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


def check_run_folder(save_dir: Path) -> None:
    """Make sure the run can be saved in ``save_dir`` before any training time is spent.

    Creates the folder when missing, removes what an interrupted save of an earlier invocation
    left (this package's own temporaries only, see :func:`..io.atomic.remove_stale_temporaries`),
    then writes and removes a probe file of our own. Raises :class:`UsageError` naming the folder
    and the reason (a file in the way, read-only file system, no permission, disk full)."""
    if save_dir.exists() and not save_dir.is_dir():
        raise UsageError(f"--save {save_dir} is a file; expected a folder for the run (new or existing)")
    try:
        save_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(save_dir, _RUN_FILES)
        fd, probe = tempfile.mkstemp(prefix=f".{_PROBE}.", suffix=".tmp", dir=save_dir)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(b"densenet-efficient write probe\n")
                f.flush()
                os.fsync(f.fileno())
        finally:
            os.unlink(probe)
    except OSError as err:
        raise UsageError(f"cannot write the run folder {save_dir}: {err.strerror or err}") from None


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
    }
    if trainables.get("memory_plan") is not None:  # chosen by --memory: a resumed run keeps it
        state["memory_plan"] = trainables["memory_plan"].to_json()
    # Serialised in memory first: torch.save streaming into a file turns the file's OSError (disk
    # full, quota) into an opaque "enforce fail" RuntimeError; writing bytes keeps the OSError.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(save_dir / CHECKPOINT_NAME, buffer.getvalue())
