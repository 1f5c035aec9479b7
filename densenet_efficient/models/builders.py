"""Builders: a named architecture from the architecture table, with ``weights=`` / ``pretrained=`` as in
torchvision, timm's ``features_only`` / ``in_chans`` / ``num_classes=0``, and :func:`from_pretrained`
for Hugging Face folders.

>>> create_model("densenet_bc_100", memory_efficient="max_saving").memory_efficient
'max_saving'
>>> list_models()
['densenet121', 'densenet161', 'densenet169', 'densenet201', 'densenet264', 'densenet_bc_100']
"""

# torchvision.models.get_model_weights(densenet121) reads the ``weights`` annotation of the builder's
# signature and needs the real enum class, a subclass of torchvision's WeightsEnum. The enums are made
# on first use (importing torchvision costs as much as importing torch; see .weights), so the
# annotations below are strings, and every builder whose table row has weights gets a
# ``__signature__`` that resolves its enum on first read (the loop at the end of this module).

import inspect
import os
from typing import Any

import torch
import torch.nn as nn

from ..errors import UsageError
from .config import ArchConfig, densenet_bc_config, get_config
from .densenet import DenseNet, DenseNetFeatures
from .registry import get_model, get_model_builder, list_models, register_model
from .weights import ENUM_NAMES, WeightsSpec, load_weights, pretrained_cfg, resolve_weights, weights_enum

#: What a builder's ``weights=`` takes: a name (``"DEFAULT"``, ``"IMAGENET1K_V1"``), a weights enum
#: member (this package's or torchvision's), a :class:`~.weights.WeightsSpec`, or None; the
#: builder's ``__signature__`` names its own enum (``DenseNet121_Weights | str | None``).
WeightsArg = Any

#: The helpers; ``@register_model`` appends each builder (``densenet121``, ...) as it is defined.
__all__ = ["create_model", "densenet_bc", "from_pretrained", "get_model", "list_models"]


def adapt_input_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """An RGB stem kernel for ``in_chans`` input channels, as timm adapts pretrained weights:
    summed over RGB for one channel, else the RGB filters repeated and rescaled so the response
    to an image of equal channels stays the same."""
    if in_chans == weight.shape[1]:
        return weight
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    repeat = -(-in_chans // weight.shape[1])
    return weight.repeat(1, repeat, 1, 1)[:, :in_chans] * (weight.shape[1] / in_chans)


def _load(model: DenseNet, spec: WeightsSpec, progress: bool) -> None:
    """Load published (RGB) weights, adapting ``conv0`` when the model takes other channels."""
    in_chans = model.arch_config.in_chans
    if in_chans == 3:
        load_weights(model, spec, progress=progress)
    else:
        from ..io.state_dict import load_state_dict_into

        state_dict = dict(spec.get_state_dict(progress=progress))
        state_dict["features.conv0.weight"] = adapt_input_conv(state_dict["features.conv0.weight"], in_chans)
        load_state_dict_into(model, state_dict, source=f"weights {spec}")
    model.pretrained_cfg = {**model.pretrained_cfg, **pretrained_cfg(spec), "num_classes": model.num_classes}


def _build(
    config: ArchConfig, arch: str | None, weights: Any, progress: bool, pretrained: bool, **kwargs: Any
) -> nn.Module:
    """Build a model from a named config; load weights when asked (see :mod:`.weights`)."""
    features_only = kwargs.pop("features_only", False)
    out_indices = kwargs.pop("out_indices", None)
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
        _load(model, spec, progress)
    if features_only:
        return DenseNetFeatures(model, out_indices)
    if out_indices is not None:
        raise UsageError("out_indices applies to features_only=True models only")
    return model


def _named(name: str, weights: Any, progress: bool, pretrained: bool, **kwargs: Any) -> nn.Module:
    """The body of every registered builder: its table row, its weights."""
    return _build(get_config(name), name, weights, progress, pretrained, **kwargs)


def create_model(
    name: str, *, weights: Any = None, progress: bool = True, pretrained: bool = False, **kwargs: Any
) -> DenseNet:
    """Build any registered model by name (timm's ``create_model`` convention): its builder, called
    with these arguments.

    Besides :class:`DenseNet`'s arguments, ``features_only=True`` (with ``out_indices``) returns a
    :class:`~.densenet.DenseNetFeatures` and ``in_chans`` adapts pretrained RGB weights.
    """
    return get_model_builder(name)(weights=weights, progress=progress, pretrained=pretrained, **kwargs)


class _WeightsSignature(inspect.Signature):
    """A builder's signature whose ``weights`` annotation becomes its enum (``DenseNet121_Weights |
    str | None``) on first read: ``inspect.signature`` returns a function's ``__signature__``, so
    only what reads the parameters (torchvision's ``get_model_weights``, ``help()``) imports
    torchvision. Everything else is :class:`inspect.Signature`'s, over the resolved signature."""

    __slots__ = ("_arch", "_plain", "_resolved")

    def __init__(self, builder: Any) -> None:  # no super().__init__: the parameters come later
        self._arch = builder.__name__
        self._plain = inspect.signature(builder)  # before __signature__ is set: the string annotation
        self._resolved: inspect.Signature | None = None

    def _signature(self) -> inspect.Signature:
        if self._resolved is None:
            annotation = weights_enum(self._arch) | str | None
            params = self._plain.parameters.values()
            params = [p.replace(annotation=annotation) if p.name == "weights" else p for p in params]
            self._resolved = self._plain.replace(parameters=params)
        return self._resolved

    @property  # the slots inspect.Signature's own methods read
    def _parameters(self):  # type: ignore[override]
        return self._signature().parameters

    @property
    def _return_annotation(self):  # type: ignore[override]
        return self._signature().return_annotation

    def replace(self, **changes: Any) -> inspect.Signature:  # Signature.replace would call our __init__
        return self._signature().replace(**changes)

    def __reduce__(self) -> tuple[Any, ...]:
        return self._signature().__reduce__()


@register_model
def densenet121(
    *,
    weights: WeightsArg = None,
    progress: bool = True,
    pretrained: bool = False,
    **kwargs: Any,
) -> DenseNet:
    """DenseNet-121 (k=32, blocks 6-12-24-16) from `Densely Connected Convolutional Networks
    <https://arxiv.org/abs/1608.06993>`_; torchvision's layout, so its weights load unchanged.

    Args:
        weights: pretrained weights: ``"IMAGENET1K_V1"``/``"DEFAULT"``, a ``DenseNet121_Weights``
            member (this package's or torchvision's), or None (random init).
        progress: show a download progress bar.
        pretrained: shorthand for ``weights="DEFAULT"``.
        **kwargs: passed to :class:`DenseNet` (``memory_efficient``, ``num_classes``, ``drop_rate``,
            ``in_chans``), or timm's ``features_only`` / ``out_indices``.

    Example::

        model = densenet121(pretrained=True, memory_efficient=True)
    """
    return _named("densenet121", weights, progress, pretrained, **kwargs)


@register_model
def densenet161(
    *,
    weights: WeightsArg = None,
    progress: bool = True,
    pretrained: bool = False,
    **kwargs: Any,
) -> DenseNet:
    """DenseNet-161 (k=48, blocks 6-12-36-24, 96 init features); arguments as :func:`densenet121`."""
    return _named("densenet161", weights, progress, pretrained, **kwargs)


@register_model
def densenet169(
    *,
    weights: WeightsArg = None,
    progress: bool = True,
    pretrained: bool = False,
    **kwargs: Any,
) -> DenseNet:
    """DenseNet-169 (k=32, blocks 6-12-32-32); arguments as :func:`densenet121`."""
    return _named("densenet169", weights, progress, pretrained, **kwargs)


@register_model
def densenet201(
    *,
    weights: WeightsArg = None,
    progress: bool = True,
    pretrained: bool = False,
    **kwargs: Any,
) -> DenseNet:
    """DenseNet-201 (k=32, blocks 6-12-48-32); arguments as :func:`densenet121`."""
    return _named("densenet201", weights, progress, pretrained, **kwargs)


@register_model
def densenet264(
    *, weights: WeightsArg = None, progress: bool = True, pretrained: bool = False, **kwargs: Any
) -> DenseNet:
    """DenseNet-264 (k=32, blocks 6-12-64-48), the paper's deepest ImageNet model; arguments as
    :func:`densenet121`. torchvision publishes no weights for it.

    Example::

        model = densenet264(num_classes=10, memory_efficient="max_saving")
    """
    return _named("densenet264", weights, progress, pretrained, **kwargs)


@register_model
def densenet_bc_100(
    *, weights: WeightsArg = None, progress: bool = True, pretrained: bool = False, **kwargs: Any
) -> DenseNet:
    """CIFAR DenseNet-BC-100 (k=12, blocks 16-16-16, 24 init features, 10 classes, 769,162 parameters).

    No pretrained weights are published yet; ``pretrained=True`` raises and says how to train them.

    Example::

        model = densenet_bc_100(memory_efficient=True)  # 32x32 inputs
    """
    return _named("densenet_bc_100", weights, progress, pretrained, **kwargs)


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

    Keyword arguments: huggingface_hub's (``revision``, ``cache_dir``, ``force_download``,
    ``proxies``, ``token``, ``local_files_only``), ``memory_efficient``, ``map_location``,
    ``strict`` and ``num_classes`` (a class count other than the folder's loads everything but the
    classifier and warns). See :func:`.hub.load_hub_folder`.

        model = from_pretrained("timm/densenet121.tv_in1k", memory_efficient=True)
    """
    return DenseNet.from_pretrained(repo_id_or_path, **kwargs)


def _annotate_weights() -> None:
    """Give the builder of every table row with published weights its :class:`_WeightsSignature`."""
    for arch in ENUM_NAMES:
        builder = get_model_builder(arch)
        builder.__signature__ = _WeightsSignature(builder)


_annotate_weights()
