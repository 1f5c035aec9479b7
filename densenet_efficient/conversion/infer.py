"""Step one of a conversion: name the tensors torchvision's way and read the architecture off them.

>>> from densenet_efficient import densenet_bc
>>> infer_config(densenet_bc(40, growth_rate=24).state_dict()).block_config
(6, 6, 6)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from ..io.checkpoint import CheckpointError
from ..io.state_dict import StateDictMismatchError, non_float_tensor, remap_keys
from ..models.config import ArchConfig, get_config

__all__ = ["ConversionError", "check_against", "infer_config", "normalize_keys"]

_LAYER_KEY = re.compile(r"^features\.denseblock(\d+)\.denselayer(\d+)\.")
_BLOCK_KEY = re.compile(r"^features\.denseblock(\d+)\.")


class ConversionError(CheckpointError):
    """The checkpoint cannot be converted (not a DenseNet, inconsistent shapes, failed verification...)."""


def normalize_keys(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """Map a DenseNet state dict's keys to torchvision's layout.

    Applies :func:`~densenet_efficient.io.state_dict.remap_keys` (old ``norm.1`` keys, ``norm_final``,
    ``module.``/``_orig_mod.`` prefixes) and strips any other prefix every key shares in front of
    ``features.``/``classifier.`` (``model.`` from PyTorch Lightning modules, ``backbone.``...).

    Returns:
        ``(state_dict, stripped_prefix)``; the prefix is ``""`` when none was stripped.
    """
    sd = remap_keys(state_dict)
    prefix = ""
    if sd and not any(k.startswith(("features.", "classifier.")) for k in sd):
        anchor = next((k for k in sd if k.endswith("features.conv0.weight")), None)
        if anchor is not None:
            candidate = anchor[: -len("features.conv0.weight")]
            if candidate.endswith(".") and all(k.startswith(candidate) for k in sd):
                prefix = candidate
                sd = remap_keys({k[len(prefix) :]: v for k, v in sd.items()})
    return sd, prefix


def _shape(sd: Mapping[str, Any], key: str) -> tuple[int, ...]:
    try:
        return tuple(sd[key].shape)
    except KeyError:
        raise ConversionError(f"the checkpoint has no {key!r}, which every DenseNet has") from None


def _not_densenet(sd: Mapping[str, Any]) -> ConversionError:
    keys = list(sd)
    hint = ""
    if any(k.startswith(("layer1.", "fc.")) for k in keys) or "conv1.weight" in sd:
        hint = " (its layout looks like a ResNet)"
    return ConversionError(
        f"not a DenseNet checkpoint{hint}: none of its {len(keys)} tensors is named like "
        f"'features.denseblockN.denselayerM.conv1.weight'; its first keys are {', '.join(keys[:4])}"
    )


def infer_config(state_dict: Mapping[str, Any]) -> ArchConfig:
    """The DenseNet architecture a state dict describes, read from its tensor shapes alone.

    Accepts any key style :func:`normalize_keys` understands. Growth rate and bottleneck width come
    from the first layer's convolutions, block sizes from the layer names, the stem from ``conv0``'s
    kernel and the presence of ``norm0``, the classes from the classifier; then every tensor is
    checked against the DenseNet those numbers build, so an inconsistent checkpoint fails here.

    >>> from densenet_efficient import densenet_bc
    >>> infer_config(densenet_bc(40, growth_rate=24).state_dict())
    ArchConfig(growth_rate=24, block_config=(6, 6, 6), num_init_features=48, bn_size=4, num_classes=10, small_inputs=True, in_chans=3)

    Raises:
        ConversionError: not a DenseNet, an unsupported variant, or tensors that contradict each other.
    """
    sd, _ = normalize_keys(state_dict)
    if not any(_LAYER_KEY.match(k) for k in sd):
        raise _not_densenet(sd)
    _check_tensors(sd)
    num_init_features, small_inputs, in_chans = _infer_stem(sd)
    block_config = _infer_blocks(sd)
    growth_rate, bn_size = _infer_bottleneck(sd)
    _check_transitions(sd, num_init_features, block_config, growth_rate)
    config = ArchConfig(
        growth_rate=growth_rate,
        block_config=block_config,
        num_init_features=num_init_features,
        bn_size=bn_size,
        # no classifier at all: a model saved without a head (num_classes=0)
        num_classes=_shape(sd, "classifier.weight")[0] if _has_head(sd) else 0,
        small_inputs=small_inputs,
        in_chans=in_chans,
    )
    try:  # every other tensor must fit the model these numbers describe
        config.check_shapes(sd)
    except StateDictMismatchError as err:
        raise ConversionError(f"the checkpoint's tensors are inconsistent: {err}") from None
    return config


def _has_head(sd: Mapping[str, Any]) -> bool:
    return any(k.startswith("classifier.") for k in sd)


def _check_tensors(sd: Mapping[str, Any]) -> None:
    """Every value a tensor; weights and statistics floating point; no zero-size dimension.

    Integer or boolean weights would be cast silently (or fail deep in ``load_state_dict``), and
    a zero-size dimension makes the inferred widths meaningless (a growth rate of 0).
    """
    for key, value in sd.items():
        if not isinstance(value, torch.Tensor):
            raise ConversionError(f"{key} should be a tensor, found a {type(value).__name__}")
        if non_float_tensor({key: value}) is not None:  # the check loading and resuming make too
            raise ConversionError(
                f"{key} should hold floating-point numbers (weights or BatchNorm statistics), found {value.dtype}"
            )
        if key.endswith("num_batches_tracked"):
            continue
        if 0 in value.shape:
            raise ConversionError(
                f"{key} has a zero-size dimension (shape {tuple(value.shape)}): no DenseNet has empty tensors"
            )


def _infer_stem(sd: Mapping[str, Any]) -> tuple[int, bool, int]:
    """``(num_init_features, small_inputs, in_chans)`` from ``conv0`` and the presence of ``norm0``."""
    conv0 = _shape(sd, "features.conv0.weight")
    if len(conv0) != 4:
        raise ConversionError(
            f"features.conv0.weight should be a 4-D convolution kernel, found shape {conv0}"
        )
    if any(k.startswith(("features.conv1.", "features.conv2.")) for k in sd):
        raise ConversionError(
            "the checkpoint has a deep stem (features.conv1/conv2 before the first dense block, as timm's "
            "densenet121d/densenetblur121d/densenet264d); only torchvision's single-conv stem is supported"
        )
    has_norm0 = "features.norm0.weight" in sd
    if conv0[2:] == (7, 7) and has_norm0:
        return conv0[0], False, conv0[1]
    if conv0[2:] == (3, 3) and not has_norm0:
        return conv0[0], True, conv0[1]
    raise ConversionError(
        f"unsupported stem: a {conv0[2]}x{conv0[3]} conv0 {'with' if has_norm0 else 'without'} norm0 "
        "(supported: torchvision's 7x7 conv0 + norm0 + max-pool, or the CIFAR 3x3 conv0 alone)"
    )


def _infer_blocks(sd: Mapping[str, Any]) -> tuple[int, ...]:
    """Layers per dense block, from the layer names (numbered 1..n without gaps)."""
    layers: dict[int, set[int]] = {}
    for k in sd:
        m = _LAYER_KEY.match(k)
        if m:
            layers.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
        elif _BLOCK_KEY.match(k):
            raise ConversionError(f"unexpected tensor {k!r} inside a dense block")
    blocks = sorted(layers)
    if blocks != list(range(1, len(blocks) + 1)):
        raise ConversionError(
            f"dense blocks should be numbered 1..{len(blocks)}, the checkpoint has {blocks}"
        )
    block_config = []
    for b in blocks:
        idx = sorted(layers[b])
        if idx != list(range(1, len(idx) + 1)):
            raise ConversionError(f"denseblock{b}'s layers should be numbered 1..{len(idx)}, found {idx}")
        block_config.append(len(idx))
    return tuple(block_config)


def _infer_bottleneck(sd: Mapping[str, Any]) -> tuple[int, int]:
    """``(growth_rate, bn_size)`` from the first layer's two convolutions."""
    first = "features.denseblock1.denselayer1"
    conv1 = _shape(sd, f"{first}.conv1.weight")
    conv2 = _shape(sd, f"{first}.conv2.weight")
    if len(conv2) != 4 or len(conv1) != 4:
        raise ConversionError(f"{first}.conv1/conv2 weights should be 4-D, found {conv1} and {conv2}")
    growth_rate, width = conv2[0], conv2[1]
    if conv1[0] != width:
        raise ConversionError(
            f"{first}: conv1 produces {conv1[0]} channels but conv2 takes {width} (shapes {conv1} and {conv2})"
        )
    if width % growth_rate:
        raise ConversionError(
            f"{first}: the bottleneck width {width} is not a multiple of the growth rate {growth_rate} "
            "(DenseNet-BC uses bn_size * growth_rate channels)"
        )
    return growth_rate, width // growth_rate


def _check_transitions(
    sd: Mapping[str, Any], features: int, block_config: tuple[int, ...], growth_rate: int
) -> None:
    """DenseNet-BC transitions halve the channels; other compressions build a different model."""
    for b, n in enumerate(block_config[:-1], start=1):
        features += n * growth_rate
        shape = _shape(sd, f"features.transition{b}.conv.weight")
        if shape[:2] != (features // 2, features):
            raise ConversionError(
                f"features.transition{b}.conv should map {features} channels to {features // 2} "
                f"(compression 0.5, as in torchvision's DenseNet-BC) but has shape {shape}"
            )
        features //= 2


def check_against(config: ArchConfig, arch: str | None, num_classes: int | None) -> None:
    """Refuse an ``arch``/``num_classes`` that contradicts the tensors, naming each disagreement."""
    problems = []
    if arch is not None:
        want = get_config(arch)
        for attr, words in (
            ("growth_rate", "growth rate"),
            ("block_config", "block config"),
            ("num_init_features", "init features"),
            ("bn_size", "bn_size"),
            ("small_inputs", "small_inputs (CIFAR stem)"),
        ):
            a, b = getattr(want, attr), getattr(config, attr)
            if attr == "block_config":
                a, b = tuple(a), tuple(b)
            if a != b:
                problems.append(f"--arch {arch} has {words} {a} but the checkpoint's tensors say {b}")
    if num_classes is not None and num_classes != config.num_classes:
        problems.append(
            f"--num-classes is {num_classes} but the checkpoint's classifier has {config.num_classes} outputs"
        )
    if problems:
        raise ConversionError("; ".join(problems))
