"""A full disk for fault tests: a real 2 MB tmpfs where this process may mount one, else writers
that fail the way a full disk makes them fail."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def full_disk(root: Path, how: str, monkeypatch) -> Iterator[None]:
    """``root`` on a disk with no room for a converted model.

    ``"disk"``: a 2 MB tmpfs filled but for 40 KB, when this process may mount one (root in a
    container), else a writer that fails with ENOSPC the way open() does. ``"safetensors"``: the
    model writer fails the way safetensors' Rust code reports a full disk.
    """
    if how == "disk" and mount_tmpfs(root):
        try:
            (root / "filler").write_bytes(bytes(2048 * 1024 - 40 * 1024))
            yield
        finally:
            subprocess.run(["umount", str(root)], check=True)
        return
    import safetensors.torch

    def full(tensors, filename=None, metadata=None):
        if how == "safetensors":
            raise safetensors.SafetensorError(
                "Error while serializing: I/O error: No space left on device (os error 28)"
            )
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    # whichever serializer the writer uses: to a file, or to bytes it then writes itself
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    monkeypatch.setattr(safetensors.torch, "save", full)
    yield


def mount_tmpfs(root: Path) -> bool:
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(root)], capture_output=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0
