"""The memory-efficient dense-block engine."""

from __future__ import annotations

NAIVE = "naive"
EFFICIENT = "efficient"
MAX_SAVING = "max_saving"
MODES = (NAIVE, EFFICIENT, MAX_SAVING)

_ALIASES = {False: NAIVE, None: NAIVE, True: EFFICIENT, "default": EFFICIENT, "max": MAX_SAVING}


def resolve_mode(mode) -> str:
    """Normalise a ``memory_efficient`` value to one of :data:`MODES`."""
    if isinstance(mode, str) and mode in MODES:
        return mode
    if isinstance(mode, (bool, str)) or mode is None:
        try:
            return _ALIASES[mode]
        except KeyError:
            pass
    raise ValueError(
        f"memory_efficient must be False/'naive', True/'efficient' or 'max_saving', got {mode!r}"
    )


def dense_block(block, x, mode):
    raise NotImplementedError(f"memory_efficient={mode!r} is not implemented yet; use memory_efficient=False")


def transition(module, x):
    raise NotImplementedError(
        "memory-efficient transitions are not implemented yet; use memory_efficient=False"
    )
