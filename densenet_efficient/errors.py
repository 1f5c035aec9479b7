"""The one exception every layer shares, :class:`UsageError` (a bad input or setting), and the
checks every layer makes of what it reads: :func:`check_int`, :func:`check_fraction` and
:func:`shown` (a value cut to a line for the message); :func:`first_line` quotes another
library's error in one.

:class:`UsageError` subclasses :class:`ValueError` (so ``except ValueError`` keeps working) and lets
the command line tell a user's mistake (one sentence, exit code 2) from a bug (a traceback): the CLI
catches ``UsageError`` and the package's other typed errors, never a bare ``ValueError``.

>>> check_int(3, "--n-epochs")
3
>>> check_int(True, "growth_rate")
Traceback (most recent call last):
...
densenet_efficient.errors.UsageError: growth_rate must be an integer >= 1, found True
>>> shown([[[[[[["deep"]]]]]]])
'[[[[[[[...]]]]]]]'
"""

from __future__ import annotations

import importlib.util
import math
import reprlib
from typing import Any

__all__ = [
    "EXTRAS",
    "MissingExtraError",
    "UsageError",
    "check_fraction",
    "check_int",
    "first_line",
    "require_extra",
    "shown",
]


class UsageError(ValueError):
    """An input, option or file that cannot work, explained in one sentence naming what was
    expected and what was found."""


#: The optional extras (setup.cfg's ``[options.extras_require]``, which a test keeps equal to this):
#: extra -> (the modules a feature imports, the requirements that install them).
EXTRAS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "plot": (("matplotlib",), ("matplotlib>=3.5",)),
    "timm": (("timm",), ("timm>=1.0",)),
    "onnx": (("onnx", "onnxscript", "onnxruntime"), ("onnx>=1.16", "onnxscript>=0.2", "onnxruntime>=1.18")),
}


class MissingExtraError(UsageError):
    """A feature whose optional dependency is not installed; the message is the line to run."""


def require_extra(extra: str, feature: str) -> None:
    """Refuse ``feature`` before it does any work when ``extra``'s modules are not installed.

    A base install has no matplotlib, timm or onnx; without this check a command would work for
    a minute and then fail on ``ModuleNotFoundError``.

    The message names the missing modules and the line to run, e.g. ``benchmark --sweep needs
    matplotlib, which is not installed: pip install "matplotlib>=3.5" (or the package's [plot] extra)``.
    """
    modules, requirements = EXTRAS[extra]
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        install = " ".join(f'"{r}"' for r in requirements)
        raise MissingExtraError(
            f"{feature} needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not "
            f"installed: pip install {install} (or the package's [{extra}] extra)"
        )


# A value read from a file or a flag is shown short and shallow: a 1e400, a 5000-digit number or
# a list nested 100,000 deep would otherwise fill the terminal, or make ``repr`` itself raise
# RecursionError while the error message is being written.
class _ShortRepr(reprlib.Repr):
    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 128:  # repr() of over 4300 digits raises; the size is what matters here
            return f"an integer of about {int(x.bit_length() * math.log10(2)) + 1} digits"
        return repr(x)


_REPR = _ShortRepr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 6, 80, 80, 40
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 8


def shown(value: Any) -> str:
    """``repr(value)`` cut to a line: at most 6 levels deep, 8 items per container, 80 characters."""
    return _REPR.repr(value)


def check_int(value: Any, name: str, minimum: int = 1, maximum: int | None = None) -> int:
    """``value`` if it is an integer (not a bool, not a float) in ``minimum..maximum``.

    Raises:
        UsageError: ``"<name> must be an integer >= <minimum>, found <value>"``; ``name`` says where
            the value came from (``"--workers"``, ``"runs/a/checkpoint.pt: its config's seed"``).
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < minimum
        or (maximum is not None and value > maximum)
    ):
        wanted = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
        raise UsageError(f"{name} must be an integer {wanted}, found {shown(value)}")
    return value


def check_fraction(value: Any, name: str) -> float:
    """``value`` as a float if it is a number in [0, 1) (not a bool, a string, NaN or 1e400).

    >>> check_fraction(0.2, "drop_rate")
    0.2
    >>> check_fraction("0.5", "drop_rate")
    Traceback (most recent call last):
    ...
    densenet_efficient.errors.UsageError: drop_rate must be a number in [0, 1), found '0.5'
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise UsageError(f"{name} must be a number in [0, 1), found {shown(value)}")
    return float(value)


def first_line(err: BaseException, limit: int = 300) -> str:
    """The first non-blank line of ``err``'s message (its type's name when there is none), cut to
    ``limit`` characters: another library's multi-line error quoted inside one sentence.

    >>> first_line(RuntimeError("\\n  out of memory\\n  (traceback...)"))
    'out of memory'
    >>> first_line(KeyError())
    'KeyError'
    """
    line = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
    return line if len(line) <= limit else line[: limit - 3] + "..."
