"""Read a checkpoint file safely and find the model's tensors inside it.

Checkpoints arrive as torch ``.pth`` files (zip or pre-1.6 legacy serialization), safetensors files,
or training checkpoints that wrap the weights in a dict (``state_dict``, ``model``,
``model_state_dict``, ``state_dict_ema``, ...). This module never unpickles arbitrary objects:
``torch.load`` always runs with ``weights_only=True`` (``argparse.Namespace`` is the one extra,
inert type allowed, because timm and many training scripts store their arguments that way).

>>> from densenet_efficient.io.checkpoint import read_checkpoint

    ckpt = read_checkpoint("densenet121-a639ec97.pth")
    ckpt.container, ckpt.wrapper_key, len(ckpt.state_dict)
    # ('torch-legacy', None, 727)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import UsageError, first_line
from .files import require_regular_file

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "WRAPPER_KEYS",
    "find_state_dict",
    "load_torch_file",
    "read_checkpoint",
    "sha256_file",
]

#: Dict keys under which training scripts store the weights, in the order they are tried: the live
#: weights before any EMA copy (timm's own ``load_checkpoint`` default), then the EMA copies.
WRAPPER_KEYS: tuple[str, ...] = (
    "state_dict",
    "model_state_dict",
    "model",
    "module",
    "net",
    "network",
    "weights",
    "params",
    "state_dict_ema",
    "model_ema",
    "ema_state_dict",
    "ema",
)

_ZIP_MAGIC = b"PK\x03\x04"


class CheckpointError(UsageError):
    """A checkpoint cannot be read or does not hold what was expected (one clear sentence)."""


@dataclass
class Checkpoint:
    """The tensors of one checkpoint file, with where they came from.

    Attributes:
        state_dict: the tensors under their names in the file (no renaming applied yet).
        path: the file that was read.
        sha256: hex digest of the file's bytes.
        container: ``"torch-zip"``, ``"torch-legacy"`` or ``"safetensors"``.
        wrapper_key: the path of dict keys the tensors were found under (``"state_dict_ema"``,
            ``"model/module"``), or None when the file is a plain state dict.
        other_wrapper_keys: further candidate keys in the same file (e.g. an EMA copy) that were
            not chosen.
        metadata: safetensors header metadata (empty for torch files).
    """

    state_dict: dict[str, torch.Tensor]
    path: Path
    sha256: str
    container: str
    wrapper_key: str | None = None
    other_wrapper_keys: tuple[str, ...] = ()
    metadata: dict[str, str] | None = None


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (checkpoints can be hundreds of MB)."""
    digest = hashlib.sha256()
    with open(require_regular_file(path), "rb") as f:
        while block := f.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def _sniff(path: Path) -> str:
    """The container format from the file's first bytes (extensions lie; magic numbers do not)."""
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) == 0:
        raise CheckpointError(f"cannot read {path}: the file is empty")
    if head.startswith(_ZIP_MAGIC):
        return "torch-zip"
    # safetensors: little-endian u64 header size, then a JSON object
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    # torch's legacy format starts with a pickled magic number (protocol 2: b'\x80\x02')
    if head[:1] == b"\x80":
        return "torch-legacy"
    raise CheckpointError(
        f"cannot read {path}: not a torch checkpoint (zip or legacy pickle) or a safetensors file "
        f"(first bytes {head[:8]!r})"
    )


def _load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as err:  # safetensors raises its own SafetensorError for truncated/corrupt files
        raise CheckpointError(
            f"cannot read {path}: truncated or corrupt safetensors file ({first_line(err)})"
        ) from None
    return tensors, metadata


def load_torch_file(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``, every failure turned into one :class:`CheckpointError`.

    The one place this package unpickles: tensors, plain containers and ``argparse.Namespace``.
    """
    path = require_regular_file(path, "checkpoint")  # a FIFO would block torch.load forever
    try:
        # Training scripts (timm, many others) store their argparse arguments next to the weights;
        # Namespace is a plain attribute bag, so allowing it cannot run code.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        if found or "weights only load failed" in str(err).lower():
            what = f"it references {found.group(1)}" if found else _unsafe_globals(path) or first_line(err)
            raise CheckpointError(
                f"refusing to read {path}: it pickles Python objects other than tensors and plain "
                f"containers, which could run code when loaded ({what}); "
                "re-save just the weights with torch.save(model.state_dict(), ...)"
            ) from None
        raise CheckpointError(
            f"cannot read {path}: truncated or corrupt torch file ({first_line(err)})"
        ) from None
    # Corruption surfaces as whatever the unpickler trips over: struct.error for a legacy (pre-zip)
    # file cut inside its tensor data, AssertionError/TypeError for damaged storage records.
    except (
        RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, struct.error, AssertionError, TypeError
    ) as err:  # fmt: skip
        raise CheckpointError(
            f"cannot read {path}: truncated or corrupt torch file ({first_line(err)})"
        ) from None


def _unsafe_globals(path: Path) -> str:
    """Which non-allowlisted globals a zip checkpoint references, for the error message."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # legacy files and corrupt zips cannot be scanned: fall back to torch's message
        return ""
    names = [n for n in names if n != "argparse.Namespace"]
    return "it references " + ", ".join(names[:5]) if names else ""


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) for k in obj)
        and all(isinstance(v, torch.Tensor) for v in obj.values())
    )


#: Wrappers deeper than this are refused: real training checkpoints nest weights two or three dicts
#: deep, and the search recurses once per level (3000 levels was a RecursionError).
MAX_WRAPPER_DEPTH = 32


class _TooDeep(CheckpointError):
    """Weights wrapped more than :data:`MAX_WRAPPER_DEPTH` dicts deep."""


def find_state_dict(
    obj: Any, key: str | None = None, _depth: int = 0
) -> tuple[dict[str, torch.Tensor], str | None, tuple[str, ...]]:
    """The dict of tensors inside a loaded checkpoint object.

    Args:
        obj: what ``torch.load`` returned.
        key: where the weights are, as a ``/``-separated path of dict keys (``"state_dict_ema"``,
            ``"model/module"``); None searches :data:`WRAPPER_KEYS`, recursively.

    Returns:
        ``(state_dict, wrapper_key, other_candidates)``.

    >>> sd, where, others = find_state_dict({"epoch": 3, "state_dict": {"w": torch.zeros(1)}})
    >>> where, list(sd)
    ('state_dict', ['w'])
    """
    if _depth > MAX_WRAPPER_DEPTH:
        raise _TooDeep(
            f"the weights are wrapped in more than {MAX_WRAPPER_DEPTH} nested dicts; expected a dict of "
            "tensors, or a training checkpoint holding one a few keys deep"
        )
    if key is not None:
        node = obj
        for part in key.split("/")[: MAX_WRAPPER_DEPTH + 1]:
            if not isinstance(node, Mapping) or part not in node:
                have = ", ".join(repr(k) for k in node) if isinstance(node, Mapping) else type(node).__name__
                raise CheckpointError(f"checkpoint has no entry {key!r} (at {part!r} found: {have})")
            node = node[part]
        if not _is_state_dict(node):
            found, where, _ = find_state_dict(node, None, _depth + len(key.split("/")))
            return found, f"{key}/{where}" if where else key, ()
        return dict(node), key, ()

    if _is_state_dict(obj):
        return dict(obj), None, ()
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"expected a dict of tensors or a training checkpoint dict, found a {type(obj).__name__}"
        )
    candidates = []
    for k in WRAPPER_KEYS:
        if k in obj:
            try:
                sd, where, _ = find_state_dict(obj[k], None, _depth + 1)
            except _TooDeep:
                raise
            except CheckpointError:
                continue
            candidates.append((sd, f"{k}/{where}" if where else k))
    if not candidates:
        shown = ", ".join(repr(k) for k in list(obj)[:12])
        raise CheckpointError(
            f"found no weights in the checkpoint: expected a dict of tensors or one of the keys "
            f"{', '.join(WRAPPER_KEYS)} holding one; its top-level keys are {shown}"
        )
    sd, where = candidates[0]
    return sd, where, tuple(w for _, w in candidates[1:])


def read_checkpoint(path: str | os.PathLike, *, key: str | None = None) -> Checkpoint:
    """Read a checkpoint file (torch zip/legacy ``.pth``, or safetensors) without unsafe unpickling.

    Args:
        path: the file.
        key: where the weights sit in a training-checkpoint dict (see :func:`find_state_dict`).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: truncated/corrupt file, unsafe pickle content, or no tensors found.
    """
    path = Path(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such checkpoint file: {path}")
    require_regular_file(path, "checkpoint")  # a FIFO or a device would block or never end
    container = _sniff(path)
    metadata: dict[str, str] = {}
    if container == "safetensors":
        obj, metadata = _load_safetensors(path)
    else:
        obj = load_torch_file(path)
    try:
        state_dict, where, others = find_state_dict(obj, key)
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from None
    return Checkpoint(
        state_dict=state_dict,
        path=path,
        sha256=sha256_file(path),
        container=container,
        wrapper_key=where,
        other_wrapper_keys=others,
        metadata=metadata,
    )
