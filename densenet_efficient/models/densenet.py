"""The DenseNet module tree, with torchvision's exact ``state_dict`` layout.

The modules below hold the same parameters, in the same order and with the same initialisation
as ``torchvision.models.densenet``; only *how* a dense block executes changes with
``memory_efficient`` (see :mod:`.engine`). Builders with pretrained weights are in :mod:`.builders`.

>>> import torch
>>> from densenet_efficient.models.builders import densenet_bc_100
>>> model = densenet_bc_100(memory_efficient=True)
>>> model(torch.randn(2, 3, 32, 32)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..errors import UsageError
from ..io.state_dict import check_compatible, fill_legacy_batch_counters, remap_keys
from . import engine
from .config import ArchConfig
from .hub import DenseNetHubMixin

__all__ = ["DenseNet"]


_IMAGENET_STEM = ("conv0", "norm0", "relu0", "pool0")


class _DenseLayer(nn.Module):
    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int, drop_rate: float) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, kernel_size=1, stride=1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(
            bn_size * growth_rate, growth_rate, kernel_size=3, stride=1, padding=1, bias=False
        )
        self.drop_rate = float(drop_rate)

    def forward(self, features: Tensor) -> Tensor:
        """Naive execution on the (already concatenated) input features, exactly torchvision's."""
        out = self.conv1(self.relu1(self.norm1(features)))
        out = self.conv2(self.relu2(self.norm2(out)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return out


class _DenseBlock(nn.ModuleDict):
    _version = 2

    def __init__(
        self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int, drop_rate: float
    ) -> None:
        super().__init__()
        for i in range(num_layers):
            layer = _DenseLayer(num_input_features + i * growth_rate, growth_rate, bn_size, drop_rate)
            self.add_module(f"denselayer{i + 1}", layer)
        self.memory_efficient = engine.NAIVE

    def forward(self, init_features: Tensor) -> Tensor:
        if self.memory_efficient != engine.NAIVE:
            return engine.dense_block(self, init_features, self.memory_efficient)
        features = [init_features]
        for layer in self.values():
            features.append(layer(torch.cat(features, 1)))
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    def __init__(self, num_input_features: int, num_output_features: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, kernel_size=1, stride=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)
        self.memory_efficient = engine.NAIVE

    def forward(self, x: Tensor) -> Tensor:
        if self.memory_efficient != engine.NAIVE:
            return engine.transition(self, x)
        return super().forward(x)


class DenseNet(nn.Module, DenseNetHubMixin):
    r"""DenseNet-BC (`Huang et al. <https://arxiv.org/abs/1608.06993>`_) with a memory-efficient engine.

    Args:
        growth_rate: how many feature maps each layer adds (``k`` in the paper).
        block_config: how many layers in each dense block (4 for ImageNet models, 3 for CIFAR).
        num_init_features: feature maps produced by the stem convolution.
        bn_size: bottleneck width factor (``bn_size * k`` maps after each 1x1 conv).
        drop_rate: dropout after each dense layer.
        num_classes: outputs of the classifier.
        memory_efficient: how dense blocks execute; one of ``False``/``"naive"`` (torchvision's
            computation), ``True``/``"efficient"`` (shared feature buffer, recomputes only
            elementwise BN+ReLU; about naive speed), ``"max_saving"`` (also recomputes the 1x1
            bottleneck convolution). The parameters are the same in every mode; change it later
            with :meth:`set_memory_efficient`.
        small_inputs: CIFAR stem (3x3 stride-1 ``conv0``, no ``norm0``/``relu0``/``pool0``).

    Example::

        >>> model = DenseNet(12, (16, 16, 16), 24, num_classes=10, small_inputs=True, memory_efficient=True)
        >>> sum(p.numel() for p in model.parameters())
        769162
    """

    def __init__(
        self,
        growth_rate: int = 32,
        block_config: tuple[int, ...] = (6, 12, 24, 16),
        num_init_features: int = 64,
        bn_size: int = 4,
        drop_rate: float = 0.0,
        num_classes: int = 1000,
        memory_efficient: bool | str = False,
        small_inputs: bool = False,
    ) -> None:
        super().__init__()
        _validate_arch(growth_rate, block_config, num_init_features, bn_size, drop_rate, num_classes)
        self.arch_config = ArchConfig(
            growth_rate, tuple(block_config), num_init_features, bn_size, num_classes, bool(small_inputs)
        )
        self.drop_rate = float(drop_rate)

        if small_inputs:
            stem = [
                ("conv0", nn.Conv2d(3, num_init_features, kernel_size=3, stride=1, padding=1, bias=False))
            ]
        else:
            stem = [
                ("conv0", nn.Conv2d(3, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)),
                ("norm0", nn.BatchNorm2d(num_init_features)),
                ("relu0", nn.ReLU(inplace=True)),
                ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
            ]
        self.features = nn.Sequential(OrderedDict(stem))

        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            block = _DenseBlock(num_layers, num_features, bn_size, growth_rate, drop_rate)
            self.features.add_module(f"denseblock{i + 1}", block)
            num_features = num_features + num_layers * growth_rate
            if i != len(block_config) - 1:
                self.features.add_module(f"transition{i + 1}", _Transition(num_features, num_features // 2))
                num_features = num_features // 2

        self.features.add_module("norm5", nn.BatchNorm2d(num_features))
        self.classifier = nn.Linear(num_features, num_classes)

        # torchvision's initialisation, in torchvision's order, so a seed gives the same parameters.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

        self.set_memory_efficient(memory_efficient)

    # -- execution mode -------------------------------------------------------------------------

    @property
    def memory_efficient(self) -> str:
        """The execution mode: ``"naive"``, ``"efficient"`` or ``"max_saving"``."""
        return self._mode

    def set_memory_efficient(self, mode: bool | str) -> DenseNet:
        """Switch how dense blocks execute; parameters and buffers are untouched. Returns self."""
        self._mode = engine.resolve_mode(mode)
        for m in self.features.modules():
            if isinstance(m, (_DenseBlock, _Transition)):
                m.memory_efficient = self._mode
        return self

    # -- forward --------------------------------------------------------------------------------

    def min_input_size(self) -> int:
        """The smallest height/width this architecture accepts (29 for the ImageNet models)."""
        return self.arch_config.min_input_size()

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"DenseNet expects a torch.Tensor of shape (N, 3, H, W), got {type(x).__name__}")
        if x.dim() != 4:
            raise UsageError(f"DenseNet expects a 4-D input (N, 3, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != 3:
            raise UsageError(
                f"DenseNet expects 3 input channels (N, 3, H, W), got {x.shape[1]} in shape {tuple(x.shape)}"
            )
        least = self.min_input_size()
        if min(x.shape[2], x.shape[3]) < least:
            raise UsageError(
                f"input of {x.shape[2]}x{x.shape[3]} is too small for this architecture: "
                f"height and width must be at least {least}"
            )

    def forward_features(self, x: Tensor) -> Tensor:
        """The feature map after ``norm5`` (before the final ReLU and pooling), as timm names it."""
        self._check_input(x)
        if self._mode == engine.NAIVE or self.arch_config.small_inputs:
            return self.features(x)
        # ImageNet stem: conv0 as usual, then norm0-relu0-pool0 without keeping norm0's output.
        f = self.features
        x = engine.stem(f.norm0, f.pool0, f.conv0(x), self._mode)
        for name, module in f.named_children():
            if name not in _IMAGENET_STEM:
                x = module(x)
        return x

    def forward_head(self, features: Tensor, pre_logits: bool = False) -> Tensor:
        out = F.relu(features)
        out = torch.flatten(F.adaptive_avg_pool2d(out, (1, 1)), 1)
        return out if pre_logits else self.classifier(out)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    # -- timm-style helpers ---------------------------------------------------------------------

    @property
    def num_features(self) -> int:
        """Channels entering the classifier (``norm5``'s width), as timm names it."""
        return self.features.norm5.num_features

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier by a freshly initialised one with ``num_classes`` outputs (0: identity)."""
        if num_classes < 0:
            raise UsageError(f"num_classes must be >= 0, got {num_classes}")
        ref = self.classifier.weight if isinstance(self.classifier, nn.Linear) else None
        if num_classes == 0:
            self.classifier = nn.Identity()
        else:
            self.classifier = nn.Linear(self.num_features, num_classes)
            nn.init.constant_(self.classifier.bias, 0)
            if ref is not None:
                self.classifier.to(device=ref.device, dtype=ref.dtype)
        self.arch_config = self.arch_config.with_classes(num_classes)

    def arch_summary(self) -> str:
        """The architecture in one line (for logs and error messages)."""
        return self.arch_config.describe()

    # -- loading --------------------------------------------------------------------------------

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Load torchvision-layout weights; legacy ``norm.1`` keys and ``module.`` prefixes are remapped.

        With ``strict=True`` (default) a checkpoint that does not fit raises
        :class:`~densenet_efficient.io.state_dict.StateDictMismatchError` naming the first
        missing, unexpected or mis-shaped keys.
        """
        sd = fill_legacy_batch_counters(remap_keys(state_dict), self)
        if strict:
            check_compatible(self, sd)
        return super().load_state_dict(sd, strict=strict, assign=assign)


def _validate_arch(growth_rate, block_config, num_init_features, bn_size, drop_rate, num_classes) -> None:
    for name, value in (
        ("growth_rate", growth_rate),
        ("num_init_features", num_init_features),
        ("bn_size", bn_size),
        ("num_classes", num_classes),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UsageError(f"{name} must be a positive int, got {value!r}")
    if (
        not isinstance(block_config, (tuple, list))
        or not block_config
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in block_config)
    ):
        raise UsageError(f"block_config must be a non-empty sequence of positive ints, got {block_config!r}")
    if not 0.0 <= float(drop_rate) < 1.0:
        raise UsageError(f"drop_rate must be in [0, 1), got {drop_rate!r}")
