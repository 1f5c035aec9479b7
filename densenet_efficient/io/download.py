"""Hash-checked downloads, following torch.hub's convention that a file named
``<name>-<first hex digits of its sha256>.<ext>`` (``densenet121-a639ec97.pth``) carries its hash.

Nothing is unpickled here except through ``torch.load(weights_only=True)``, and a cached file is
re-hashed before it is trusted: torch.hub itself would load a cache file damaged after download.
"""

from __future__ import annotations

import http.client
import os
import pickle
import re
import urllib.error
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from .checkpoint import sha256_file

__all__ = ["WeightsIntegrityError", "download_file", "fetch_state_dict", "hash_prefix", "url_filename"]

# 8 to 64 hex digits right before the extension. Stricter than torch.hub.HASH_REGEX: user file names
# often carry other dashes ("run-3.pth") that are not hashes.
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$")


class WeightsIntegrityError(RuntimeError):
    """A weights file failed its sha256 check, or holds something other than tensors."""


def hash_prefix(filename: str) -> str:
    """The sha256 prefix a file name carries (``densenet121-a639ec97.pth`` -> ``a639ec97``), or ``""``."""
    m = _HASH_IN_NAME.search(filename)
    return m.group(1) if m else ""


def url_filename(url: str, default: str = "checkpoint") -> str:
    """The last path component of ``url`` (``https://x/y/densenet121-a639ec97.pth`` -> the file name)."""
    return os.path.basename(urlparse(url).path) or default


def download_file(url: str, dst: str | os.PathLike, progress: bool = True) -> Path:
    """Download ``url`` to ``dst``; a name carrying a sha256 prefix is hash-checked.

    Raises :class:`OSError` when the server cannot be reached and :class:`WeightsIntegrityError`
    when the bytes do not match the name's hash (nothing is left at ``dst`` then).
    """
    dst = Path(dst)
    prefix = hash_prefix(url_filename(url))
    try:
        torch.hub.download_url_to_file(url, str(dst), hash_prefix=prefix or None, progress=progress)
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as err:
        raise OSError(f"cannot download {url}: {getattr(err, 'reason', err)}") from None
    except RuntimeError as err:  # torch.hub's hash mismatch; it deletes the temporary file
        raise WeightsIntegrityError(
            f"download of {url} failed its integrity check: {err}; by torch.hub's convention its name "
            f"ends in the first hex digits of its sha256 ({prefix}); if that part of the name is not "
            "a hash, download the file yourself and pass its path"
        ) from None
    return dst


def fetch_state_dict(
    url: str, filename: str, model_dir: str | os.PathLike | None = None, progress: bool = True
) -> Mapping[str, Any]:
    """``torch.hub.load_state_dict_from_url`` with the hash check on, ``weights_only=True`` and a
    re-hash of any cached copy (deleted and downloaded again when it no longer matches)."""
    model_dir = Path(model_dir) if model_dir is not None else Path(torch.hub.get_dir()) / "checkpoints"
    cached = model_dir / filename
    prefix = hash_prefix(filename)
    if cached.is_file():
        digest = sha256_file(cached)
        if not digest.startswith(prefix):
            warnings.warn(
                f"cached weights {cached} fail their sha256 check (expected a hash starting with {prefix}, "
                f"found {digest[: len(prefix)]}...); deleting the file and downloading it again",
                stacklevel=4,
            )
            cached.unlink()
    try:
        state_dict = torch.hub.load_state_dict_from_url(
            url,
            model_dir=str(model_dir),
            map_location="cpu",
            progress=progress,
            check_hash=True,
            file_name=filename,
            weights_only=True,
        )
    except RuntimeError as e:
        if "invalid hash value" not in str(e):
            raise
        # torch.hub downloads to a temporary file and deletes it when the hash is wrong.
        raise WeightsIntegrityError(
            f"the download of {url} failed its sha256 check ({e}): it was cut short, corrupted, or the "
            f"server sent a different file; it was discarded and nothing was cached in {model_dir}"
        ) from None
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsIntegrityError(
            f"refusing to load {cached}: it holds objects other than tensors, which torch.load(weights_only=True) "
            f"will not unpickle ({first}); nothing in it was executed"
        ) from None
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as e:
        raise OSError(
            f"could not download {url} ({e}); nothing was cached in {model_dir}. Check the connection, "
            f"or place the file there yourself (its sha256 must start with {prefix})"
        ) from None
    if not isinstance(state_dict, Mapping):
        raise WeightsIntegrityError(f"{cached} holds a {type(state_dict).__name__}, expected a state_dict")
    return state_dict
