"""Pretrained weights: registry, download with hash check, loading. (Filled in by the weights issue.)"""

from __future__ import annotations

from typing import Any


def resolve_weights(arch: str | None, weights: Any, pretrained: bool) -> Any:
    """The weights entry asked for, or None for a randomly initialised model."""
    if weights is None and not pretrained:
        return None
    raise NotImplementedError("pretrained weights are not available yet")


def load_weights(model: Any, spec: Any, progress: bool = True) -> None:
    raise NotImplementedError("pretrained weights are not available yet")
