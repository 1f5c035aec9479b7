"""Hash-checked downloads, following torch.hub's convention that a file named
``<name>-<first hex digits of its sha256>.<ext>`` (``densenet121-a639ec97.pth``) carries its hash.

Nothing is unpickled here except through ``torch.load(weights_only=True)``, and a cached file is
re-hashed before it is trusted: torch.hub itself would load a cache file damaged after download.

Downloads have a timeout (``$DENSENET_EFFICIENT_DOWNLOAD_TIMEOUT`` seconds, default 30) on
connecting and on every read, and are tried twice: ``torch.hub.download_url_to_file`` has none, so a
server that accepts the connection and never answers would hang the caller forever.
"""

from __future__ import annotations

import hashlib
import http.client
import math
import os
import pickle
import re
import urllib.error
import urllib.request
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from ..errors import UsageError
from .atomic import atomic_write
from .checkpoint import sha256_file

__all__ = [
    "DOWNLOAD_TIMEOUT_ENV",
    "WeightsIntegrityError",
    "download_file",
    "download_timeout",
    "fetch_state_dict",
    "hash_prefix",
    "url_filename",
]

DOWNLOAD_TIMEOUT_ENV = "DENSENET_EFFICIENT_DOWNLOAD_TIMEOUT"
DEFAULT_DOWNLOAD_TIMEOUT = 30.0
_ATTEMPTS = 2  # a timeout is retried once: one lost packet or a busy server should not fail a run
_CHUNK = 1 << 16

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


def download_timeout() -> float:
    """Seconds to wait for a connection and for each read: ``$DENSENET_EFFICIENT_DOWNLOAD_TIMEOUT``
    or 30. A value that is not a positive number is a :class:`~densenet_efficient.UsageError`."""
    raw = os.environ.get(DOWNLOAD_TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_DOWNLOAD_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise UsageError(f"{DOWNLOAD_TIMEOUT_ENV} must be a positive number of seconds, found {raw!r}")
    return value


class _HashMismatch(RuntimeError):
    """The downloaded bytes' sha256 does not start with the name's prefix (worded as torch.hub's)."""


def _is_timeout(err: BaseException) -> bool:
    """urlopen reports a connect timeout as URLError(reason=timeout), a read timeout bare."""
    return isinstance(err, TimeoutError) or (
        isinstance(err, urllib.error.URLError) and isinstance(err.reason, TimeoutError)
    )


def _download(url: str, dst: Path, prefix: str, progress: bool) -> None:
    """Stream ``url`` into ``dst`` atomically, hash-checked against ``prefix`` when there is one.

    Every connect and read waits at most :func:`download_timeout` seconds; a timeout is retried
    once, then raised as one :class:`TimeoutError` that says how to wait longer. On any failure
    ``dst`` is left as it was (nothing partial: :func:`atomic_write`).
    """
    from torch.hub import tqdm  # torch.hub's progress bar (tqdm, or its stand-in when absent)

    timeout = download_timeout()
    request = urllib.request.Request(url, headers={"User-Agent": "densenet_efficient"})

    def write(f) -> None:
        digest = hashlib.sha256()
        with urllib.request.urlopen(request, timeout=timeout) as response:
            size = response.headers.get("Content-Length")
            total = int(size) if size and size.isdigit() else None
            with tqdm(total=total, disable=not progress, unit="B", unit_scale=True, unit_divisor=1024) as bar:
                while chunk := response.read(_CHUNK):
                    f.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        found = digest.hexdigest()
        if prefix and not found.startswith(prefix):
            raise _HashMismatch(f'invalid hash value (expected "{prefix}", got "{found}")')
        if total is not None and f.tell() != total:  # urllib reads a dropped connection as the end
            raise ConnectionError(f"the connection closed after {f.tell()} of {total} bytes")

    for attempt in range(1, _ATTEMPTS + 1):
        try:
            atomic_write(dst, write)
            return
        except (urllib.error.URLError, TimeoutError) as err:
            if not _is_timeout(err):
                raise
            if attempt == _ATTEMPTS:
                raise TimeoutError(
                    f"no answer from {url} within {timeout:g} s (tried {_ATTEMPTS} times); "
                    f"set {DOWNLOAD_TIMEOUT_ENV} to a larger number of seconds to wait longer"
                ) from None


def download_file(url: str, dst: str | os.PathLike, progress: bool = True) -> Path:
    """Download ``url`` to ``dst``; a name carrying a sha256 prefix is hash-checked.

    Raises :class:`OSError` when the server cannot be reached and :class:`WeightsIntegrityError`
    when the bytes do not match the name's hash (nothing is left at ``dst`` then).
    """
    dst = Path(dst)
    prefix = hash_prefix(url_filename(url))
    try:
        _download(url, dst, prefix, progress)
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as err:
        raise OSError(f"cannot download {url}: {getattr(err, 'reason', err)}") from None
    except _HashMismatch as err:  # nothing was written to dst
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
        if not cached.is_file():  # our download (with a timeout); torch.hub then loads the cached file
            model_dir.mkdir(parents=True, exist_ok=True)
            _download(url, cached, prefix, progress)
        state_dict = torch.hub.load_state_dict_from_url(
            url,
            model_dir=str(model_dir),
            map_location="cpu",
            progress=progress,
            check_hash=True,
            file_name=filename,
            weights_only=True,
        )
    except _HashMismatch as e:  # nothing was written to the cache
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
