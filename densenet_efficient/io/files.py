"""The one regular-file check: a path the package reads must be a regular file before it is opened.

Opening a FIFO for reading blocks until a writer appears (forever, for a FIFO nobody writes), and
a character device such as ``/dev/zero`` or ``/dev/urandom`` never ends. ``Path.is_file()`` is
False for both, so callers that test it report "does not exist", which is wrong too. Every
reader of a user-supplied path (an image, a manifest, a ``config.json``, a checkpoint, a weights
file) asks :func:`require_regular_file` first: ``os.stat`` never blocks, whatever the file is.

>>> import os, tempfile
>>> fifo = os.path.join(tempfile.mkdtemp(), "x.png")
>>> os.mkfifo(fifo)
>>> require_regular_file(fifo, "image")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
densenet_efficient.io.files.NotARegularFileError: cannot read image .../x.png: it is a FIFO (named pipe), expected a regular file
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..errors import UsageError

__all__ = ["NotARegularFileError", "file_kind", "require_regular_file"]


class NotARegularFileError(UsageError):
    """A path that should be a regular file is a FIFO, a device, a socket or a folder."""


_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def file_kind(mode: int) -> str:
    """What a ``st_mode`` is, in words (``"a FIFO (named pipe)"``); ``"a regular file"`` for one."""
    if stat.S_ISREG(mode):
        return "a regular file"
    return next((name for test, name in _KINDS if test(mode)), "a special file")


def require_regular_file(path: str | os.PathLike, what: str = "file") -> Path:
    """``path`` as a :class:`~pathlib.Path` if it is (a link to) a regular file.

    Raises:
        FileNotFoundError: nothing is there (or a dangling link).
        NotARegularFileError: a folder, FIFO, device or socket, naming ``what`` and the kind found.
    """
    path = Path(path)
    try:
        mode = os.stat(path).st_mode  # follows links; never opens, so never blocks
    except FileNotFoundError:
        raise FileNotFoundError(f"cannot read {what} {path}: it does not exist") from None
    except NotADirectoryError:
        raise FileNotFoundError(f"cannot read {what} {path}: a part of the path is a file") from None
    if not stat.S_ISREG(mode):
        raise NotARegularFileError(f"cannot read {what} {path}: it is {file_kind(mode)}, expected a regular file")
    return path
