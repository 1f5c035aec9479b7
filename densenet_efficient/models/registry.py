"""The one list of buildable models: builders register themselves by name, as in timm and torchvision.

A builder is a function named after its row in the model table (:data:`~.config.MODEL_TABLE`,
which holds the architecture and its published weights) and decorated with
:func:`register_model`; every list of model names derives from the registration:
:func:`list_models`, :func:`get_model` / ``create_model``, the exported names (the decorator adds
the builder to its module's ``__all__``, as timm's does) and the tests' parametrisation. A new
model is therefore one table row and one decorated builder, then ``python
scripts/generate_files.py`` for the files written from the table (hubconf.py's entrypoints, which
``torch.hub.list`` reads without importing the package; the manifest; the README tables)::

    # models/config.py, MODEL_TABLE
    "densenet264": ModelEntry("DenseNet-264", ArchConfig(32, (6, 12, 64, 48), 64)),

    # models/builders.py
    @register_model
    def densenet264(*, weights: WeightsArg = None, progress: bool = True, pretrained: bool = False, **kwargs):
        \"\"\"DenseNet-264 (k=32, blocks 6-12-64-48); arguments as :func:`densenet121`.\"\"\"
        return _named("densenet264", weights, progress, pretrained, **kwargs)

A row with published weights lists them (``{"IMAGENET1K_V1": Weights(url, meta)}``); its enum
(``DenseNet264_Weights``), manifest entry and builder signature follow.

>>> list_models("densenet1*")
['densenet121', 'densenet161', 'densenet169']
"""

from __future__ import annotations

import fnmatch
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ..errors import UsageError
from .config import ARCHITECTURES

__all__ = ["get_model", "get_model_builder", "is_model", "list_models", "register_model"]

F = TypeVar("F", bound=Callable[..., Any])

#: name -> builder, in registration order
_MODELS: dict[str, Callable[..., Any]] = {}


#: the model class every builder makes (``DenseNet``), registered by its module
_MODEL_CLASS: list[type] = []


def register_model_class(cls: type) -> type:
    """Register the class a config builds (``DenseNet(**config.to_kwargs())``): what the memory
    planner simulates, found here so that it never imports the model module that calls it."""
    _MODEL_CLASS[:] = [cls]
    return cls


def model_class() -> type:
    """The class registered by :func:`register_model_class` (importing the package registers it)."""
    if not _MODEL_CLASS:
        raise RuntimeError("no model class registered: import densenet_efficient.models first")
    return _MODEL_CLASS[0]


def register_model(builder: F) -> F:
    """Register ``builder`` under its function name and export it from its module's ``__all__``.

    The name must be a row of :data:`~.config.MODEL_TABLE` (the builder builds that row) and
    not registered yet; both mistakes fail at import, naming the builder.
    """
    name = builder.__name__
    if name not in ARCHITECTURES:
        raise RuntimeError(
            f"@register_model {builder.__module__}.{name}: no architecture {name!r} in "
            "models/config.py MODEL_TABLE; add its row first"
        )
    if name in _MODELS:
        raise RuntimeError(f"@register_model: {name!r} is registered twice ({builder.__module__})")
    _MODELS[name] = builder
    exported = getattr(sys.modules[builder.__module__], "__all__", None)
    if isinstance(exported, list) and name not in exported:
        exported.append(name)
    return builder


def _filter(names: list[str], patterns: str | Sequence[str] | None, keep: bool) -> list[str]:
    if not patterns:
        return names
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    return [n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns) == keep]


def list_models(
    include: str | Sequence[str] | None = None, exclude: str | Sequence[str] | None = None
) -> list[str]:
    """The registered model names, sorted, filtered by Unix-style patterns as torchvision's
    ``list_models`` (``include`` keeps names matching any pattern, ``exclude`` drops them)."""
    return _filter(_filter(sorted(_MODELS), include, True), exclude, False)


def is_model(name: str) -> bool:
    """Whether ``name`` is a registered model."""
    return name in _MODELS


def get_model_builder(name: str) -> Callable[..., Any]:
    """The builder registered as ``name`` (torchvision's ``get_model_builder``); a clear error listing
    the registered names otherwise."""
    try:
        return _MODELS[name]
    except KeyError:
        raise UsageError(
            f"unknown architecture {name!r}; expected one of {', '.join(list_models())} "
            "(or densenet_bc(depth) for any DenseNet-BC depth)"
        ) from None


def get_model(name: str, **config: Any) -> Any:
    """Build the model called ``name`` with its builder's arguments, as torchvision's ``get_model``.

    >>> get_model("densenet_bc_100", memory_efficient=True).memory_efficient
    'efficient'
    """
    return get_model_builder(name)(**config)
