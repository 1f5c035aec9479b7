"""Architecture configurations as data: everything the package knows about an architecture.

Every named architecture is one :class:`ModelEntry` row of :data:`MODEL_TABLE`: its title, its
:class:`ArchConfig` and its published weights (URL with the sha256 prefix, accuracy, size,
preprocessing). Builders, the hubs, conversion, the weights manifest and enums, the memory planner
and the generated files (``weights/manifest.json``, hubconf.py's entrypoints, README tables) all
read the same rows. A new model is one row here and one builder decorated with
``@register_model`` (:mod:`.registry`), then ``python scripts/generate_files.py``. An
architecture's name, its smallest and default input size and its JSON form are methods of
:class:`ArchConfig`, written once.

>>> get_config("densenet121").block_config
(6, 12, 24, 16)
>>> densenet_bc_config(40).block_config
(6, 6, 6)
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Any

from ..errors import UsageError, check_int, shown
from .imagenet import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "ARCHITECTURES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MODEL_TABLE",
    "ArchConfig",
    "ModelEntry",
    "Weights",
    "densenet_bc_config",
    "get_config",
    "list_architectures",
    "num_params",
    "resolve_arch",
]


#: The integer fields of :class:`ArchConfig` and their smallest value (no classifier: 0 classes).
_INT_FIELDS = {"growth_rate": 1, "num_init_features": 1, "bn_size": 1, "num_classes": 0, "in_chans": 1}
_LAYER_KEY = re.compile(r"^features\.denseblock(\d{1,18})\.denselayer(\d{1,18})\.")


@dataclass(frozen=True)
class ArchConfig:
    """The constructor arguments of :class:`~densenet_efficient.DenseNet` that fix its tensors."""

    growth_rate: int
    block_config: tuple[int, ...]
    num_init_features: int
    bn_size: int = 4
    num_classes: int = 1000
    small_inputs: bool = False
    in_chans: int = 3

    def to_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``DenseNet(**kwargs)``."""
        kwargs = asdict(self)
        kwargs["block_config"] = tuple(self.block_config)
        return kwargs

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields (``block_config`` as a list); :meth:`from_json` inverts it."""
        data = asdict(self)
        data["block_config"] = list(self.block_config)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any], source: str = "config") -> ArchConfig:
        """The config a :meth:`to_json` dict describes; extra keys are ignored, missing ones named.

        Every field is type- and range-checked before anything is built from it (a config.json is
        a file users edit): a string, float, null, bool or 1e400 where an integer belongs is a
        :class:`UsageError` naming ``source``, the field and the value.

        >>> ArchConfig.from_json(get_config("densenet121").to_json()) == get_config("densenet121")
        True
        >>> ArchConfig.from_json({**get_config("densenet121").to_json(), "growth_rate": "32"}, "x/config.json")
        Traceback (most recent call last):
        ...
        densenet_efficient.errors.UsageError: x/config.json: growth_rate must be an integer >= 1, found '32'
        """
        missing = [f.name for f in fields(cls) if f.default is MISSING and f.name not in data]
        if missing:
            raise UsageError(f"{source}: missing architecture fields {', '.join(missing)}")
        if "memory_efficient" in data:  # never saved (chosen when loading): applying it would surprise
            raise UsageError(
                f"{source}: memory_efficient={shown(data['memory_efficient'])} is not an architecture "
                "field (how blocks execute is chosen when loading, never saved); remove it and pass "
                "memory_efficient= when loading"
            )
        return cls.checked(source, **{f.name: data[f.name] for f in fields(cls) if f.name in data})

    @classmethod
    def checked(cls, source: str | None = None, **values: Any) -> ArchConfig:
        """The config of these field values, each type- and range-checked first: the one check of an
        architecture, whether its fields come from ``DenseNet(...)``'s arguments or a file.

        A string, float, null, bool or 1e400 where an integer belongs, an empty ``block_config`` or
        a ``small_inputs`` other than True/False is a :class:`UsageError` naming the field, the
        value and ``source`` (when given).

        >>> ArchConfig.checked(growth_rate=12, block_config=[16, 16, 16], num_init_features=24).block_config
        (16, 16, 16)
        >>> ArchConfig.checked(growth_rate=12, block_config=(), num_init_features=24)
        Traceback (most recent call last):
        ...
        densenet_efficient.errors.UsageError: block_config must be a list of ints, found ()
        """
        where = f"{source}: " if source else ""
        blocks = values["block_config"]
        if not isinstance(blocks, (list, tuple)) or not blocks:
            raise UsageError(f"{where}block_config must be a list of ints, found {shown(blocks)}")
        for i, layers in enumerate(blocks):
            check_int(layers, f"{where}block_config[{i}]")
        for name, least in _INT_FIELDS.items():
            if name in values:
                check_int(values[name], f"{where}{name}", least)
        if "small_inputs" in values and not isinstance(values["small_inputs"], bool):
            raise UsageError(
                f"{where}small_inputs must be true or false, found {shown(values['small_inputs'])}"
            )
        return cls(**{**values, "block_config": tuple(blocks)})

    def state_dict_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every key of the model's ``state_dict()`` and its tensor's shape, in the same order,
        computed from the numbers alone: no model is built, so a config asking for gigabytes
        (``growth_rate=100000``) can be compared with a weights file before anything is allocated.

        >>> shapes = densenet_bc_config(10).state_dict_shapes()
        >>> shapes["features.denseblock1.denselayer1.conv1.weight"], shapes["classifier.weight"]
        ((48, 24, 1, 1), (10, 27))
        """
        shapes: dict[str, tuple[int, ...]] = {}

        def conv(prefix: str, out: int, inp: int, kernel: int) -> None:
            shapes[f"{prefix}.weight"] = (out, inp, kernel, kernel)

        def norm(prefix: str, channels: int) -> None:  # nn.BatchNorm2d: parameters, then buffers
            for name in ("weight", "bias", "running_mean", "running_var"):
                shapes[f"{prefix}.{name}"] = (channels,)
            shapes[f"{prefix}.num_batches_tracked"] = ()

        k, width, channels = self.growth_rate, self.bn_size * self.growth_rate, self.num_init_features
        conv("features.conv0", channels, self.in_chans, 3 if self.small_inputs else 7)
        if not self.small_inputs:
            norm("features.norm0", channels)
        for b, layers in enumerate(self.block_config, start=1):
            for i in range(1, layers + 1):
                prefix = f"features.denseblock{b}.denselayer{i}"
                norm(f"{prefix}.norm1", channels)
                conv(f"{prefix}.conv1", width, channels, 1)
                norm(f"{prefix}.norm2", width)
                conv(f"{prefix}.conv2", k, width, 3)
                channels += k
            if b < len(self.block_config):  # DenseNet-BC transitions halve the channels
                norm(f"features.transition{b}.norm", channels)
                conv(f"features.transition{b}.conv", channels // 2, channels, 1)
                channels //= 2
        norm("features.norm5", channels)
        if self.num_classes:  # num_classes=0: no classifier (pooled features out)
            shapes["classifier.weight"] = (self.num_classes, channels)
            shapes["classifier.bias"] = (self.num_classes,)
        return shapes

    def check_shapes(self, tensors: Mapping[str, Any], *, ignore: tuple[str, ...] = ()) -> None:
        """Check that ``tensors`` (torchvision-style keys) are exactly the state dict this config
        builds, without building it: :meth:`state_dict_shapes` is arithmetic, and ``tensors`` may
        map keys to tensors or to shapes (a safetensors header's, read without loading a tensor).

        Checkpoints that predate ``num_batches_tracked`` (none at all) pass, as loading fills the
        counters in. ``ignore`` lists key prefixes that may differ (``"classifier."``).

        Raises:
            StateDictMismatchError: naming the first missing, unexpected and mis-shaped keys.
        """
        from ..io.state_dict import StateDictMismatchError, check_shapes  # torch-free for the CLI

        # The layer counts first, from the keys (O(keys)): a config of a billion layers next to a
        # small file is refused before its billion expected keys would be enumerated.
        found = _layer_counts(k for k in tensors if not k.startswith(ignore))
        if found != tuple(self.block_config) and not any("features.".startswith(p) for p in ignore):
            raise StateDictMismatchError(
                f"checkpoint does not fit {self.describe()}: its tensors hold dense blocks of "
                f"{_block_text(found)} layers, the architecture {_block_text(self.block_config)}; "
                + _first_layer_difference(found, tuple(self.block_config))
            )
        expected = self.state_dict_shapes()
        if not any(k.endswith("num_batches_tracked") for k in tensors):
            expected = {k: v for k, v in expected.items() if not k.endswith("num_batches_tracked")}
        check_shapes(expected, tensors, ignore=ignore, target=self.describe())

    def with_classes(self, num_classes: int) -> ArchConfig:
        return replace(self, num_classes=num_classes)

    @property
    def default_resolution(self) -> int:
        """The input size the architecture was designed for: 32 (CIFAR stem) or 224 (ImageNet)."""
        return 32 if self.small_inputs else 224

    def stem_size(self, size: int) -> int:
        """Spatial size of the stem's convolution output for an input of ``size`` pixels."""
        return size if self.small_inputs else (size + 2 * 3 - 7) // 2 + 1  # conv0 7x7/2 (CIFAR: 3x3/1)

    def block_sizes(self, size: int) -> list[int]:
        """Spatial size entering each dense block for an input of ``size`` pixels.

        >>> get_config("densenet121").block_sizes(224)
        [56, 28, 14, 7]
        """
        size = self.stem_size(size)
        if not self.small_inputs:
            size = (size + 2 * 1 - 3) // 2 + 1  # pool0 3x3/2
        sizes = []
        for _ in self.block_config:
            sizes.append(size)
            size //= 2  # transition avg-pool 2x2/2
        return sizes

    def last_block_size(self, size: int) -> int:
        """Spatial size entering the last dense block for an input of ``size`` pixels."""
        return self.block_sizes(size)[-1]

    def min_input_size(self) -> int:
        """The smallest height/width the architecture accepts (29 for the ImageNet models).

        Closed form, O(blocks): :meth:`last_block_size` inverted step by step, so a config with
        40 dense blocks (inputs of 2**41 pixels) answers at once instead of trying every size.

        >>> get_config("densenet121").min_input_size(), get_config("densenet_bc_100").min_input_size()
        (29, 4)
        """
        # The smallest input of each step giving at least `least` out: a 2x2/2 average pool needs
        # 2 * least, a 3x3/2 pool or 7x7/2 conv with padding (ceil(size / 2)) needs 2 * least - 1.
        least = 1 << max(len(self.block_config) - 1, 0)  # the transitions' pools
        if not self.small_inputs:
            least = 2 * (2 * least - 1) - 1  # pool0, then conv0
        return least

    def architecture_name(self, ignore_classes: bool = False) -> str | None:
        """The name of the :data:`ARCHITECTURES` entry equal to this config (any classifier width when
        ``ignore_classes``), or None."""
        for name, known in ARCHITECTURES.items():
            if (self.with_classes(known.num_classes) if ignore_classes else self) == known:
                return name
        return None

    @property
    def name(self) -> str:
        """A short name: the table's, ``densenet_bc_<depth>[_k<growth>]``, or a description.

        >>> densenet_bc_config(250).name, get_config("densenet161").name
        ('densenet_bc_250', 'densenet161')
        """
        known = self.architecture_name()
        if known is not None:
            return known
        layers = self.block_config
        if self.small_inputs and len(layers) == 3 and len(set(layers)) == 1:
            depth = 6 * layers[0] + 4
            if self == densenet_bc_config(depth, self.growth_rate, self.num_classes):
                return f"densenet_bc_{depth}" + ("" if self.growth_rate == 12 else f"_k{self.growth_rate}")
        return self.describe()

    def describe(self) -> str:
        """Every field in one line, for messages and model cards."""
        stem = "CIFAR stem" if self.small_inputs else "ImageNet stem"
        chans = "" if self.in_chans == 3 else f", {self.in_chans} input channels"
        return (
            f"DenseNet(k={self.growth_rate}, blocks={tuple(self.block_config)}, init={self.num_init_features}, "
            f"bn_size={self.bn_size}, classes={self.num_classes}, {stem}{chans})"
        )


def _layer_counts(keys: Iterable[str]) -> tuple[int, ...]:
    """Layers per dense block as state-dict keys name them (``features.denseblock2.denselayer5.``).

    A block counts ``n`` layers only when its layer indices are exactly 1..n and blocks are
    numbered 1..B (a gap counts as -1, which no architecture has), so no count exceeds the number
    of keys."""
    layers: dict[int, set[int]] = {}
    for key in keys:
        m = _LAYER_KEY.match(key)
        if m:
            layers.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    return tuple(
        len(ids) if block == i and max(ids) == len(ids) else -1
        for i, (block, ids) in enumerate(sorted(layers.items()), start=1)
    )


def _first_layer_difference(found: tuple[int, ...], wanted: tuple[int, ...]) -> str:
    """The first layer (key prefix) one side has and the other lacks, worded as check_shapes does."""
    for b, (have, want) in enumerate(zip(found, wanted, strict=False), start=1):
        if have != want:
            if have == -1:
                return f"unexpected keys: features.denseblock{b}.* (its layers are not numbered 1..n)"
            side, layer = ("missing", have + 1) if have < want else ("unexpected", want + 1)
            return f"{side} keys: features.denseblock{b}.denselayer{layer}.*"
    if len(found) < len(wanted):
        return f"missing keys: features.denseblock{len(found) + 1}.*"
    return f"unexpected keys: features.denseblock{len(wanted) + 1}.*"


def _block_text(blocks: tuple[int, ...]) -> str:
    shown_blocks = blocks if len(blocks) <= 8 else (*blocks[:8], "...")
    return "-".join("?" if n == -1 else str(n) for n in shown_blocks) if blocks else "no"


def densenet_bc_config(depth: int, growth_rate: int = 12, num_classes: int = 10) -> ArchConfig:
    """The CIFAR DenseNet-BC of a given depth, as the original efficient-DenseNet demo built it.

    Depth counts the convolutions and the classifier: 3 dense blocks of n bottleneck layers
    (2 convs each), 2 transitions, the stem conv and the classifier, so depth = 6n + 4.
    """
    if not isinstance(depth, int) or isinstance(depth, bool):
        raise TypeError(f"depth must be an int, got {type(depth).__name__}")
    if depth < 10 or (depth - 4) % 6 != 0:
        lo = max(10, (depth - 4) // 6 * 6 + 4)
        raise UsageError(
            f"DenseNet-BC depth must be of the form 6n+4 with n >= 1 (e.g. {lo}, {lo + 6}), got {depth}"
        )
    if growth_rate < 1:
        raise UsageError(f"growth_rate must be >= 1, got {growth_rate}")
    n = (depth - 4) // 6
    return ArchConfig(
        growth_rate=growth_rate,
        block_config=(n, n, n),
        num_init_features=2 * growth_rate,
        bn_size=4,
        num_classes=num_classes,
        small_inputs=True,
    )


#: torchvision's ImageNet normalisation, which its DenseNet weights (and timm's copies) expect.
#: torchvision's preprocessing for its ImageNet weights (``transforms._presets.ImageClassification``).
IMAGENET_PREPROCESSING: dict[str, Any] = {
    "resize_size": 256,
    "crop_size": 224,
    "interpolation": "bilinear",
    "antialias": True,
    "mean": IMAGENET_MEAN,
    "std": IMAGENET_STD,
}


@dataclass(frozen=True)
class Weights:
    """One published weights file of a table row, as data: where it is and what it is.

    ``url``'s file name carries the first 8+ hex digits of the file's sha256 (torch.hub's
    convention: the download is checked against it); ``meta`` holds the rest of the manifest entry
    (``acc@1``/``acc@5``, ``GFLOPS``, ``file_size`` in MiB, ``categories``, ``preprocessing``,
    ``recipe``, ``license``, ``docs``). The parameter count and smallest input are not written here:
    they follow from the row's config (:meth:`ModelEntry.manifest_entry`).
    """

    url: str
    meta: Mapping[str, Any]
    num_classes: int = 1000


@dataclass(frozen=True)
class ModelEntry:
    """One row of :data:`MODEL_TABLE`: an architecture and its published weights (first = default)."""

    title: str
    config: ArchConfig
    weights: Mapping[str, Weights] = field(default_factory=dict)

    @property
    def default_weights(self) -> str | None:
        """The name ``weights="DEFAULT"`` / ``pretrained=True`` selects: the row's first weights."""
        return next(iter(self.weights), None)

    def manifest_entry(self, name: str) -> dict[str, Any]:
        """Weights ``name`` in the JSON form of ``weights/manifest.json`` (a fresh dict): the table's
        data, with the parameter count and smallest input the config implies."""
        weights = self.weights[name]
        least = self.config.min_input_size()
        return {
            "url": weights.url,
            "num_classes": weights.num_classes,
            "num_params": num_params(self.config.with_classes(weights.num_classes)),
            "min_size": [least, least],
            **json.loads(json.dumps(dict(weights.meta))),  # deep and JSON-typed (tuples -> lists)
        }


def num_params(config: ArchConfig) -> int:
    """Trainable parameters of ``config`` (weights and biases, no running statistics), by arithmetic.

    >>> num_params(get_config("densenet121"))
    7978856
    """
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    shapes = config.state_dict_shapes()
    return sum(math.prod(shape) for key, shape in shapes.items() if not key.endswith(buffers))


def _torchvision_weights(file: str, acc1: float, acc5: float, gflops: float, mib: float) -> Weights:
    """torchvision's ``IMAGENET1K_V1`` file ``file`` and its published figures."""
    return Weights(
        url=f"https://download.pytorch.org/models/{file}",
        meta={
            "dataset": "ImageNet-1K",
            "categories": "imagenet-1k",
            "acc@1": acc1,
            "acc@5": acc5,
            "GFLOPS": gflops,
            "file_size": mib,
            "preprocessing": IMAGENET_PREPROCESSING,
            "recipe": "https://github.com/pytorch/vision/pull/116",
            "license": "BSD-3-Clause",
            "docs": "torchvision's IMAGENET1K_V1 weights, ported from LuaTorch (torchvision.models.densenet).",
        },
    )


#: Every named architecture and its published weights: the one place a model is described. The
#: builders' registry, ``ARCHITECTURES``, ``list_models``, the weights manifest and its enums,
#: ``weights/manifest.json``, hubconf.py's entrypoints and the model tables of README.md and
#: weights/README.md all derive from it (``python scripts/generate_files.py`` rewrites the generated
#: files; a test fails while they are stale). ImageNet configs and figures are torchvision's
#: (0.29: acc@1, acc@5, GFLOPS, file size in MiB); DenseNet-BC-100 is the CIFAR model of the original
#: memory-efficient DenseNet report; densenet264 is the paper's deepest ImageNet model, which
#: torchvision does not publish.
MODEL_TABLE: dict[str, ModelEntry] = {
    "densenet121": ModelEntry(
        "DenseNet-121",
        ArchConfig(32, (6, 12, 24, 16), 64),
        {"IMAGENET1K_V1": _torchvision_weights("densenet121-a639ec97.pth", 74.434, 91.972, 2.834, 30.845)},
    ),
    "densenet161": ModelEntry(
        "DenseNet-161",
        ArchConfig(48, (6, 12, 36, 24), 96),
        {"IMAGENET1K_V1": _torchvision_weights("densenet161-8d451a50.pth", 77.138, 93.560, 7.728, 110.369)},
    ),
    "densenet169": ModelEntry(
        "DenseNet-169",
        ArchConfig(32, (6, 12, 32, 32), 64),
        {"IMAGENET1K_V1": _torchvision_weights("densenet169-b2777c0a.pth", 75.600, 92.806, 3.36, 54.708)},
    ),
    "densenet201": ModelEntry(
        "DenseNet-201",
        ArchConfig(32, (6, 12, 48, 32), 64),
        {"IMAGENET1K_V1": _torchvision_weights("densenet201-c1103571.pth", 76.896, 93.370, 4.291, 77.373)},
    ),
    "densenet264": ModelEntry("DenseNet-264", ArchConfig(32, (6, 12, 64, 48), 64)),
    "densenet_bc_100": ModelEntry("CIFAR DenseNet-BC-100", densenet_bc_config(100)),
}


class _ConfigView(Mapping[str, ArchConfig]):
    """Name -> :class:`ArchConfig` of :data:`MODEL_TABLE`, read through (a view, never a copy)."""

    def __getitem__(self, name: str) -> ArchConfig:
        return MODEL_TABLE[name].config

    def __iter__(self) -> Iterator[str]:
        return iter(MODEL_TABLE)

    def __len__(self) -> int:
        return len(MODEL_TABLE)

    def __repr__(self) -> str:
        return repr(dict(self))


#: Named architectures: the configs of :data:`MODEL_TABLE`, by name (a read-only view of it).
ARCHITECTURES: Mapping[str, ArchConfig] = _ConfigView()


def list_architectures() -> list[str]:
    """The registered architecture names, sorted."""
    return sorted(ARCHITECTURES)


_BC_NAME = re.compile(r"^densenet_bc[_-]?(\d+)$")
#: Longer depths are refused by their length alone (a model of 10**18 layers could not be built).
_MAX_DEPTH_DIGITS = 18


def resolve_arch(arch: str | ArchConfig, growth_rate: int | None = None) -> ArchConfig:
    """An :class:`ArchConfig` from an architecture name, ``densenet_bc_<depth>`` or a config itself.

    >>> resolve_arch("densenet_bc_250").block_config
    (41, 41, 41)
    """
    if isinstance(arch, ArchConfig):
        return arch
    if not isinstance(arch, str):
        raise TypeError(f"arch must be an architecture name or an ArchConfig, got {type(arch).__name__}")
    match = _BC_NAME.match(arch)
    if match:  # any depth; densenet_bc_100 is the same config as the table's
        digits = match.group(1)
        if len(digits) > _MAX_DEPTH_DIGITS:  # int() of 4300+ digits raises ValueError; none builds
            raise UsageError(
                f"{arch[:40]}...: a DenseNet-BC depth of {len(digits)} digits; expected densenet_bc_<depth> "
                f"with depth = 6n+4 of at most {_MAX_DEPTH_DIGITS} digits (e.g. densenet_bc_100)"
            )
        return densenet_bc_config(int(digits), 12 if growth_rate is None else growth_rate)
    config = get_config(arch)
    if growth_rate is not None and growth_rate != config.growth_rate:
        raise UsageError(
            f"--growth-rate applies to DenseNet-BC (densenet_bc_<depth>) only; {arch} has k={config.growth_rate}"
        )
    return config


def get_config(name: str) -> ArchConfig:
    """The registered config called ``name`` (clear error listing the known names otherwise)."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise UsageError(
            f"unknown architecture {name!r}; expected one of {', '.join(list_architectures())} "
            "(or densenet_bc(depth) for any DenseNet-BC depth)"
        ) from None
