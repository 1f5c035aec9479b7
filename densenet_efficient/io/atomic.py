"""The one atomic writer: nothing a crash or a full disk interrupts is ever left half-written.

A file is written to a temporary sibling, flushed to disk and renamed over its destination
(``os.replace`` is atomic on one file system). A folder is staged as a temporary sibling and
renamed into place only when complete; when the destination exists, only the files the writer
produced are replaced, each atomically, and nothing else in that folder is touched.

>>> from pathlib import Path

    atomic_write(Path("log.csv"), b"epoch,loss\\n")
    with staged_folder(Path("out/model")) as tmp:
...     (tmp / "config.json").write_text("{}")
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write", "remove_stale_temporaries", "staged_folder"]

#: The names of the temporaries below: ``.<destination>.<mkstemp's 8 random characters>.tmp`` for
#: a file, ``... .partial`` for a staged folder (mkstemp/mkdtemp draw from a-z, 0-9 and _).
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.(?P<kind>tmp|partial)$")


def atomic_write(path: str | os.PathLike, data: bytes | Callable[[BinaryIO], object]) -> Path:
    """Write ``data`` (bytes, or a function writing to a binary file) to ``path`` atomically.

    The parent folder is created when missing. On any error the temporary file is removed and
    ``path`` keeps its previous content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; the file we replace was not
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def remove_stale_temporaries(folder: str | os.PathLike, names: Iterable[str]) -> list[Path]:
    """Remove what an interrupted :func:`atomic_write` or :func:`staged_folder` left in ``folder``
    for the destinations ``names`` (a killed process runs no ``finally``); return what was removed.

    Only this module's own pattern for exactly those names is touched (``.checkpoint.pt.k3j_x9qa.tmp``
    files, ``.last.0hz2m1pd.partial`` folders), never a link and never anything else: call it from
    the one writer of ``folder`` (a training run in its own run folder), before it writes.
    """
    folder, wanted = Path(folder), set(names)
    removed = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in folder.iterdir():
            m = _TEMPORARY.match(entry.name)
            if m is None or m["name"] not in wanted or entry.is_symlink():
                continue
            if m["kind"] == "tmp" and entry.is_file():
                entry.unlink()
            elif m["kind"] == "partial" and entry.is_dir():
                shutil.rmtree(entry)
            else:
                continue
            removed.append(entry)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def staged_folder(out: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder; on success its files land in ``out``, on error nothing does.

    ``out`` that does not exist is created by one rename of the staging folder (so it appears
    complete or not at all). An existing ``out`` is refused (:class:`FileExistsError`) unless
    ``replace=True``; then each staged file replaces its namesake in ``out`` atomically and every
    other file in ``out`` stays as it was.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; expected a folder path")
    if out.is_dir() and not replace:
        raise FileExistsError(f"{out} already exists")
    created = _make_parents(out.parent)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield staging
        _public(staging)
        if not out.exists():
            os.rename(staging, out)  # fails (not replaces) if a non-empty out appeared meanwhile
            return
        if not replace:
            raise FileExistsError(f"{out} appeared while it was being written; not replacing it")
        for item in sorted(staging.iterdir()):
            os.replace(item, out / item.name)
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        for d in reversed(created):
            with contextlib.suppress(OSError):  # not empty: someone else wrote there meanwhile
                d.rmdir()
        explained = _explained(err, staging, out)
        if explained is not None:
            raise explained from err
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# How Rust's std::io::Error prints an OS error ("No space left on device (os error 28)"): writers
# implemented in Rust, safetensors' save_file among them, report a full disk with their own
# exception type and this text.
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")
#: errno values that mean the destination cannot take the files (full, over quota, read-only, failing)
_DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG}


def _explained(err: BaseException, staging: Path, out: Path) -> OSError | None:
    """The OS error behind ``err`` worded for ``out`` (not the staging folder), or None.

    A full disk is the environment's fault, not a bug: callers (the CLI) handle :class:`OSError` as
    one line, but would print a traceback for ``SafetensorError('... (os error 28)')``. And the
    user never heard of the staging folder, whose name an OSError from inside it carries (or a
    nested staged_folder's message: its ``out`` was our staging folder).
    """
    if not isinstance(err, Exception):
        return None
    if isinstance(err, OSError):
        # the disk's fault whichever file hit it (a failed write() names no file); other OS errors
        # only when they name our staging folder
        if err.errno is None or (err.errno not in _DISK_ERRORS and str(staging) not in str(err)):
            return None
        code = err.errno
    else:
        found = _RUST_OS_ERROR.search(str(err))
        if found is None:
            return None
        code = int(found.group(1))
    done = "" if out.exists() else "; nothing was written there"
    return OSError(code, f"{os.strerror(code)} while writing {out}{done}")


def _public(staging: Path) -> None:
    """Give the staged folder and everything in it the permissions the umask gives new files.

    mkdtemp makes the folder private, and some writers make their files private too: safetensors'
    ``save_file`` creates ``model.safetensors`` 0600 while ``open()`` gives the folder's other
    files 0644. A saved folder is shared like any other output, so every file gets
    ``0o666 & ~umask`` (data files, no execute bit) and every folder ``0o777 & ~umask``.
    """
    mask = _umask()
    os.chmod(staging, 0o777 & ~mask)
    for root, dirs, files in os.walk(staging):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


def _make_parents(parent: Path) -> list[Path]:
    """Create missing parent folders; return those created, outermost first."""
    missing = []
    p = parent.absolute()
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        d.mkdir(exist_ok=True)
    return list(reversed(missing))
