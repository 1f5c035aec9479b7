"""Where a model folder's files are: a local folder, or a Hugging Face repo fetched into its cache.

:func:`locate` finds ``config.json`` and the weights once per load (``model.safetensors``, or the
``pytorch_model.bin`` of older timm repos), through ``huggingface_hub.hf_hub_download`` for a repo
id, and words what can go wrong in one sentence: a repo missing from the cache while offline, a
full cache, a name that is neither a folder nor a repo id, a mistyped folder while the Hub is
unreachable (answered at once instead of after huggingface_hub's retries).

    files = locate("timm/densenet121.tv_in1k", {"cache_dir": "hf"})
    config = read_config(files.config, files.source)
"""

from __future__ import annotations

import errno
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import UsageError
from ...io.json_file import read_json_object

__all__ = [
    "CONFIG_NAME",
    "DOWNLOAD_OPTIONS",
    "PICKLE_WEIGHTS_NAME",
    "WEIGHTS_NAME",
    "HubFiles",
    "locate",
    "read_config",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PICKLE_WEIGHTS_NAME = "pytorch_model.bin"  # older timm repos; loaded with weights_only=True
#: The keyword arguments of ``from_pretrained`` that say where and how to fetch a repo's files.
DOWNLOAD_OPTIONS = ("revision", "cache_dir", "force_download", "token", "local_files_only", "proxies")
#: errno values of a cache that cannot take a download (full, over quota, read-only, not ours)
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


@dataclass(frozen=True)
class HubFiles:
    """Where one load reads from, found once (:func:`locate`): the name the caller gave (for
    messages), its ``config.json`` and its weights file, both in :attr:`folder`."""

    source: str
    config: Path
    weights: Path

    @property
    def folder(self) -> str:
        """The local folder holding both files: the caller's own, or the repo's snapshot in the
        Hugging Face cache (what huggingface_hub's mixin is handed to read)."""
        local = Path(self.source)
        return self.source if local.is_dir() and self.config.parent == local else str(self.config.parent)


def locate(name_or_path: str, opts: dict[str, Any]) -> HubFiles:
    """The files of a local folder or a Hub repo (downloaded or from the cache)."""
    from huggingface_hub.errors import RemoteEntryNotFoundError

    local = Path(name_or_path)
    if local.is_dir():
        config = local / CONFIG_NAME
        if not config.exists():  # anything else there is refused when read (a FIFO, a folder)
            raise FileNotFoundError(
                f"{local} has no {CONFIG_NAME}; expected a folder written by save_pretrained/save_hub_folder "
                f"({CONFIG_NAME} + {WEIGHTS_NAME}) or a copy of a timm DenseNet repo"
            )
        for name in (WEIGHTS_NAME, PICKLE_WEIGHTS_NAME):
            if (local / name).exists():
                return HubFiles(name_or_path, config, local / name)
        raise FileNotFoundError(f"{local} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
    if local.exists():
        raise FileNotFoundError(f"{local} is a file; expected a folder or a Hugging Face repo id")
    _check_hub_lookup(name_or_path, opts)
    config = Path(_hub_file(name_or_path, CONFIG_NAME, opts))
    # the weights of the same commit (the snapshot folder's name), even if the repo moves on meanwhile
    pinned = {**opts, "revision": config.parent.name}
    try:
        weights = Path(_hub_file(name_or_path, WEIGHTS_NAME, pinned))
    except RemoteEntryNotFoundError:  # older timm repos ship only the pickle
        weights = Path(_hub_file(name_or_path, PICKLE_WEIGHTS_NAME, pinned))
    return HubFiles(name_or_path, config, weights)


def _may_be_a_folder(name: str) -> bool:
    """Whether a valid repo id may as well be a mistyped folder here: it has no namespace
    ("my-densenet", as ``save_pretrained`` names folders) or its first component is a folder here
    ("runs/flowers/bset" next to ./runs)."""
    first, slash, _ = name.partition("/")
    return not slash or Path(first).is_dir()


def _check_hub_lookup(name: str, opts: Mapping[str, Any]) -> None:
    """Refuse at once a name that is not a folder here, may be a mistyped one, is not cached and
    cannot be looked up on the Hub.

    Without this, ``hf_hub_download`` retries an unreachable Hub five times with backoff (~23 s)
    before its error; a typo in a local path deserves the answer at once. One request to the Hub
    (``repo_exists``) tells an unreachable Hub apart; names that cannot be folders here
    ("timm/densenet121.tv_in1k") keep huggingface_hub's own retries.
    """
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    if constants.HF_HUB_OFFLINE or opts.get("local_files_only") or not _may_be_a_folder(name):
        return  # offline: huggingface_hub answers from the cache at once, without retrying
    try:
        cached = try_to_load_from_cache(
            name, CONFIG_NAME, cache_dir=opts.get("cache_dir"), revision=opts.get("revision")
        )
    except HFValidationError:
        return  # not a repo id at all: _hub_file says so in one sentence
    if isinstance(cached, str):
        return
    where = f"no folder {name!r} in {Path.cwd()}"
    try:
        exists = HfApi().repo_exists(name, token=opts.get("token"))
    except Exception as err:  # any failure to ask (no network, proxy, 5xx): the typo is likelier
        reason = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
        raise FileNotFoundError(
            f"{where}, and the Hugging Face Hub could not be reached to look it up as a repo id ({reason})"
        ) from None
    if not exists:
        raise FileNotFoundError(
            f"{where}, and no Hugging Face repo {name!r} (or it is private: log in with `hf auth login`)"
        )


def _offline_reason(local_files_only: bool) -> str:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE=1 forbids downloading it"
    if local_files_only:
        return "local_files_only=True forbids downloading it"
    return "the Hugging Face Hub could not be reached"


def _hub_file(repo_id: str, filename: str, opts: dict[str, Any]) -> str:
    from huggingface_hub import hf_hub_download

    from ... import __version__

    try:
        return hf_hub_download(
            repo_id, filename, library_name="densenet_efficient", library_version=__version__, **opts
        )
    except Exception as err:
        mapped = _hub_error(err, repo_id, opts, filename)
        if mapped is None:
            raise
        raise mapped from None


def _hub_error(err: Exception, name: str, opts: Mapping[str, Any], filename: str = "") -> Exception | None:
    """One sentence for the huggingface_hub errors a repo id can raise, or None for other errors."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(err, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        cache = opts.get("cache_dir") or constants.HF_HUB_CACHE
        return FileNotFoundError(
            f"cannot load {name!r}: {f'its {filename} is' if filename else 'its files are'} not in the "
            f"Hugging Face cache ({cache}) and "
            f"{_offline_reason(bool(opts.get('local_files_only')))}"
        )
    if isinstance(err, OSError) and err.errno in _DISK_FULL:
        from ...io.download import DownloadError

        cache = opts.get("cache_dir") or constants.HF_HUB_CACHE
        error = DownloadError(
            f"cannot store {filename or 'the files'} of {name!r} in the Hugging Face cache ({cache}): "
            f"{err.strerror or err}; make room there, or set HF_HUB_CACHE to another folder"
        )
        error.errno = err.errno
        return error
    if isinstance(err, HFValidationError):
        return FileNotFoundError(
            f"{name!r} is neither an existing local folder nor a valid Hugging Face repo id (org/name)"
        )
    if isinstance(err, RevisionNotFoundError):
        return UsageError(f"repo {name!r} has no revision {opts.get('revision')!r}")
    if isinstance(err, RepositoryNotFoundError):
        return FileNotFoundError(
            f"no Hugging Face repo {name!r} (or it is private or gated: log in with `hf auth login`)"
        )
    return None


def read_config(path: Path, source: str) -> dict[str, Any]:
    """The folder's config.json as a dict (invalid, too deeply nested or not an object: one
    sentence naming the folder, the file and, for nesting, the field)."""
    return read_json_object(path, source)
