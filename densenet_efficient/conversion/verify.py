"""The last step of a conversion: the converted model must compute what the source model computes.

The source model is torchvision's own class loaded by torchvision's own loader when the file is
one of torchvision's (so the check does not rely on this package's key mapping), else this
package's naive path on the source tensors. Both run the same float32 kernels in eval mode, so a
correct conversion differs by rounding at most.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn as nn

from ..io.state_dict import fill_legacy_batch_counters
from ..models.config import ArchConfig
from ..models.densenet import DenseNet
from .infer import ConversionError

__all__ = ["TOLERANCE", "assigned_model", "converted_model", "max_abs_diff", "reference_model"]

#: Largest max-abs output difference between source and converted model that passes verification.
TOLERANCE = 1e-5


def _uninitialised(build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` on CPU without running its weight init, for a loader that overwrites every tensor.

    Kaiming-initialising a densenet161 only to overwrite it costs about a second per model.
    """
    with torch.device("meta"):
        model = build()
    return model.to_empty(device="cpu")


def assigned_model(build: Callable[[], nn.Module], state_dict: Mapping[str, Any]) -> nn.Module:
    """``build()`` holding exactly ``state_dict``'s tensors (float32; no init, no copy when already float32).

    The module is built on the meta device and the tensors are assigned, strictly. Checkpoints that
    predate ``num_batches_tracked`` get zero counters, as BatchNorm itself would give them.
    """
    with torch.device("meta"):
        model = build()
    sd = {
        k: (torch.zeros(v.shape, dtype=v.dtype) if v.is_meta else v.float() if v.is_floating_point() else v)
        for k, v in fill_legacy_batch_counters(dict(state_dict), model).items()
    }
    nn.Module.load_state_dict(model, sd, strict=True, assign=True)
    return model


def _reference(config: ArchConfig) -> nn.Module:
    """torchvision's own DenseNet for ``config`` (imported here: torchvision is slow to import, and
    only a verification against a torchvision file needs it)."""
    from ..models.reference import torchvision_densenet

    return torchvision_densenet(config)


def _torchvision_densenet(config: ArchConfig) -> nn.Module:
    """torchvision's DenseNet for ``config``; CIFAR configs get the 3x3 stem with no norm0/pool0."""
    return _uninitialised(lambda: _reference(config))


class _GivenWeights:
    """Stands in for a torchvision ``WeightsEnum`` member so torchvision's own loader reads our tensors."""

    def __init__(self, state_dict: Mapping[str, Any]) -> None:
        self._state_dict = state_dict

    def get_state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return OrderedDict(self._state_dict)


def reference_model(
    config: ArchConfig, raw: Mapping[str, Any], mapped: dict[str, Any], torchvision_file: bool
) -> tuple[nn.Module, str]:
    """The source model: torchvision's class for torchvision files, else our naive path.

    A torchvision file goes through torchvision's own loader (its own ``norm.1`` key mapping), so
    the check does not depend on :func:`remap_keys` being right; other formats need our mapping.
    """
    if torchvision_file:
        from torchvision.models import densenet as tv_densenet

        model = _torchvision_densenet(config)
        loader = getattr(tv_densenet, "_load_state_dict", None)
        try:
            if loader is None:
                raise TypeError("torchvision has no densenet._load_state_dict")
            loader(model, _GivenWeights(raw), progress=False)
            return model, "torchvision.models.DenseNet loaded by torchvision's own loader"
        except TypeError:  # a torchvision whose private loader changed shape: map names ourselves
            return assigned_model(lambda: _reference(config), mapped), "torchvision.models.DenseNet"
    return assigned_model(
        lambda: _our_model(config), mapped
    ), "densenet_efficient.DenseNet (naive path) on the source tensors mapped by name"


def _our_model(config: ArchConfig) -> DenseNet:
    return DenseNet(**config.to_kwargs(), memory_efficient=False)


#: The largest verification input (a 2 x 3 x 4096 x 4096 float batch is 400 MB).
_MAX_VERIFY_SIZE = 4096


def _verification_batch(model: DenseNet) -> torch.Tensor:
    # Large enough that every block sees a real feature map (not 1x1), small enough to be quick.
    size = max(model.min_input_size(), 32 if model.arch_config.small_inputs else 64)
    if size > _MAX_VERIFY_SIZE:  # every dense block but the last halves the input: 2**blocks pixels
        raise ConversionError(
            f"cannot verify a {len(model.arch_config.block_config)}-block DenseNet: its smallest input is "
            f"{size}x{size} pixels (over {_MAX_VERIFY_SIZE}); convert with --no-verify (verify=False)"
        )
    gen = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, size, size, generator=gen)


@torch.no_grad()
def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One eval-mode forward for verification.

    Both sides run the naive computation in float32 (the same kernels in the same order), so a
    correct conversion differs by rounding at most; a wrong tensor shows up orders of magnitude above.
    oneDNN is switched off for it: every DenseNet convolution has a new input width, and oneDNN
    compiles a kernel per shape on first use (13 s instead of 2 s for one densenet161 forward on
    a 2-core CPU), which a single forward never earns back.
    """
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        return model.eval()(x)
    finally:
        torch.backends.mkldnn.enabled = enabled


def converted_model(config: ArchConfig, state_dict: Mapping[str, Any]) -> DenseNet:
    """This package's DenseNet holding the (renamed) source tensors, float32, in eval mode."""
    return assigned_model(lambda: _our_model(config), state_dict).eval()


def max_abs_diff(reference: nn.Module, model: DenseNet) -> tuple[float, tuple[int, ...]]:
    """Max abs difference of the two models' outputs on one seeded random batch, and its shape."""
    x = _verification_batch(model)
    return (_outputs(reference, x) - _outputs(model, x)).abs().max().item(), tuple(x.shape)
