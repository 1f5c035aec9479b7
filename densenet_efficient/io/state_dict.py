"""State-dict key remapping and strict loading shared by the model, the weights loaders and conversion.

Checkpoints in the wild name DenseNet tensors in a few ways. This module maps all of them to
torchvision's current layout, and explains a mismatch in one sentence instead of a wall of keys.

>>> from densenet_efficient.io.state_dict import remap_keys
>>> remap_keys({"module.features.denseblock1.denselayer1.norm.1.weight": 0})
{'features.denseblock1.denselayer1.norm1.weight': 0}
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn as nn

# torchvision's 2017 files (and the LuaTorch ports) name layer modules 'norm.1', 'conv.2', ...
_OLD_LAYER_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)
# efficient_densenet_pytorch (gpleiss) names the final norm ``features.norm_final``; torchvision: ``norm5``.
_OLD_FINAL_NORM = re.compile(r"^features\.norm_final\.")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")

__all__ = [
    "StateDictMismatchError",
    "check_compatible",
    "check_shapes",
    "fill_legacy_batch_counters",
    "legacy_key_styles",
    "load_state_dict_into",
    "remap_keys",
]


class StateDictMismatchError(RuntimeError):
    """A checkpoint's tensors do not fit the model (missing, unexpected or mis-shaped keys)."""


def _strip_wrappers(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key


def remap_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Rename legacy keys to torchvision's layout, keeping the order of the source.

    Handles ``denselayerN.norm.1.weight`` -> ``denselayerN.norm1.weight``, efficient_densenet_pytorch's
    ``features.norm_final`` -> ``features.norm5``, the ``module.`` prefix DataParallel/DDP add and the
    ``_orig_mod.`` prefix of ``torch.compile``.
    """
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        new = _strip_wrappers(key)
        m = _OLD_LAYER_KEY.match(new)
        if m:
            new = m.group(1) + m.group(2)
        new = _OLD_FINAL_NORM.sub("features.norm5.", new)
        if new in out:
            raise StateDictMismatchError(f"two checkpoint keys map to {new!r} (the second is {key!r})")
        out[new] = value
    return out


def legacy_key_styles(keys: Iterable[str]) -> list[str]:
    """Which of the renamings of :func:`remap_keys` these keys need, in words (for provenance/logs).

    >>> legacy_key_styles(["module.features.norm_final.weight"])
    ["DataParallel/DDP 'module.' prefix", "efficient_densenet_pytorch 'norm_final'"]
    """
    keys = list(keys)
    styles = []
    if any(k.startswith("module.") for k in keys):
        styles.append("DataParallel/DDP 'module.' prefix")
    if any(k.startswith("_orig_mod.") or k.startswith("module._orig_mod.") for k in keys):
        styles.append("torch.compile '_orig_mod.' prefix")
    if any(_OLD_LAYER_KEY.match(_strip_wrappers(k)) for k in keys):
        styles.append("legacy torchvision 'norm.1' layer keys")
    if any(_OLD_FINAL_NORM.match(_strip_wrappers(k)) for k in keys):
        styles.append("efficient_densenet_pytorch 'norm_final'")
    return styles


def fill_legacy_batch_counters(state_dict: dict[str, Any], model: torch.nn.Module) -> dict[str, Any]:
    """Add ``num_batches_tracked`` (0) where a pre-2018 checkpoint has none at all.

    Such files predate the counter; BatchNorm itself fills it for them, but only when the file
    carries no version metadata, which plain dicts from conversion or safetensors never do.
    """
    if any(k.endswith("num_batches_tracked") for k in state_dict):
        return state_dict
    for key, buf in model.state_dict().items():
        if key.endswith("num_batches_tracked") and key not in state_dict:
            state_dict[key] = torch.zeros_like(buf)
    return state_dict


def _first_few(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f" ... (+{len(keys) - n} more)" if len(keys) > n else "")


def _shape_of(value: Any) -> tuple[int, ...] | None:
    """A tensor's shape, a shape given as a sequence of ints (a safetensors header's), or None."""
    if hasattr(value, "shape"):
        return tuple(value.shape)
    if isinstance(value, (tuple, list)) and all(isinstance(d, int) for d in value):
        return tuple(value)
    return None


def non_float_tensor(tensors: Mapping[str, Any]) -> tuple[str, Any] | None:
    """The first ``(key, dtype)`` of a tensor that should hold floating-point numbers and does not.

    Every DenseNet tensor is a weight or a BatchNorm statistic (floating point) except the
    ``num_batches_tracked`` counters. ``load_state_dict`` copies integer or boolean values into
    float parameters without a word (a model whose outputs are then garbage or NaN), so loading,
    resuming and converting all refuse them here. Values that are shapes (a file's header) pass.
    """
    for key, value in tensors.items():
        is_float = getattr(value, "is_floating_point", None)
        if callable(is_float) and not key.endswith("num_batches_tracked") and not is_float():
            return key, value.dtype
    return None


def check_shapes(
    expected: Mapping[str, tuple[int, ...]],
    found: Mapping[str, Any],
    *,
    ignore: tuple[str, ...] = (),
    target: str = "the model",
) -> None:
    """Raise :class:`StateDictMismatchError` naming the first missing, unexpected or mis-shaped keys.

    ``expected`` maps each key to a shape (``ArchConfig.state_dict_shapes()``, or a model's state
    dict's); ``found`` maps keys to tensors or to shapes, so a file's header can be checked before
    any tensor is read or any model built. ``ignore`` lists key prefixes that may be absent or
    differently shaped (e.g. the classifier when fine-tuning to another number of classes).
    """

    def ignored(k: str) -> bool:
        return any(k.startswith(p) for p in ignore)

    missing = [k for k in expected if k not in found and not ignored(k)]
    unexpected = [k for k in found if k not in expected and not ignored(k)]
    shapes = [  # in the model's order (safetensors files come back sorted): the earliest first
        f"{k} (checkpoint {shape}, model {tuple(want)})"
        for k, want in expected.items()
        if k in found
        and not ignored(k)
        and (shape := _shape_of(found[k])) is not None
        and shape != tuple(want)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_first_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_first_few(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch: {_first_few(shapes, 3)}")
    wrong_type = non_float_tensor({k: v for k, v in found.items() if not ignored(k)})
    if wrong_type is not None:
        problems.append(
            f"{wrong_type[0]} holds {wrong_type[1]} numbers, expected floating point (weights and "
            "BatchNorm statistics are never integers; loading would cast them silently)"
        )
    if problems:
        raise StateDictMismatchError(f"checkpoint does not fit {target}: " + "; ".join(problems))


def check_compatible(
    model: torch.nn.Module, state_dict: Mapping[str, Any], ignore: tuple[str, ...] = ()
) -> None:
    """:func:`check_shapes` against ``model``'s own state dict (see there)."""
    check_shapes(
        {k: tuple(v.shape) for k, v in model.state_dict().items()},
        state_dict,
        ignore=ignore,
        target=getattr(model, "arch_summary", lambda: type(model).__name__)(),
    )


def load_state_dict_into(
    model: nn.Module, state_dict: Mapping[str, Any], *, source: str = "checkpoint"
) -> None:
    """Load ``state_dict`` into ``model`` strictly, except for the fine-tuning case.

    When the checkpoint's classifier has a different number of classes than the model's, everything
    but the classifier is loaded (still strictly) and a warning names the re-initialised keys; a
    model without a head (``classifier`` an ``nn.Identity``) takes everything but the classifier.
    Any other mismatch raises :class:`StateDictMismatchError`.
    """
    sd = remap_keys(state_dict)
    # Model order first (safetensors files come back sorted), so errors name the earliest mismatch.
    order = {k: i for i, k in enumerate(model.state_dict())}
    sd = dict(sorted(sd.items(), key=lambda kv: order.get(kv[0], len(order))))
    head = getattr(model, "classifier", None)
    if isinstance(head, nn.Identity):  # a model built without a head (timm's num_classes=0)
        sd = {k: v for k, v in sd.items() if not k.startswith("classifier.")}
    ckpt_head = sd.get("classifier.weight")
    if (
        isinstance(head, nn.Linear)
        and ckpt_head is not None
        and tuple(ckpt_head.shape) != tuple(head.weight.shape)
        and ckpt_head.dim() == 2
        and ckpt_head.shape[1] == head.in_features
    ):
        body = fill_legacy_batch_counters(
            {k: v for k, v in sd.items() if not k.startswith("classifier.")}, model
        )
        check_compatible(model, body, ignore=("classifier.",))
        model.load_state_dict(body, strict=False)
        reinit = [k for k in model.state_dict() if k.startswith("classifier.")]
        warnings.warn(
            f"{source} has {ckpt_head.shape[0]} classes and the model {head.out_features}: loaded everything "
            f"but the classifier; re-initialised {', '.join(reinit)} (fine-tuning)",
            UserWarning,
            stacklevel=3,
        )
        return
    model.load_state_dict(sd, strict=True)
