"""The memory dial: how each dense block (and the ImageNet stem) executes, as one value.

``memory_efficient`` takes one mode for the whole model (``False``/``"naive"``,
``True``/``"efficient"``, ``"max_saving"``) or, to reach every memory point in between, one
setting per dense block:

* a mode: ``"naive"`` (torchvision's computation, the fastest and the largest), ``"efficient"``
  (every layer keeps its bottleneck output) or ``"max_saving"`` (no layer keeps it; backward
  recomputes the 1x1 convolution);
* an int ``n``: the engine, the *last* ``n`` layers keep their bottleneck output. Recomputing a
  layer's bottleneck costs in proportion to the channels it reads, and every bottleneck of a block
  has the same size, so the early (narrow) layers are the cheapest ones to recompute;
* a sequence of booleans, one per layer: exactly which layers keep theirs.

:class:`MemoryPlan` is the normalised form (what :meth:`DenseNet.fit_memory` returns, and what
the model reports when its blocks differ):

>>> from densenet_efficient.models.config import get_config
>>> plan = resolve_memory_plan(["max_saving", 6, True, "naive"], get_config("densenet121"))
>>> str(plan)
'stem efficient; block1 max_saving, block2 keep 6/12, block3 efficient, block4 naive'
>>> plan.blocks[1]
(False, False, False, False, False, False, True, True, True, True, True, True)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from ..errors import UsageError, check_int, shown
from .config import ArchConfig
from .engine.plan import EFFICIENT, MAX_SAVING, MODES, NAIVE, resolve_mode

__all__ = ["BlockSetting", "MemoryPlan", "MemorySetting", "resolve_memory_plan"]

#: One dense block's setting once normalised: a mode, or per-layer "keeps its bottleneck" flags
#: (a tuple that is neither all True, which is "efficient", nor all False, "max_saving").
BlockSetting = str | tuple[bool, ...]


@dataclass(frozen=True)
class MemoryPlan:
    """Per-block execution settings, and what the planner expects of them.

    Attributes:
        blocks: one :data:`BlockSetting` per dense block.
        stem: how the ImageNet stem (norm0-relu0-pool0) runs: ``"naive"``, ``"efficient"`` (keeps
            the max-pool indices) or ``"max_saving"`` (recomputes them); CIFAR stems ignore it.
        estimated_peak: the planner's training-step bytes (``MemoryEstimate.total``) for
            ``batch_size`` x ``image_size``, when the plan came from :meth:`DenseNet.fit_memory`.
        estimated_extra_time: the recomputed multiply-adds as a fraction of the step's own
            (0.0 for "efficient" everywhere; about 0.12 for densenet121's "max_saving").
        budget, batch_size, image_size: what the plan was fitted to (None when set by hand).
    """

    blocks: tuple[BlockSetting, ...]
    stem: str = EFFICIENT
    estimated_peak: int | None = None
    estimated_extra_time: float | None = None
    budget: int | None = None
    batch_size: int | None = None
    image_size: int | None = None

    @classmethod
    def uniform(cls, mode: bool | str | None, num_blocks: int) -> MemoryPlan:
        """Every block (and the stem) in one mode."""
        mode = resolve_mode(mode)
        return cls(tuple(mode for _ in range(num_blocks)), mode)

    @property
    def mode(self) -> str | None:
        """The one mode every block and the stem run in, or None for a mixed plan."""
        modes = set(self.blocks) | {self.stem}
        return self.stem if len(modes) == 1 else None

    @property
    def all_naive(self) -> bool:
        """torchvision's computation everywhere (transitions and stem included)."""
        return self.mode == NAIVE

    def keeps(self, block: int, layers: int) -> tuple[bool, ...]:
        """Per-layer bottleneck flags of an engine block (``layers`` long)."""
        setting = self.blocks[block]
        if isinstance(setting, tuple):
            return setting
        if setting == NAIVE:
            raise ValueError(f"block {block + 1} runs naive: it keeps everything, not bottlenecks")
        return (setting == EFFICIENT,) * layers

    def settings(self) -> dict[str, Any]:
        """``{"stem": ..., "block1": ..., ...}`` with a block's flags as ``"keep n/L"`` when they are
        the last ``n`` layers, the full list otherwise."""
        out: dict[str, Any] = {"stem": self.stem}
        for i, setting in enumerate(self.blocks):
            out[f"block{i + 1}"] = _describe(setting)
        return out

    def to_json(self) -> dict[str, Any]:
        """JSON-ready: the settings as :func:`resolve_memory_plan` accepts them back, and the estimates."""
        return {
            "blocks": [list(b) if isinstance(b, tuple) else b for b in self.blocks],
            "stem": self.stem,
            "estimated_peak": self.estimated_peak,
            "estimated_extra_time": self.estimated_extra_time,
            "budget": self.budget,
            "batch_size": self.batch_size,
            "image_size": self.image_size,
        }

    @classmethod
    def from_json(cls, data: Any, source: str = "a memory plan") -> MemoryPlan:
        """Inverse of :meth:`to_json` (per-layer lists back to tuples), every field type-checked:
        a plan read back from a file (a training checkpoint) is refused naming ``source``, the
        field and the value. Whether the blocks fit a model is checked when it is applied.

        >>> MemoryPlan.from_json({"blocks": ["efficient", [False, True]], "stem": "naive"}).blocks
        ('efficient', (False, True))
        """
        if not isinstance(data, dict) or not isinstance(data.get("blocks"), list):
            raise UsageError(f"{source}: expected a dict with a 'blocks' list, found {shown(data)}")
        unknown = sorted(map(str, set(data) - _PLAN_FIELDS))
        if unknown:
            raise UsageError(
                f"{source}: unknown field(s) {', '.join(unknown)}; a memory plan has {', '.join(sorted(_PLAN_FIELDS))}"
            )
        for i, block in enumerate(data["blocks"]):
            flags = isinstance(block, list) and all(isinstance(f, bool) for f in block)
            if not (flags or isinstance(block, (str, bool)) or (isinstance(block, int) and block >= 0)):
                raise UsageError(
                    f"{source}: blocks[{i}] must be a mode, a layer count or a list of booleans, found {shown(block)}"
                )
        if not isinstance(data.get("stem", EFFICIENT), str) or data.get("stem", EFFICIENT) not in MODES:
            raise UsageError(
                f"{source}: stem must be one of {', '.join(MODES)}, found {shown(data.get('stem'))}"
            )
        for name, least in (("estimated_peak", 0), ("budget", 0), ("batch_size", 1), ("image_size", 1)):
            if data.get(name) is not None:
                check_int(data[name], f"{source}: {name}", least)
        extra = data.get("estimated_extra_time")
        if extra is not None and not (
            isinstance(extra, (int, float)) and not isinstance(extra, bool) and 0 <= extra < math.inf
        ):
            raise UsageError(f"{source}: estimated_extra_time must be a number >= 0, found {shown(extra)}")
        blocks = tuple(tuple(b) if isinstance(b, list) else b for b in data["blocks"])
        return cls(blocks, **{k: v for k, v in data.items() if k != "blocks"})

    def __str__(self) -> str:
        s = self.settings()
        return f"stem {s.pop('stem')}; " + ", ".join(f"{k} {v}" for k, v in s.items())


_PLAN_FIELDS = frozenset(f.name for f in fields(MemoryPlan))


def _describe(setting: BlockSetting) -> str:
    if isinstance(setting, str):
        return setting
    n = sum(setting)
    if all(setting[len(setting) - n :]):
        return f"keep {n}/{len(setting)}"
    return "keep " + "".join("1" if f else "0" for f in setting)


#: What ``memory_efficient`` accepts.
MemorySetting = bool | str | None | MemoryPlan | Sequence[Any]


def resolve_memory_plan(setting: MemorySetting, config: ArchConfig) -> MemoryPlan:
    """Normalise a ``memory_efficient`` value for ``config`` into a :class:`MemoryPlan`.

    Raises a :class:`UsageError` naming what was expected and what was found.

    >>> from densenet_efficient.models.config import densenet_bc_config
    >>> resolve_memory_plan(True, densenet_bc_config(40)).mode
    'efficient'
    >>> resolve_memory_plan([0, 6, 3], densenet_bc_config(40)).settings()
    {'stem': 'efficient', 'block1': 'max_saving', 'block2': 'efficient', 'block3': 'keep 3/6'}
    """
    layers = tuple(config.block_config)
    if isinstance(setting, MemoryPlan):
        blocks, stem = setting.blocks, setting.stem
        if stem not in MODES:
            raise UsageError(f"MemoryPlan.stem must be one of {', '.join(MODES)}, got {stem!r}")
        checked = _resolve_blocks(blocks, layers)
        return replace(setting, blocks=checked)
    if setting is None or isinstance(setting, (bool, str)):
        return MemoryPlan.uniform(setting, len(layers))
    if not isinstance(setting, Sequence):
        raise UsageError(
            "memory_efficient must be a mode (False/'naive', True/'efficient', 'max_saving'), one setting "
            f"per dense block, or a MemoryPlan; got {type(setting).__name__} {setting!r}"
        )
    blocks = _resolve_blocks(setting, layers)
    return MemoryPlan(blocks, _default_stem(blocks))


def _default_stem(blocks: tuple[BlockSetting, ...]) -> str:
    """The stem follows the blocks when they agree (naive or max_saving), else keeps its indices."""
    if all(b == NAIVE for b in blocks):
        return NAIVE
    if all(b == MAX_SAVING for b in blocks):
        return MAX_SAVING
    return EFFICIENT


def _resolve_blocks(settings: Sequence[Any], layers: tuple[int, ...]) -> tuple[BlockSetting, ...]:
    if len(settings) != len(layers):
        raise UsageError(
            f"memory_efficient has {len(settings)} block settings, but this DenseNet has {len(layers)} "
            f"dense blocks ({'-'.join(map(str, layers))} layers)"
        )
    return tuple(_resolve_block(s, i, n) for i, (s, n) in enumerate(zip(settings, layers, strict=True)))


def _resolve_block(setting: Any, index: int, layers: int) -> BlockSetting:
    where = f"block {index + 1} ({layers} layers)"
    if setting is None or isinstance(setting, (bool, str)):
        try:
            return resolve_mode(setting)
        except UsageError as err:
            raise UsageError(f"{where}: {err}") from None
    if isinstance(setting, int):
        if not 0 <= setting <= layers:
            raise UsageError(
                f"{where}: an int setting is how many of its last layers keep their bottleneck, "
                f"0..{layers}; got {setting}"
            )
        return _normalise_flags((False,) * (layers - setting) + (True,) * setting)
    if isinstance(setting, Sequence) and all(isinstance(f, bool) for f in setting):
        if len(setting) != layers:
            raise UsageError(f"{where}: expected {layers} per-layer flags, got {len(setting)}")
        return _normalise_flags(tuple(setting))
    raise UsageError(
        f"{where}: expected a mode ('naive', 'efficient', 'max_saving', True/False), the number of last "
        f"layers that keep their bottleneck, or {layers} booleans; got {setting!r}"
    )


def _normalise_flags(flags: tuple[bool, ...]) -> BlockSetting:
    if all(flags):
        return EFFICIENT
    if not any(flags):
        return MAX_SAVING
    return flags
