"""Simulated steps kept on disk, so that a later process answers without simulating again.

A simulation (:mod:`.simulate`) is a function of the step's settings, the package's code (as
imported), Python and the installed torch (and torchvision, for its models). :func:`load` and
:func:`save` keep its result as a small JSON file under ``$DENSENET_EFFICIENT_CACHE/planner``
(default ``~/.cache/densenet_efficient/planner``; ``DENSENET_EFFICIENT_PLANNER_CACHE=<folder>``
moves it), named by a hash of all of these: a new version of any, or any edit of the package, is
a new name, never a stale answer. A file that cannot be read back as a simulation (truncated,
another format, negative bytes) is ignored and simulated again (an edit that keeps it well-formed
is read as written: nothing in the file authenticates it); files are written whole
(:func:`~densenet_efficient.io.atomic.atomic_write`: a temporary file of its own, renamed), so
two processes never read a partial one. ``DENSENET_EFFICIENT_PLANNER_CACHE=0`` (or ``false``,
``off``, ``no``) turns it off. The planner's first answer in a process still simulates (and pays
torch's first use of tensor subclasses); later processes read the file.

>>> from densenet_efficient.models.planner.simulate import Line, Simulation
>>> sim = Simulation(Line(10, 2), 4, 4, 0, Line(0, 1), Line(0, 7), (Line(12, 9),))
>>> decode(json.loads(json.dumps(encode(sim)))) == sim
True
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import sys
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from ...io.atomic import atomic_write
from ...io.files import require_regular_file
from ..engine.native import cache_root
from .simulate import Line, Segment, Simulation

__all__ = ["ENV", "FORMAT", "decode", "encode", "load", "save", "store_key"]

ENV = "DENSENET_EFFICIENT_PLANNER_CACHE"
#: The files' layout: a new one is a new name for every file.
FORMAT = 1
_PACKAGE = Path(__file__).resolve().parents[2]


def _root() -> Path | None:
    """The folder of the stored simulations (``$DENSENET_EFFICIENT_PLANNER_CACHE`` when it names
    one, ``~`` expanded), or None when that says off (``0``, ``false``, ``off``, ``no``: a word is
    never taken for a folder of that name in whatever folder the process runs in)."""
    value = os.environ.get(ENV, "").strip()
    if value.lower() in ("0", "false", "off", "no"):
        return None
    if value.lower() not in ("", "1", "true", "on", "yes"):
        return Path(value).expanduser()
    return cache_root() / "planner"


def _source(package: Path) -> str | None:
    """A digest of ``package``'s modules: every ``.py`` file an import could load (its path's parts
    are identifiers: an editor's lock file ``.#a.py`` is not one), by path and content, one that
    cannot be read by path and error. None when none can be read (run from a zip or a frozen app:
    nothing tells its versions apart)."""
    digest, found = hashlib.sha256(), False
    for path in sorted(package.rglob("*.py")):
        name = path.relative_to(package).as_posix()
        if not all(part.isidentifier() for part in name.removesuffix(".py").split("/")):
            continue
        try:
            data = path.read_bytes()
            found = True
        except OSError as err:  # a dangling link, a folder, no permission: no import loads it either
            data = f"unreadable: {err.errno}".encode()
        digest.update(f"{name}\0{len(data)}\0".encode() + data)
    return digest.hexdigest() if found else None


#: The package's modules as this process imported them (read when this module is, with the
#: package: under a MB of .py files): a file edited later is not the code that runs here, so a
#: digest read at the first simulation would file the old code's results under the new code's name.
_SOURCE = _source(_PACKAGE)


@functools.lru_cache(maxsize=1)
def _code() -> str | None:
    """A digest of what a simulation's result depends on besides its settings: every module of
    the package (the model, the engine it runs, the planner) as imported, torch's and
    torchvision's versions and Python's (its freeing of objects is what the simulation counts).
    None when the package's source cannot be read (then nothing is stored)."""
    if _SOURCE is None:
        return None
    try:
        torchvision = importlib.metadata.version("torchvision")
    except importlib.metadata.PackageNotFoundError:
        torchvision = None
    python = [sys.implementation.name, *sys.version_info[:2], getattr(sys, "abiflags", "")]
    return hashlib.sha256(json.dumps([_SOURCE, torch.__version__, torchvision, python]).encode()).hexdigest()


def store_key(*settings: Any) -> str | None:
    """The file name of a simulation of ``settings`` (JSON-able values) with this code and torch
    (None when the code cannot be told apart from another version's: nothing is stored)."""
    code = _code()
    if code is None:
        return None
    text = json.dumps([FORMAT, code, *settings])
    return hashlib.sha256(text.encode()).hexdigest()[:40]


def _pair(line: Line) -> list[int]:
    return [line.fixed, line.per_image]


def _int(value: Any) -> int:
    if type(value) is not int:
        raise ValueError(f"not an integer: {value!r}")
    return value


def _line(value: Any) -> Line:
    if not isinstance(value, list) or len(value) != 2:
        raise ValueError(f"not a line: {value!r}")
    return Line(_int(value[0]), _int(value[1]))


def _list(value: Any) -> list:
    if not isinstance(value, list):
        raise ValueError(f"not a list: {value!r}")
    return value


def _segment(value: Any) -> Segment:
    if len(_list(value)) != 4 or not isinstance(value[0], str):
        raise ValueError(f"not a segment: {value!r}")
    return Segment(value[0], _line(value[1]), tuple(map(_line, _list(value[2]))), tuple(map(_line, _list(value[3]))))


#: Per annotation of a :class:`Simulation` field: how it is written, and read back (checked).
_CODECS = {
    "int": (int, _int),
    "Line": (_pair, _line),
    "tuple[Line, ...]": (lambda v: [_pair(x) for x in v], lambda v: tuple(map(_line, _list(v)))),
    "tuple[Segment, ...]": (
        lambda v: [[s.name, _pair(s.kept), [_pair(x) for x in s.forward], [_pair(x) for x in s.backward]] for s in v],
        lambda v: tuple(map(_segment, _list(v))),
    ),
}


def encode(sim: Simulation) -> dict[str, Any]:
    """``sim`` as JSON-ready values (:func:`decode` inverts it)."""
    return {f.name: _CODECS[f.type][0](getattr(sim, f.name)) for f in fields(Simulation)}


def decode(data: Any) -> Simulation:
    """The :class:`Simulation` :func:`encode` wrote; ValueError for anything else."""
    if not isinstance(data, dict) or set(data) != {f.name for f in fields(Simulation)}:
        raise ValueError("not a stored simulation")
    sim = Simulation(**{f.name: _CODECS[f.type][1](data[f.name]) for f in fields(Simulation)})
    # what every simulation holds (the rest are differences, of either sign): bytes and counts
    # are never negative, and the step has at least one moment
    counts = (sim.parameters, sim.gradients, sim.optimizer_state, sim.gathers, sim.all_reduces)
    absolute = (sim.persistent, sim.inputs, *sim.trace)
    if not sim.trace or min(counts) < 0 or any(ln.fixed < 0 or ln.per_image < 0 for ln in absolute):
        raise ValueError("not a simulation: a negative count of bytes, or no trace")
    return sim


#: The largest file :func:`load` reads: far above any simulation's (a few KiB; densenet264's
#: ``"max_saving"`` step: 5 KiB), far below what would strain memory.
MAX_BYTES = 16 << 20


def _read(path: Path) -> bytes:
    """``path``'s bytes if it is a regular file of at most :data:`MAX_BYTES` (a named pipe, a
    device or a link to one is refused by :func:`~densenet_efficient.io.files.require_regular_file`,
    not waited on or read without end)."""
    with open(require_regular_file(path, "stored simulation"), "rb") as f:
        data = f.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise ValueError(f"{path} is larger than any stored simulation")
    return data


def load(key: str | None) -> Simulation | None:
    """The stored simulation named ``key``, or None (none stored, turned off, or unreadable)."""
    root = _root()
    if root is None or key is None:
        return None
    try:
        return decode(json.loads(_read(root / f"{key}.json").decode()))
    # absent, unreadable or not a simulation (nested too deep for json: RecursionError): simulate again
    except (OSError, ValueError, RecursionError):
        return None


_warned = False


def save(key: str | None, sim: Simulation) -> None:
    """Store ``sim`` as ``key`` (whole or not at all); a folder that cannot be written is said once
    per process and otherwise ignored: the answer does not depend on it."""
    global _warned
    root = _root()
    if root is None or key is None:
        return
    try:
        # a temporary of its own (never a guessable name a link could be planted at), renamed
        # whole, removed on any error; those a killed writer left are removed by the next one
        atomic_write(root / f"{key}.json", json.dumps(encode(sim)).encode())
    except OSError as err:
        if not _warned:
            _warned = True
            warnings.warn(
                f"densenet_efficient: the planner could not store its simulation in {root} ({err}); "
                f"it simulates again in every process ({ENV}=0 turns storing off)",
                stacklevel=3,
            )
