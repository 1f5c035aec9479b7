"""Step zero of a conversion: find the checkpoint file a SRC names and say what format it is in.

SRC is a file, a Hub-style folder (a timm snapshot), an http(s) URL (a torchvision-style
``name-<sha256 prefix>.pth`` is hash-checked) or an architecture name (torchvision's file, hash-checked).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from ..io.checkpoint import Checkpoint
from ..io.download import WeightsIntegrityError, download_file, url_filename
from ..io.state_dict import legacy_key_styles
from ..models.config import ARCHITECTURES
from ..models.hub import PICKLE_WEIGHTS_NAME, WEIGHTS_NAME
from ..models.weights import get_weights, load_state_dict_from_manifest
from .infer import ConversionError

__all__ = ["fetch_source", "source_format", "torchvision_loadable"]

# weights files of a Hub repo folder, in the order timm's loader prefers them
_FOLDER_WEIGHTS = (WEIGHTS_NAME, PICKLE_WEIGHTS_NAME)


def _download(url: str, workdir: Path, progress: bool) -> Path:
    """Fetch a URL into ``workdir``; a torchvision-style ``name-<hex>.pth`` is hash-checked."""
    try:
        return download_file(url, workdir / url_filename(url), progress=progress)
    except (OSError, WeightsIntegrityError) as err:
        raise ConversionError(str(err)) from None


def _published_file(arch: str, progress: bool, model_dir: str | None) -> Path:
    """The published checkpoint of a registered architecture, downloaded with the hash check."""
    spec = get_weights(arch)  # no published weights (densenet_bc_100): a clear ValueError
    # downloads into the cache (or re-hashes the cached copy) and checks the sha256 prefix
    load_state_dict_from_manifest(arch, progress=progress, model_dir=model_dir)
    cache = Path(model_dir) if model_dir is not None else Path(torch.hub.get_dir()) / "checkpoints"
    path = cache / spec.filename
    if not path.is_file():
        raise ConversionError(f"{arch}: the download did not leave {path} in the cache")
    return path


def fetch_source(src: str | os.PathLike, workdir: Path, progress: bool, model_dir: str | None) -> Path:
    """The local checkpoint file ``src`` names (downloads land in ``workdir`` or the torch.hub cache)."""
    text = os.fspath(src)
    if re.match(r"^https?://", text):
        return _download(text, workdir, progress)
    path = Path(text)
    if path.is_dir():
        # a downloaded Hub repo (timm's densenet121.tv_in1k snapshot, say): take its weights file
        for name in _FOLDER_WEIGHTS:
            if (path / name).exists():  # not a regular file: refused by name when read
                return path / name
        raise IsADirectoryError(
            f"{path} is a folder without {' or '.join(_FOLDER_WEIGHTS)}; SRC must be a checkpoint file, "
            "a Hub-style folder, an http(s) URL or an architecture name"
        )
    if path.exists():
        return path
    if text in ARCHITECTURES:
        return _published_file(text, progress, model_dir)
    raise FileNotFoundError(
        f"{text!r} is not a file, an http(s) URL or an architecture name ({', '.join(sorted(ARCHITECTURES))})"
    )


def source_format(ckpt: Checkpoint, prefix: str) -> str:
    container = {
        "torch-zip": "torch zip .pth",
        "torch-legacy": "torch legacy-serialization .pth",
        "safetensors": "safetensors",
    }[ckpt.container]
    parts = [container]
    if ckpt.wrapper_key:
        parts.append(f"weights under '{ckpt.wrapper_key}'")
    styles = legacy_key_styles(ckpt.state_dict)
    if prefix:
        styles.append(f"'{prefix}' prefix")
    parts.append(", ".join(styles) if styles else "torchvision key layout")
    return "; ".join(parts)


def torchvision_loadable(ckpt: Checkpoint, prefix: str) -> bool:
    """A plain torch file that torchvision's own loader reads: the source model is torchvision's."""
    styles = legacy_key_styles(ckpt.state_dict)
    return (
        ckpt.container != "safetensors"
        and ckpt.wrapper_key is None
        and not prefix
        and all(s.startswith("legacy torchvision") for s in styles)
    )
