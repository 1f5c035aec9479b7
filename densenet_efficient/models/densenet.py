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
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..errors import UsageError, check_fraction, check_int
from ..io.state_dict import check_compatible, fill_legacy_batch_counters, remap_keys
from . import engine
from .config import (
    ArchConfig,
    get_config,  # noqa: F401  (used by doctests)
)
from .hub import DenseNetHubMixin, default_pretrained_cfg
from .memory_plan import MemoryPlan, MemorySetting, resolve_memory_plan
from .parameters import check_model_size
from .registry import register_model_class

__all__ = ["DenseNet", "DenseNetFeatures", "FeatureInfo", "capturing_graph", "feature_info"]


_IMAGENET_STEM = ("conv0", "norm0", "relu0", "pool0")


def capturing_graph() -> bool:
    """Whether a tool is capturing this forward as a graph (``torch.jit`` tracing, ``torch.fx``,
    ``torch.export``, both ONNX exporters); not ``torch.compile``, which runs the engine.

    The engine's autograd Functions cannot be captured; in eval the naive graph computes the same
    numbers, so a captured graph is torchvision's (same nodes, same ONNX operators).
    """
    return torch.jit.is_tracing() or _fx_tracing() or torch.compiler.is_exporting()


def _fx_tracing() -> bool:
    """``torch.fx.symbolic_trace`` (and the tools built on it) is running this forward."""
    from torch.fx import _symbolic_trace

    probe = getattr(_symbolic_trace, "is_fx_symbolic_tracing", None)  # torch >= 2.6
    return probe() if probe is not None else _symbolic_trace.is_fx_tracing()


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
        # per layer: keeps its bottleneck output for backward; None: naive (engine.ExecutionPlan)
        self.keep: engine.Keep | None = None

    def forward(self, init_features: Tensor) -> Tensor:
        # TorchScript prunes a branch under `not is_scripting()` only when that is the whole condition,
        # so it compiles the naive path alone.
        if not torch.jit.is_scripting():  # noqa: SIM102
            if self.keep is not None and not capturing_graph():
                return engine.dense_block(self, init_features, self.keep)
        features = [init_features]
        for _, layer in self.items():
            features.append(layer(torch.cat(features, 1)))
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    def __init__(self, num_input_features: int, num_output_features: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, kernel_size=1, stride=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)
        self.keep: bool | None = None  # False: the engine's (keeps only its input); None: naive

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():  # noqa: SIM102 (see _DenseBlock.forward)
            if self.keep is not None and not capturing_graph():
                return engine.transition(self, x)
        return self.pool(self.conv(self.relu(self.norm(x))))


@register_model_class
class DenseNet(nn.Module, DenseNetHubMixin):
    r"""DenseNet-BC (`Huang et al. <https://arxiv.org/abs/1608.06993>`_) with a memory-efficient engine.

    Args:
        growth_rate: how many feature maps each layer adds (``k`` in the paper).
        block_config: how many layers in each dense block (4 for ImageNet models, 3 for CIFAR).
        num_init_features: feature maps produced by the stem convolution.
        bn_size: bottleneck width factor (``bn_size * k`` maps after each 1x1 conv).
        drop_rate: dropout after each dense layer.
        num_classes: outputs of the classifier; 0 for none (``forward`` returns pooled features).
        memory_efficient: how dense blocks execute; one of ``False``/``"naive"`` (torchvision's
            computation), ``True``/``"efficient"`` (shared feature buffer, recomputes only
            elementwise BN+ReLU; about naive speed), ``"max_saving"`` (also recomputes the 1x1
            bottleneck convolution); or one setting per dense block (a mode, how many of the
            block's last layers keep their bottleneck, or one boolean per layer) or a
            :class:`~.memory_plan.MemoryPlan`, for every memory point in between
            (:meth:`fit_memory` picks one for a budget). The parameters are the same in every
            setting; change it later with :meth:`set_memory_efficient`. Graph capture
            (``torch.jit``, ``torch.fx``, ``torch.export``, ONNX) always records the naive graph:
            the same numbers in eval.
        small_inputs: CIFAR stem (3x3 stride-1 ``conv0``, no ``norm0``/``relu0``/``pool0``).
        in_chans: input channels (3 for RGB).

    The timm interface is here too: ``forward_features`` / ``forward_head(pre_logits=)``,
    ``forward_intermediates``, ``feature_info``, ``get_classifier`` / ``reset_classifier``,
    ``set_grad_checkpointing``, ``num_features`` and ``pretrained_cfg``.

    Example::

        >>> model = DenseNet(12, (16, 16, 16), 24, num_classes=10, small_inputs=True, memory_efficient=True)
        >>> sum(p.numel() for p in model.parameters())
        769162
    """

    # Python-side conveniences TorchScript need not compile (torch.jit.script compiles forward)
    __jit_unused_properties__ = [
        "memory_efficient",
        "memory_plan",
        "num_features",
        "num_classes",
        "feature_info",
    ]

    def __init__(
        self,
        growth_rate: int = 32,
        block_config: tuple[int, ...] = (6, 12, 24, 16),
        num_init_features: int = 64,
        bn_size: int = 4,
        drop_rate: float = 0.0,
        num_classes: int = 1000,
        memory_efficient: MemorySetting = False,
        small_inputs: bool = False,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        self.arch_config = ArchConfig.checked(
            growth_rate=growth_rate,
            block_config=block_config,
            num_init_features=num_init_features,
            bn_size=bn_size,
            num_classes=num_classes,
            small_inputs=small_inputs,
            in_chans=in_chans,
        )
        self.drop_rate = check_fraction(drop_rate, "drop_rate")  # as config.json's drop_rate is checked
        check_model_size(self.arch_config)  # refuses what cannot fit before allocating any of it

        if small_inputs:
            conv0 = nn.Conv2d(in_chans, num_init_features, kernel_size=3, stride=1, padding=1, bias=False)
            stem = [("conv0", conv0)]
        else:
            stem = [
                (
                    "conv0",
                    nn.Conv2d(in_chans, num_init_features, kernel_size=7, stride=2, padding=3, bias=False),
                ),
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
        self.classifier = nn.Linear(num_features, num_classes) if num_classes else nn.Identity()

        # torchvision's initialisation, in torchvision's order, so a seed gives the same parameters.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

        #: timm's description of the weights (input size, preprocessing, license...); builders and
        #: ``from_pretrained`` fill it from the weights' metadata.
        self.pretrained_cfg: dict[str, Any] = default_pretrained_cfg(self.arch_config)
        self.set_memory_efficient(memory_efficient)

    # -- execution mode -------------------------------------------------------------------------

    @property
    def memory_efficient(self) -> str | MemoryPlan:
        """The execution mode, ``"naive"``, ``"efficient"`` or ``"max_saving"``, when every block
        runs it; otherwise the :class:`~.memory_plan.MemoryPlan` (see :attr:`memory_plan`)."""
        return self._plan.mode or self._plan

    @property
    def memory_plan(self) -> MemoryPlan:
        """How each dense block and the stem execute (with the planner's figures after
        :meth:`fit_memory`)."""
        return self._plan

    def set_memory_efficient(self, mode: MemorySetting) -> DenseNet:
        """Switch how dense blocks execute; parameters and buffers are untouched. Returns self.

        ``mode``: one mode for the whole model (``False``/``"naive"``, ``True``/``"efficient"``,
        ``"max_saving"``), one setting per dense block (a mode, the number of its last layers that
        keep their bottleneck output, or one boolean per layer), or a :class:`MemoryPlan`::

            model.set_memory_efficient(["max_saving", 6, True, "naive"])  # densenet121's 4 blocks
        """
        plan = resolve_memory_plan(mode, self.arch_config)
        execution = engine.ExecutionPlan.of(plan.blocks, plan.stem, self.arch_config.block_config)
        if not execution.all_naive:
            engine.engine_status()  # the kernels are chosen (the C++ ones built) before any trace
        self._plan, self._execution = plan, execution
        blocks = [m for m in self.features.children() if isinstance(m, _DenseBlock)]
        for block, keep in zip(blocks, execution.blocks, strict=True):
            block.keep = keep
        for m in self.features.children():
            if isinstance(m, _Transition):
                m.keep = execution.transitions
        return self

    def fit_memory(
        self,
        budget: int | str,
        *,
        batch_size: int,
        image_size: int | None = None,
        amp: str | None = None,
        optimizer: str = "momentum",
        device: str | None = None,
        verify: bool = False,
    ) -> MemoryPlan:
        """Pick and apply the setting with the least recompute whose training step fits ``budget``.

        ``budget`` is bytes or a string (``"450MB"``, ``"8GiB"``) for everything a training step
        holds: parameters, gradients, ``optimizer`` state (``"momentum"``, the default: SGD with
        momentum; ``"sgd"``: plain SGD; ``"adam"``), the input batch, activations and workspace
        (and the CUDA context on a GPU). The step is planned as this model trains: its parameters'
        dtype and layout (a model converted to ``torch.channels_last`` trains channels_last
        batches), its ``drop_rate``, and frozen features when none of them takes a gradient (only
        the classifier trains); ``device`` defaults to where the parameters are. Returns
        the applied :class:`MemoryPlan` with its estimated peak and extra time; a budget below the
        ``"max_saving"`` floor raises a
        :class:`~densenet_efficient.models.planner.MemoryBudgetError` naming the smallest budget
        that fits and the largest batch this budget fits.

        ``verify=True`` (CUDA only) then runs two training steps of the plan on a random batch and
        measures what the device really holds (``torch.cuda.max_memory_reserved`` plus the CUDA
        context); while that is over ``budget`` it plans again for a budget lowered by the excess,
        with a warning saying so. The model's weights, buffers and gradients are left as they were.

        >>> from densenet_efficient.models.builders import densenet121
        >>> plan = densenet121().fit_memory("1GiB", batch_size=8)
        >>> plan.estimated_peak <= 2**30
        True
        """
        from .planner.verify import fit_model  # the planner loads only when asked for a plan

        plan = fit_model(
            self, budget, batch_size=batch_size, image_size=image_size, amp=amp, optimizer=optimizer,
            device=device, verify=verify,
        )  # fmt: skip
        self.set_memory_efficient(plan)
        return plan

    @torch.jit.unused
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's switch for trading compute for memory, mapped onto the engine: ``True`` runs the
        ``"efficient"`` mode (a model already saving memory keeps its setting), ``False`` the naive one."""
        if not enable:
            self.set_memory_efficient(engine.NAIVE)
        elif self._plan.all_naive:
            self.set_memory_efficient(engine.EFFICIENT)

    # -- forward --------------------------------------------------------------------------------

    def min_input_size(self) -> int:
        """The smallest height/width this architecture accepts (29 for the ImageNet models)."""
        return self.arch_config.min_input_size()

    @torch.jit.unused
    def _check_input(self, x: Tensor) -> None:
        c = self.arch_config.in_chans
        if not isinstance(x, Tensor):
            raise TypeError(
                f"DenseNet expects a torch.Tensor of shape (N, {c}, H, W), got {type(x).__name__}"
            )
        if x.dim() != 4:
            raise UsageError(f"DenseNet expects a 4-D input (N, {c}, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != c:
            raise UsageError(
                f"DenseNet expects {c} input channels (N, {c}, H, W), got {x.shape[1]} in shape {tuple(x.shape)}"
            )
        least = self.min_input_size()
        if min(x.shape[2], x.shape[3]) < least:
            raise UsageError(
                f"input of {x.shape[2]}x{x.shape[3]} is too small for this architecture: "
                f"height and width must be at least {least}"
            )

    def forward_features(self, x: Tensor) -> Tensor:
        """The final feature map, after ``norm5`` and its ReLU, as timm's ``forward_features``.

        (torchvision's ``model.features(x)`` is the map before that ReLU.)
        """
        if not torch.jit.is_scripting():
            if not _fx_tracing():  # a Proxy has no concrete shape to check
                self._check_input(x)
            if not self._execution.all_naive and not capturing_graph():
                return self._engine_features(x)
        return F.relu(self.features(x), inplace=True)

    @torch.jit.unused
    def _engine_features(self, x: Tensor) -> Tensor:
        if torch.compiler.is_compiling():  # the compiler traces each call's own update
            return self._engine_layers(x)
        with engine.batched_running_updates():  # every engine BN's running statistics in two kernels
            return self._engine_layers(x)

    def _engine_layers(self, x: Tensor) -> Tensor:
        f = self.features
        done = ("norm5",)
        if not self.arch_config.small_inputs:
            # ImageNet stem: conv0 as usual, then norm0-relu0-pool0 without keeping norm0's output.
            if self._execution.stem is None:  # naive stem, engine blocks
                x = f.pool0(f.relu0(f.norm0(f.conv0(x))))
            else:
                x = engine.stem(f.norm0, f.pool0, f.conv0(x), self._execution.stem)
            done += _IMAGENET_STEM
        for name, module in f.named_children():
            if name not in done:
                x = module(x)
        # norm5 + ReLU keeps only its input, which the last block keeps anyway (and, unlike
        # nn.BatchNorm2d with momentum=None, never reads num_batches_tracked on the host).
        return engine.norm_relu(f.norm5, x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Global average pooling, then the classifier (``pre_logits=True``: the pooled features)."""
        out = torch.flatten(F.adaptive_avg_pool2d(x, (1, 1)), 1)
        return out if pre_logits else self.classifier(out)

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():  # noqa: SIM102 (see _DenseBlock.forward)
            if torch.compiler.is_compiling() and x.shape[0] == 0:  # (an FX proxy has no shape to test)
                # disabled here, not by a decorator: that would import torch._dynamo with the package
                return torch.compiler.disable(self._forward_eagerly)(x)
        return self.forward_head(self.forward_features(x))

    @torch.jit.unused
    def _forward_eagerly(self, x: Tensor) -> Tensor:
        """An empty batch under the compiler, eagerly (a graph break): torch's compiled convolution
        backward fails on an empty batch, and a rank with synchronised batch norm must still take
        part in every collective, with weight 0, as the eager engine does (DDP's last batch)."""
        return self.forward_head(self.forward_features(x))

    # -- timm-style helpers ---------------------------------------------------------------------

    @property
    def num_features(self) -> int:
        """Channels entering the classifier (``norm5``'s width), as timm names it."""
        return self.features.norm5.num_features

    @property
    def num_classes(self) -> int:
        """Outputs of the classifier (0: none, ``forward`` returns pooled features)."""
        return self.arch_config.num_classes

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """timm's description of the intermediate feature maps: channels, reduction, module."""
        return feature_info(self.arch_config)

    @torch.jit.unused
    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """timm's ``forward_intermediates``: the final features and the maps of :attr:`feature_info`.

        Index 0 is the stem's output (after its ReLU, before pooling; the CIFAR stem's conv0),
        indices 1 to n-1 the outputs of all dense blocks but the last (before their transitions),
        the last index the final ``norm5`` + ReLU map. ``indices``: an int takes the last n, a
        sequence those indices, None all. Dense blocks run in the model's memory mode.
        """
        if output_fmt != "NCHW":
            raise UsageError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        self._check_input(x)
        take = _take_indices(len(self.feature_info), indices)
        x, intermediates = _intermediates(self.features, self.arch_config, x, take, stop_early)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier by a freshly initialised one with ``num_classes`` outputs (0: identity)."""
        if global_pool not in (None, "avg"):
            raise UsageError(
                f"global_pool must be 'avg' (the only pooling of this DenseNet), got {global_pool!r}"
            )
        check_int(num_classes, "num_classes", 0)
        ref = next(iter(self.features.norm5.parameters()))
        if num_classes == 0:
            self.classifier = nn.Identity()
        else:
            self.classifier = nn.Linear(self.num_features, num_classes)
            nn.init.constant_(self.classifier.bias, 0)
            self.classifier.to(device=ref.device, dtype=ref.dtype)
        self.arch_config = self.arch_config.with_classes(num_classes)
        self.pretrained_cfg = {**self.pretrained_cfg, "num_classes": num_classes}
        self.pretrained_cfg.pop("label_names", None)

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


def feature_info(config: ArchConfig) -> list[dict[str, Any]]:
    """Channels, reduction and module of each intermediate map (timm's ``feature_info``).

    >>> [(f["num_chs"], f["reduction"], f["module"]) for f in feature_info(get_config("densenet121"))][:2]
    [(64, 2, 'features.norm0'), (256, 4, 'features.denseblock1')]
    """
    stride = 1 if config.small_inputs else 2
    info = [
        {
            "num_chs": config.num_init_features,
            "reduction": stride,
            "module": "features.conv0" if config.small_inputs else "features.norm0",
        }
    ]
    stride *= 1 if config.small_inputs else 2  # the stem's max-pool
    channels = config.num_init_features
    for i, layers in enumerate(config.block_config[:-1]):
        channels += layers * config.growth_rate
        info.append({"num_chs": channels, "reduction": stride, "module": f"features.denseblock{i + 1}"})
        channels //= 2
        stride *= 2
    channels += config.block_config[-1] * config.growth_rate
    info.append({"num_chs": channels, "reduction": stride, "module": "features.norm5"})
    return info


def _intermediates(
    features: nn.Sequential, config: ArchConfig, x: Tensor, take: list[int], stop_early: bool
) -> tuple[Tensor, list[Tensor]]:
    """Run ``features`` module by module, keeping the maps of :func:`feature_info` listed in ``take``."""
    blocks = len(config.block_config)
    # where each map is taken: timm's stem feature is the activation (relu0 comes right after norm0)
    capture = {"conv0" if config.small_inputs else "relu0": 0, "norm5": blocks}
    capture.update({f"denseblock{i + 1}": i + 1 for i in range(blocks - 1)})
    intermediates, last = [], max(take)
    for name, module in features.named_children():
        x = module(x)
        if name == "norm5":
            x = F.relu(x)
        index = capture.get(name)
        if index is not None:
            if index in take:
                intermediates.append(x)
            if stop_early and index == last:
                break
    return x, intermediates


class FeatureInfo(list):
    """timm's ``FeatureInfo`` for a features-only model: the selected maps' dicts, with accessors."""

    def channels(self) -> list[int]:
        return [f["num_chs"] for f in self]

    def reduction(self) -> list[int]:
        return [f["reduction"] for f in self]

    def module_name(self) -> list[str]:
        return [f["module"] for f in self]

    def get_dicts(self) -> list[dict[str, Any]]:
        return [dict(f) for f in self]


class DenseNetFeatures(nn.Module):
    """timm's ``features_only=True``: the DenseNet's feature modules, returning a list of maps.

    ``out_indices`` selects maps of :func:`feature_info` (default: all). The parameters keep their
    ``features.*`` names, so a DenseNet's weights load with ``strict=False`` (no classifier).

    >>> f = DenseNetFeatures(DenseNet(12, (2, 2, 2), 24, num_classes=10, small_inputs=True), (1, 3))
    >>> [tuple(t.shape) for t in f(torch.randn(2, 3, 32, 32))], f.feature_info.channels()
    ([(2, 48, 32, 32), (2, 48, 8, 8)], [48, 48])
    """

    def __init__(self, model: DenseNet, out_indices: Sequence[int] | None = None) -> None:
        super().__init__()
        self.arch_config = model.arch_config
        self.features = model.features
        every = feature_info(model.arch_config)
        self.out_indices = _take_indices(len(every), out_indices)
        self.feature_info = FeatureInfo(dict(every[i], index=i) for i in self.out_indices)
        self.pretrained_cfg = dict(model.pretrained_cfg)

    def forward(self, x: Tensor) -> list[Tensor]:
        return _intermediates(self.features, self.arch_config, x, self.out_indices, stop_early=True)[1]


def _take_indices(count: int, indices: int | Sequence[int] | None) -> list[int]:
    if indices is None:
        return list(range(count))
    if isinstance(indices, int):
        if not 0 < indices <= count:
            raise UsageError(f"indices as an int takes the last n of {count} feature maps, got {indices}")
        return list(range(count - indices, count))
    take = [i if i >= 0 else count + i for i in indices]
    if not take or any(not 0 <= i < count for i in take):
        raise UsageError(f"feature indices must lie in [0, {count}), got {list(indices)}")
    return sorted(set(take))
