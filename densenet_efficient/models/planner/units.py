"""Memory sizes as people write them: ``"8GiB"``, ``"12GB"``, ``"512M"`` or a number of bytes.

>>> parse_memory("1.5 GiB"), format_bytes(parse_memory("1.5 GiB"))
(1610612736, '1.5 GiB')
"""

from __future__ import annotations

import math
import numbers
import re
from decimal import Decimal

from ...errors import UsageError, shown

__all__ = ["MAX_BUDGET", "format_bytes", "parse_memory"]

#: The largest budget a plan may have: 2**64 bytes (16 EiB), a 64-bit address space. Beyond it no
#: machine exists, and every search the planner runs is bounded by ``log2`` of the budget.
MAX_BUDGET = 1 << 64

_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kb": 10**3, "kib": 1 << 10,
    "m": 1 << 20, "mb": 10**6, "mib": 1 << 20,
    "g": 1 << 30, "gb": 10**9, "gib": 1 << 30,
    "t": 1 << 40, "tb": 10**12, "tib": 1 << 40,
    "p": 1 << 50, "pb": 10**15, "pib": 1 << 50,
    "e": 1 << 60, "eb": 10**18, "eib": 1 << 60,
}  # fmt: skip
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")
#: digits before the point beyond which a size is above MAX_BUDGET in any unit (2**64 has 20)
_MAX_DIGITS = 21
_EXAMPLES = "8GiB, 12GB, 512MiB or a number of bytes"


def parse_memory(value: int | float | str) -> int:
    """Bytes from ``"8GiB"``, ``"12GB"`` (SI), ``"8G"`` (binary, as PyTorch and Docker read it) or a
    number of bytes (``8e9`` too).

    The number is read exactly (no float rounding: ``"0.1GB"`` is 100000000 bytes), a fraction of
    a byte dropped. A budget that is not positive, or above :data:`MAX_BUDGET` (16 EiB), is a
    :class:`UsageError`.

    >>> parse_memory("8GiB"), parse_memory("12GB"), parse_memory("512M"), parse_memory(1e16)
    (8589934592, 12000000000, 536870912, 10000000000000000)
    """
    if isinstance(value, bool):
        raise UsageError(f"memory budget must look like {_EXAMPLES}, got {shown(value)}")
    if isinstance(value, numbers.Integral):
        return _checked(int(value), int(value))
    if isinstance(value, numbers.Real):  # a float: its exact value (str(1e16) would be '1e+16')
        value = float(value)
        if not math.isfinite(value):
            raise UsageError(f"memory budget must look like {_EXAMPLES}, got {shown(value)}")
        return _checked(int(Decimal(value)), value)
    match = _SIZE.match(value if isinstance(value, str) else str(value))
    unit = match.group(2).lower() if match else None
    if unit not in _UNITS:
        raise UsageError(f"memory budget must look like {_EXAMPLES}, got {shown(value)}")
    digits = match.group(1)
    if len(digits.partition(".")[0].lstrip("0")) > _MAX_DIGITS:  # before Decimal reads it all
        raise UsageError(_too_large(value))
    return _checked(int(Decimal(digits) * _UNITS[unit]), value)


def _checked(size: int, value: int | float | str) -> int:
    if size <= 0:
        raise UsageError(f"memory budget must be positive, got {shown(value)}")
    if size > MAX_BUDGET:
        raise UsageError(_too_large(value))
    return size


def _too_large(value: object) -> str:
    return f"memory budget must be at most 16 EiB (2**64 bytes), got {shown(value)}"


#: Binary units, largest first: 16 EiB (:data:`MAX_BUDGET`) is the most a budget may be.
_BINARY = (("EiB", 1 << 60), ("PiB", 1 << 50), ("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))


def format_bytes(n: float) -> str:
    """``1536 MiB`` -> ``"1.5 GiB"``: binary units up to EiB, 3 significant figures (no exponent).

    >>> format_bytes(1.5 * 2**30), format_bytes(1020 * 2**20), format_bytes(512), format_bytes(2**64)
    ('1.5 GiB', '1020 MiB', '512 B', '16 EiB')
    """
    if n != n or n in (float("inf"), float("-inf")):
        return f"{n} B"  # not a size: said as it is
    for unit, scale in _BINARY:
        if abs(n) >= scale:
            if abs(n) >= 1 << 1000:  # an estimate at an absurd depth: beyond float, no decimals
                return f"{int(n) // scale} {unit}"
            value = n / scale
            return f"{value:.0f} {unit}" if abs(value) >= 100 else f"{value:.3g} {unit}"
    return f"{int(n)} B"
