"""The native engine: ``csrc/engine.cpp`` built on first use against the installed torch, and loaded.

The engine's ops (:mod:`.ops`) have one kernel each: the C++ loops when they can be built, else
the Python reference engine. Which one runs is decided once per process, the first time an engine
mode is used, and :func:`engine_status` says which and why::

    >>> import densenet_efficient as de
    >>> de.engine_status().engine in ("native", "python")
    True

The build uses ``torch.utils.cpp_extension`` (ninja, the system's C++ compiler), takes a minute
once, and is cached per torch version and source hash under ``$DENSENET_EFFICIENT_CACHE`` (default
``~/.cache/densenet_efficient``); a file lock makes two processes share one build. One line on
stderr says that it is building. ``DENSENET_EFFICIENT_NATIVE``: unset or ``auto`` builds and falls
back to Python with one line saying why when it cannot; ``0`` always runs Python; ``1`` makes a
failed build an error.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch
from filelock import FileLock

from ...errors import UsageError

ENV = "DENSENET_EFFICIENT_NATIVE"
CACHE_ENV = "DENSENET_EFFICIENT_CACHE"
SOURCE = Path(__file__).resolve().parent / "csrc" / "engine.cpp"
_LIBRARY = "densenet_efficient_native"


class EngineStatus(NamedTuple):
    """Which engine runs the memory-efficient modes, and why."""

    engine: str  # "native" (C++ loops) or "python" (the reference engine)
    reason: str

    def __str__(self) -> str:
        return f"{self.engine} engine ({self.reason})"


class NativeBuildError(RuntimeError):
    """The native engine could not be built or loaded while ``DENSENET_EFFICIENT_NATIVE=1`` asks for it."""


_lock = threading.Lock()
_status: EngineStatus | None = None
_reference = False  # reference_engine(): eager calls run the Python engine even when native is loaded
_on_choice: list = []  # callbacks run once the choice is made (ops.py registers the kernels)


def _setting() -> str:
    value = os.environ.get(ENV, "auto").strip().lower()
    if value in ("", "auto"):
        return "auto"
    if value in ("0", "1"):
        return value
    raise UsageError(f"{ENV} must be 0 (Python engine), 1 (native, or fail) or auto, found {value!r}")


def build_dir() -> Path:
    """Where this torch version's build of this source lives (a new source or torch: a new folder)."""
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "densenet_efficient")
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    torch_tag = torch.__version__.replace("+", "_")
    return root / "native" / f"torch{torch_tag}-py{sys.version_info[0]}{sys.version_info[1]}-{digest}"


def _build() -> Path:
    """Compile (or reuse) the shared library and return its path.

    One process builds while the others wait on a lock beside the folder (``flock``: the kernel
    releases it if the builder is killed); ``complete`` is written only after a whole build, so a
    library another process is still linking is never loaded.
    """
    directory = build_dir()
    library, complete = directory / f"{_LIBRARY}.so", directory / "complete"
    if complete.is_file():
        return library
    directory.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(directory) + ".lock"):
        if complete.is_file():  # another process built it while this one waited
            return library
        print(
            f"densenet_efficient: building the native engine for torch {torch.__version__} in {directory} "
            "(once, about a minute)",
            file=sys.stderr,
            flush=True,
        )
        directory.mkdir(exist_ok=True)
        # under our lock nobody else builds here: a baton left by a killed build would block forever
        (directory / "lock").unlink(missing_ok=True)
        _compile(directory)
        complete.write_text(torch.__version__)
    return library


def _compile(directory: Path) -> None:
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)  # its "no CUDA runtime" notice is noise here: the source is CPU C++
    try:
        from torch.utils import cpp_extension  # imported here: it costs ~0.3 s and only builds need it

        cpp_extension.load(
            name=_LIBRARY,
            sources=[str(SOURCE)],
            build_directory=str(directory),
            extra_cflags=["-O2"],
            is_python_module=False,
            with_cuda=False,  # ATen calls only: CUDA kernels come from the installed torch at run time
            verbose=False,
        )
    except Exception as exc:
        (directory / "build.log").write_text(str(exc))
        raise NativeBuildError(f"{_error_line(exc)} (whole log: {directory / 'build.log'})") from exc
    finally:
        log.setLevel(level)


def _error_line(exc: BaseException) -> str:
    """The line of a build failure that says what went wrong (a compiler's ``error:``), else its first."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "error" in line.lower() and not line.startswith("["):
            return line
    return lines[0] if lines else type(exc).__name__


def _choose() -> EngineStatus:
    setting = _setting()
    if setting == "0":
        return EngineStatus("python", f"{ENV}=0")
    try:
        library = _build()
        torch.ops.load_library(str(library))
    except Exception as exc:  # no compiler, no ninja, a failed build: the Python engine serves
        reason = f"the native engine could not be built: {_error_line(exc)}"
        if setting == "1":
            raise NativeBuildError(
                f"{reason} ({ENV}=1 asks for it; unset it to fall back to Python)"
            ) from exc
        print(f"densenet_efficient: {reason}; running the Python engine", file=sys.stderr, flush=True)
        return EngineStatus("python", reason)
    return EngineStatus("native", f"C++ loops from {library}")


def ensure() -> EngineStatus:
    """Decide, once per process, which engine runs (building the native one if needed)."""
    global _status
    if _status is not None:
        return _status
    with _lock:
        if _status is None:
            status = _choose()
            for callback in _on_choice:
                callback(status)
            _status = status
    return _status


def on_choice(callback) -> None:
    """Run ``callback(status)`` when the engine is chosen (at once if it already is)."""
    _on_choice.append(callback)
    if _status is not None:
        callback(_status)


def engine_status() -> EngineStatus:
    """Which engine runs the memory-efficient modes and why (builds the native one on first call).

    >>> str(engine_status()).split()[0] in ("native", "python")
    True
    """
    return ensure()


def is_native() -> bool:
    """Whether the C++ loops run the engine's ops (after :func:`ensure`)."""
    return _status is not None and _status.engine == "native"


def eager_native() -> bool:
    """Whether an eager engine call runs the C++ loops (through the ops) rather than the Python
    engine's autograd Functions; decides the engine on first call."""
    return ensure().engine == "native" and not _reference


@contextlib.contextmanager
def reference_engine() -> Iterator[None]:
    """Run eager engine calls on the Python reference engine inside the block (tests compare the
    two; not thread-safe). Compiled graphs keep the kernel the ops were registered with."""
    global _reference
    previous, _reference = _reference, True
    try:
        yield
    finally:
        _reference = previous
