"""Builders: a named architecture from the architecture table, with ``weights=`` / ``pretrained=`` as in
torchvision, and :func:`from_pretrained` for Hugging Face folders.

>>> create_model("densenet_bc_100", memory_efficient="max_saving").memory_efficient
'max_saving'
"""

from __future__ import annotations

import os
from typing import Any

from .config import ArchConfig, densenet_bc_config, get_config
from .densenet import DenseNet
from .weights import load_weights, resolve_weights

__all__ = [
    "create_model",
    "densenet121",
    "densenet161",
    "densenet169",
    "densenet201",
    "densenet_bc",
    "densenet_bc_100",
    "from_pretrained",
]


def _build(
    config: ArchConfig, arch: str | None, weights: Any, progress: bool, pretrained: bool, **kwargs: Any
) -> DenseNet:
    """Build a model from a named config; load weights when asked (see :mod:`.weights`)."""
    spec = resolve_weights(arch, weights, pretrained)
    user_classes = kwargs.pop("num_classes", None)
    params = config.to_kwargs()
    if spec is not None:
        params["num_classes"] = spec.num_classes
    if user_classes is not None:
        params["num_classes"] = user_classes
    params.update(kwargs)
    model = DenseNet(**params)
    if spec is not None:
        load_weights(model, spec, progress=progress)
    return model


def create_model(
    name: str, *, weights: Any = None, progress: bool = True, pretrained: bool = False, **kwargs: Any
) -> DenseNet:
    """Build any registered architecture by name (timm's ``create_model`` convention)."""
    return _build(get_config(name), name, weights, progress, pretrained, **kwargs)


def densenet121(
    *, weights: Any = None, progress: bool = True, pretrained: bool = False, **kwargs: Any
) -> DenseNet:
    """DenseNet-121 (k=32, blocks 6-12-24-16) from `Densely Connected Convolutional Networks
    <https://arxiv.org/abs/1608.06993>`_; torchvision's layout, so its weights load unchanged.

    Args:
        weights: pretrained weights: ``"IMAGENET1K_V1"``/``"DEFAULT"``, a
            ``torchvision.models.DenseNet121_Weights`` member, or None (random init).
        progress: show a download progress bar.
        pretrained: shorthand for ``weights="DEFAULT"``.
        **kwargs: passed to :class:`DenseNet` (``memory_efficient``, ``num_classes``, ``drop_rate``).

    Example::

        model = densenet121(pretrained=True, memory_efficient=True)
    """
    return create_model("densenet121", weights=weights, progress=progress, pretrained=pretrained, **kwargs)


def densenet161(
    *, weights: Any = None, progress: bool = True, pretrained: bool = False, **kwargs: Any
) -> DenseNet:
    """DenseNet-161 (k=48, blocks 6-12-36-24, 96 init features); arguments as :func:`densenet121`."""
    return create_model("densenet161", weights=weights, progress=progress, pretrained=pretrained, **kwargs)


def densenet169(
    *, weights: Any = None, progress: bool = True, pretrained: bool = False, **kwargs: Any
) -> DenseNet:
    """DenseNet-169 (k=32, blocks 6-12-32-32); arguments as :func:`densenet121`."""
    return create_model("densenet169", weights=weights, progress=progress, pretrained=pretrained, **kwargs)


def densenet201(
    *, weights: Any = None, progress: bool = True, pretrained: bool = False, **kwargs: Any
) -> DenseNet:
    """DenseNet-201 (k=32, blocks 6-12-48-32); arguments as :func:`densenet121`."""
    return create_model("densenet201", weights=weights, progress=progress, pretrained=pretrained, **kwargs)


def densenet_bc_100(
    *, weights: Any = None, progress: bool = True, pretrained: bool = False, **kwargs: Any
) -> DenseNet:
    """CIFAR DenseNet-BC-100 (k=12, blocks 16-16-16, 24 init features, 10 classes, 769,162 parameters).

    No pretrained weights are published yet; ``pretrained=True`` raises and says how to train them.

    Example::

        model = densenet_bc_100(memory_efficient=True)  # 32x32 inputs
    """
    return create_model(
        "densenet_bc_100", weights=weights, progress=progress, pretrained=pretrained, **kwargs
    )


def densenet_bc(depth: int, growth_rate: int = 12, num_classes: int = 10, **kwargs: Any) -> DenseNet:
    """A CIFAR DenseNet-BC of any depth 6n+4 (n layers per block, 3 blocks, 2k init features).

    Example::

        model = densenet_bc(250, growth_rate=24, memory_efficient=True)
    """
    config = densenet_bc_config(depth, growth_rate, num_classes)
    return _build(
        config,
        None,
        kwargs.pop("weights", None),
        kwargs.pop("progress", True),
        kwargs.pop("pretrained", False),
        **kwargs,
    )


def from_pretrained(repo_id_or_path: str | os.PathLike, **kwargs: Any) -> DenseNet:
    """A DenseNet from a Hugging Face repo id or local folder (ours or timm's), strictly, in eval mode.

    Keyword arguments: ``memory_efficient``, ``revision``, ``cache_dir``, ``force_download``,
    ``token``, ``local_files_only``, ``map_location`` and ``num_classes`` (a different class count
    loads everything but the classifier and warns). See :func:`.hub.load_hub_folder`.

    >>> model = from_pretrained("timm/densenet121.tv_in1k", memory_efficient=True)   # doctest: +SKIP
    """
    return DenseNet.from_pretrained(repo_id_or_path, **kwargs)
