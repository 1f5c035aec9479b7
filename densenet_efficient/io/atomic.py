"""The one atomic writer: nothing a crash or a full disk interrupts is ever left half-written.

A file is written to a temporary sibling, flushed to disk and renamed over its destination
(``os.replace`` is atomic on one file system). A folder is staged as a temporary sibling and
renamed into place only when complete; when the destination exists, only the files the writer
produced are replaced, each atomically, and nothing else in that folder is touched.

Every temporary is held under an exclusive ``flock`` by the process writing it, for as long as it
exists. A killed writer's lock dies with it, so the next writer of the same destination removes
what the killed one left (a staged model folder is as large as the model) and never what a live
writer, another process writing the same destination at the same time, is still writing.

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

try:
    import fcntl
except ImportError:  # Windows: no flock; temporaries are then never taken for a dead writer's
    fcntl = None  # type: ignore[assignment]

__all__ = ["atomic_write", "lock_exclusive", "remove_stale_temporaries", "scratch_folder", "staged_folder"]

#: The names of the temporaries below: ``.<destination>.<mkstemp's 8 random characters>.tmp`` for
#: a file, ``... .partial`` for a staged folder (mkstemp/mkdtemp draw from a-z, 0-9 and _).
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.(?P<kind>tmp|partial)$")


def atomic_write(path: str | os.PathLike, data: bytes | Callable[[BinaryIO], object]) -> Path:
    """Write ``data`` (bytes, or a function writing to a binary file) to ``path`` atomically.

    The parent folder is created when missing. On any error the temporary file is removed and
    ``path`` keeps its previous content. Temporaries a killed writer left for ``path`` are removed
    first (:func:`remove_stale_temporaries`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent, [path.name])
    fd, tmp = _new_temporary(lambda: tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; the file we replace was not
            if fcntl is not None:  # renamed while still locked (POSIX renames open files)
                os.replace(tmp, path)
        if fcntl is None:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _new_temporary(make: Callable[[], tuple[int, str]]) -> tuple[int, Path]:
    """A temporary made by ``make`` (an open descriptor and its path), locked by this process.

    Between its creation and the lock, another writer's :func:`remove_stale_temporaries` may
    take it for a dead writer's and remove it: then it is made again under a new name."""
    for _ in range(16):
        fd, name = make()
        lock_exclusive(fd, wait=True)  # a cleaner's probe holds it for an instant at most
        try:
            if os.path.samestat(os.fstat(fd), os.stat(name)):
                return fd, Path(name)
        except FileNotFoundError:
            pass
        os.close(fd)
    raise OSError(errno.EAGAIN, f"could not create a temporary in {Path(name).parent}: removed each time")


def lock_exclusive(fd: int, *, wait: bool = False) -> bool:
    """Take an exclusive ``flock`` on ``fd`` (a file or a folder); return whether it was taken.

    Without ``wait`` a lock held by another open file returns False at once. Where there is no
    ``flock`` (Windows) it returns True: nothing can be told apart there, and nothing relies on it
    but the removal of stale temporaries, which then removes only what its caller names."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    return True


def _remove_if_unused(entry: Path, is_folder: bool) -> bool:
    """Remove ``entry`` (a temporary of this module) unless a live process holds it locked; return
    whether it was removed. The lock is held while removing, so a writer that created ``entry``
    an instant ago and is about to lock it finds it gone and makes another (:func:`_new_temporary`)."""
    if fcntl is None:
        return False  # cannot tell a dead writer's temporary from a live one's: never removed
    try:
        fd = os.open(entry, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        if not lock_exclusive(fd):
            return False  # a live writer's
        if is_folder:
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        return True
    finally:
        os.close(fd)


def remove_stale_temporaries(folder: str | os.PathLike, names: Iterable[str]) -> list[Path]:
    """Remove what an interrupted :func:`atomic_write` or :func:`staged_folder` left in ``folder``
    for the destinations ``names`` (a killed process runs no ``finally``); return what was removed.

    Only this module's own pattern for exactly those names is touched (``.checkpoint.pt.k3j_x9qa.tmp``
    files, ``.last.0hz2m1pd.partial`` folders), never a link, never anything else, and never a
    temporary a live process holds locked (another writer of the same destination at work).
    """
    folder, wanted = Path(folder), set(names)
    removed = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in folder.iterdir():
            m = _TEMPORARY.match(entry.name)
            if m is None or _destination(m["name"]) not in wanted or entry.is_symlink():
                continue
            kind_ok = entry.is_file() if m["kind"] == "tmp" else entry.is_dir()
            if kind_ok and _remove_if_unused(entry, m["kind"] == "partial"):
                removed.append(entry)
    return removed


def _destination(name: str) -> str:
    """The destination a temporary's name is for, through nesting: a staged folder written into
    another one's staging folder (``convert`` saves into its own) is named
    ``..out.k3j_x9qa.partial.0hz2m1pd.partial``, and is ``out``'s as much as the outer one."""
    while (m := _TEMPORARY.match(name)) is not None:
        name = m["name"]
    return name


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def scratch_folder(beside: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty, locked temporary folder beside ``beside`` (same file system), always removed.

    Named as :func:`staged_folder`'s staging folders are, so what a killed process leaves here is
    removed by the next writer of ``beside`` (:func:`remove_stale_temporaries`)."""
    out = Path(beside)
    created = _make_parents(out.parent)
    remove_stale_temporaries(out.parent, [out.name])

    def make() -> tuple[int, str]:
        name = tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
        return os.open(name, os.O_RDONLY), name

    # locked until removed: a live writer's folder is never taken for a dead one's
    fd, scratch = _new_temporary(make)
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # gone already when staged_folder renamed it
        os.close(fd)
        for d in reversed(created):  # made for the scratch folder only: removed when left empty
            with contextlib.suppress(OSError):  # not empty: it holds the result, or others' files
                d.rmdir()


@contextlib.contextmanager
def staged_folder(out: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder; on success its files land in ``out``, on error nothing does.

    ``out`` that does not exist is created by one rename of the staging folder (so it appears
    complete or not at all). An existing ``out`` is refused (:class:`FileExistsError`) unless
    ``replace=True``; then each staged file replaces its namesake in ``out`` atomically and every
    other file in ``out`` stays as it was. Staging folders a killed writer of ``out`` left are
    removed first (:func:`scratch_folder`).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; expected a folder path")
    if out.is_dir() and not replace:
        raise FileExistsError(f"{out} already exists")
    with scratch_folder(out) as staging:
        try:
            yield staging
            _public(staging)
            if not out.exists():
                try:
                    os.rename(staging, out)  # fails (not replaces) if a non-empty out appeared meanwhile
                except OSError as err:
                    if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                        raise
                    if not replace:  # another writer's complete folder: theirs, not replaced
                        raise FileExistsError(f"{out} appeared while it was being written; not replacing it") from None
                    for item in sorted(staging.iterdir()):
                        os.replace(item, out / item.name)
                return
            if not replace:
                raise FileExistsError(f"{out} appeared while it was being written; not replacing it")
            for item in sorted(staging.iterdir()):
                os.replace(item, out / item.name)
        except BaseException as err:
            explained = _explained(err, staging, out)
            if explained is not None:
                raise explained from err
            raise


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
