"""The one form of the memory setting the engine executes: :class:`ExecutionPlan`.

Users write the setting many ways (``True``, ``"max_saving"``, ``[0, 6, True, "naive"]``, a
:class:`~densenet_efficient.models.memory_plan.MemoryPlan`); :mod:`..memory_plan` normalises them
into a ``MemoryPlan``, and :meth:`ExecutionPlan.of` turns that, once, when the setting changes,
into what the kernels take: per dense block, which layers keep their bottleneck output (or
``None``: torchvision's naive computation), and per BN-ReLU tail, whether it keeps what its
backward needs (or ``None``: naive). Nothing converts it back; the Python and the C++ engines
read the same flags.

>>> from densenet_efficient.models.config import densenet_bc_config
>>> from densenet_efficient.models.memory_plan import resolve_memory_plan
>>> config = densenet_bc_config(16)  # 3 blocks of 2 layers
>>> plan = resolve_memory_plan([0, "naive", 2], config)
>>> ExecutionPlan.of(plan.blocks, plan.stem, config.block_config).blocks
((False, False), None, (True, True))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from ...errors import UsageError

NAIVE = "naive"
EFFICIENT = "efficient"
MAX_SAVING = "max_saving"
MODES = (NAIVE, EFFICIENT, MAX_SAVING)

#: ``memory_efficient``'s booleans (torchvision's flag) and ``None``, the other names of the modes.
_ALIASES: dict[Any, str] = {False: NAIVE, None: NAIVE, True: EFFICIENT}

#: Per layer of a dense block: whether it keeps its bottleneck output for backward (else backward
#: recomputes the 1x1 convolution).
Keep = tuple[bool, ...]


def resolve_mode(mode: bool | str | None) -> str:
    """Normalise a ``memory_efficient`` value to one of :data:`MODES`.

    >>> resolve_mode(True), resolve_mode(False), resolve_mode("max_saving")
    ('efficient', 'naive', 'max_saving')
    """
    if isinstance(mode, str) and mode in MODES:
        return mode
    if isinstance(mode, (bool, str)) or mode is None:
        try:
            return _ALIASES[mode]
        except KeyError:
            pass
    raise UsageError(
        f"memory_efficient must be False/'naive', True/'efficient' or 'max_saving', got {mode!r}"
    )


class ExecutionPlan(NamedTuple):
    """How every part of a DenseNet executes. ``None`` anywhere: torchvision's naive computation.

    Attributes:
        blocks: per dense block, per-layer "keeps its bottleneck output" flags (all ``True`` is
            ``"efficient"``, all ``False`` ``"max_saving"``).
        stem: the ImageNet stem (norm0-relu0-pool0): ``True`` keeps the max-pool indices and the
            sign of its output, ``False`` recomputes them in backward.
        transitions: ``False``: each transition keeps only its input and recomputes BN-ReLU.
        norm5: ``True``: the final BN-ReLU keeps its output, as naive's in-place ReLU does.
    """

    blocks: tuple[Keep | None, ...]
    stem: bool | None
    transitions: bool | None
    norm5: bool | None

    @classmethod
    def of(cls, blocks: Sequence[str | Keep], stem: str, layers: Sequence[int]) -> ExecutionPlan:
        """The flags of a normalised ``MemoryPlan``'s ``blocks`` and ``stem`` (per block a mode or
        its flags, blocks of ``layers`` layers). The engine's transitions and ``norm5`` never hold
        more than torchvision's and are faster, so they run on the engine unless every block, and
        the stem, is naive."""
        if stem == NAIVE and all(b == NAIVE for b in blocks):
            return cls(tuple(None for _ in blocks), None, None, None)
        flags = tuple(_flags(b, n) for b, n in zip(blocks, layers, strict=True))
        return cls(flags, None if stem == NAIVE else stem == EFFICIENT, False, True)

    @property
    def all_naive(self) -> bool:
        return self.norm5 is None


def _flags(setting: str | Keep, layers: int) -> Keep | None:
    if isinstance(setting, tuple):
        if len(setting) != layers:
            raise UsageError(f"expected {layers} per-layer flags for this block, got {len(setting)}")
        return setting
    if setting not in MODES:
        raise UsageError(f"a block runs one of {', '.join(MODES)} or per-layer flags, got {setting!r}")
    return None if setting == NAIVE else (setting == EFFICIENT,) * layers
