"""Hash-checked downloads, following torch.hub's convention that a file named
``<name>-<first hex digits of its sha256>.<ext>`` (``densenet121-a639ec97.pth``) carries its hash.

Nothing is unpickled here except through ``torch.load(weights_only=True)``, and a cached file is
re-hashed before it is trusted: torch.hub itself would load a cache file damaged after download.

Downloads have a timeout (``$DENSENET_EFFICIENT_DOWNLOAD_TIMEOUT`` seconds, default 30) on
connecting and on every read, and are tried twice: ``torch.hub.download_url_to_file`` has none, so a
server that accepts the connection and never answers would hang the caller forever. They are
bounded overall too (one downloader, :func:`_download`): a server that streams past the expected
size (a manifest's ``file_size``) is cut off there, and one that drips (less than
:data:`MIN_RATE` bytes a second over any timeout's span) is given up on; either way nothing is
left in the cache. Every failure is one :class:`DownloadError` naming the URL (and, when the
cache cannot take the file, the cache's path).
"""

from __future__ import annotations

import hashlib
import http.client
import math
import os
import pickle
import re
import time
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
    "MAX_DOWNLOAD_BYTES",
    "MIN_RATE",
    "DownloadError",
    "WeightsIntegrityError",
    "check_url",
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
#: Bytes a second a download must keep up, averaged over each span of the timeout: a server that
#: sends one byte before every read timeout would otherwise hold the caller forever.
MIN_RATE = 1024
#: The bound of a download whose size nobody states (a URL given to ``convert``): far above any
#: DenseNet checkpoint (DenseNet-161's is 110 MiB; a training checkpoint holds a few copies), far
#: below what a server streaming forever would fill a disk with.
MAX_DOWNLOAD_BYTES = 4 * 2**30

# 8 to 64 hex digits right before the extension. Stricter than torch.hub.HASH_REGEX: user file names
# often carry other dashes ("run-3.pth") that are not hashes.
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$")


class WeightsIntegrityError(RuntimeError):
    """A weights file failed its sha256 check, or holds something other than tensors."""


class DownloadError(OSError):
    """A download failed (no answer, an error status, too large, too slow, cut short) or its
    destination could not take it (a full or read-only cache); nothing was left there.

    An :class:`OSError` (the environment's fault) that the command line shows as one sentence."""


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


class _Unbounded(ConnectionError):
    """The server sent more than expected, or too slowly: not retried."""


def _is_timeout(err: BaseException) -> bool:
    """urlopen reports a connect timeout as URLError(reason=timeout), a read timeout bare."""
    return isinstance(err, TimeoutError) or (
        isinstance(err, urllib.error.URLError) and isinstance(err.reason, TimeoutError)
    )


def _download(url: str, dst: Path, prefix: str, progress: bool, max_bytes: int | None = None) -> None:
    """Stream ``url`` into ``dst`` atomically, hash-checked against ``prefix`` when there is one.

    Every connect and read waits at most :func:`download_timeout` seconds; a timeout is retried
    once, then raised as one :class:`TimeoutError` that says how to wait longer. More than
    ``max_bytes`` (announced or sent; default :data:`MAX_DOWNLOAD_BYTES`), or less than :data:`MIN_RATE` bytes a second over a
    timeout's span, stops the download (:class:`_Unbounded`). On any failure ``dst`` is left as
    it was (nothing partial: :func:`atomic_write`).
    """
    from torch.hub import tqdm  # torch.hub's progress bar (tqdm, or its stand-in when absent)

    timeout = download_timeout()
    request = urllib.request.Request(url, headers={"User-Agent": "densenet_efficient"})
    if max_bytes is None:
        max_bytes = MAX_DOWNLOAD_BYTES

    def write(f) -> None:
        digest = hashlib.sha256()
        with urllib.request.urlopen(request, timeout=timeout) as response:
            size = response.headers.get("Content-Length")
            total = int(size) if size and size.isdigit() else None
            if total is not None and total > max_bytes:
                raise _Unbounded(f"the server announced {total} bytes, more than the expected {max_bytes}")
            # read1: what has arrived (read(n) would wait for all n bytes, a day at one byte a second)
            read = getattr(response, "read1", response.read)
            received, span_start, span_bytes = 0, time.monotonic(), 0
            with tqdm(total=total, disable=not progress, unit="B", unit_scale=True, unit_divisor=1024) as bar:
                while chunk := read(_CHUNK):
                    received += len(chunk)
                    if received > max_bytes:
                        raise _Unbounded(f"the server sent more than the expected {max_bytes} bytes")
                    f.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
                    span_bytes += len(chunk)
                    elapsed = time.monotonic() - span_start
                    if elapsed >= timeout:
                        if span_bytes < MIN_RATE * elapsed:
                            raise _Unbounded(
                                f"it sent {span_bytes} bytes in {elapsed:.1f} s, less than {MIN_RATE} bytes a "
                                f"second ({received} bytes so far)"
                            )
                        span_start, span_bytes = time.monotonic(), 0
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


#: What a failed download raises: the network's, the server's and the destination's errors.
_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError)


def _reason(err: BaseException) -> str:
    """One line for a download's failure: urllib's ``reason`` when it has one (an HTTP status,
    a refused connection), else the text's first line (a redirect loop's text spans three)."""
    reason = getattr(err, "reason", None)
    if isinstance(err, urllib.error.HTTPError):
        text = f"HTTP {err.code} {err.reason}"
    else:
        text = str(reason if reason is not None else err)
    return text.strip().splitlines()[0] if text.strip() else type(err).__name__


def _destination_error(err: OSError, where: Path) -> DownloadError:
    """A local write failure (a full disk, a read-only cache), naming the folder the file was for."""
    reason = err.strerror or str(err)
    error = DownloadError(f"cannot store the download in {where}: {reason}")  # one argument: no "[Errno n]"
    error.errno = err.errno  # a full disk stays recognisable (ENOSPC)
    return error


def check_url(url: str, what: str = "download URL") -> str:
    """``url`` if urllib can fetch it: an http(s) or file URL with a host (http) and, for an IPv6
    literal, a well-formed one; else a :class:`UsageError` naming ``what`` and the URL."""
    try:
        parts = urlparse(url)
        parts.port  # noqa: B018 (parses the port: a broken IPv6 literal or port raises here)
    except ValueError as err:
        raise UsageError(f"{what} {url!r} is not a valid URL ({err})") from None
    if parts.scheme not in ("http", "https", "file") or (parts.scheme != "file" and not parts.hostname):
        raise UsageError(
            f"{what} {url!r} is not a valid URL: expected http://host/..., https://host/... or file:///path"
        )
    return url


def download_file(url: str, dst: str | os.PathLike, progress: bool = True, max_bytes: int | None = None) -> Path:
    """Download ``url`` to ``dst``; a name carrying a sha256 prefix is hash-checked.

    Raises :class:`DownloadError` when the server cannot be reached, answers with an error, sends
    more than ``max_bytes`` or too slowly, or ``dst`` cannot be written, and
    :class:`WeightsIntegrityError` when the bytes do not match the name's hash (nothing is left at
    ``dst`` then).
    """
    dst = Path(dst)
    check_url(url)
    prefix = hash_prefix(url_filename(url))
    try:
        _download(url, dst, prefix, progress, max_bytes)
    except _NETWORK_ERRORS as err:
        raise DownloadError(f"cannot download {url}: {_reason(err)}") from None
    except _HashMismatch as err:  # nothing was written to dst
        raise WeightsIntegrityError(
            f"download of {url} failed its integrity check: {err}; by torch.hub's convention its name "
            f"ends in the first hex digits of its sha256 ({prefix}); if that part of the name is not "
            "a hash, download the file yourself and pass its path"
        ) from None
    except OSError as err:  # not the network's: the destination's (full, read-only)
        raise _destination_error(err, dst.parent) from None
    return dst


def fetch_state_dict(
    url: str,
    filename: str,
    model_dir: str | os.PathLike | None = None,
    progress: bool = True,
    max_bytes: int | None = None,
) -> Mapping[str, Any]:
    """``torch.hub.load_state_dict_from_url`` with the hash check on, ``weights_only=True``, a
    re-hash of any cached copy (deleted and downloaded again when it no longer matches) and the
    bounds of :func:`_download` (``max_bytes``: the manifest's file size)."""
    model_dir = Path(model_dir) if model_dir is not None else Path(torch.hub.get_dir()) / "checkpoints"
    cached = model_dir / filename
    prefix = hash_prefix(filename)
    check_url(url)
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
        if not cached.is_file():  # our download (bounded); torch.hub then loads the cached file
            model_dir.mkdir(parents=True, exist_ok=True)
            _download(url, cached, prefix, progress, max_bytes)
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
    except _NETWORK_ERRORS as e:
        raise DownloadError(
            f"could not download {url} ({_reason(e)}); nothing was cached in {model_dir}. Check the connection, "
            f"or place the file there yourself (its sha256 must start with {prefix})"
        ) from None
    except OSError as e:  # not the network's: the cache's (full, read-only, not a folder)
        raise _destination_error(e, model_dir) from None
    if not isinstance(state_dict, Mapping):
        raise WeightsIntegrityError(f"{cached} holds a {type(state_dict).__name__}, expected a state_dict")
    return state_dict
