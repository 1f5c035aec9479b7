"""Published pretrained weights: the manifest (as data), torchvision-style enums, ``weights=`` resolution.

The ImageNet weights are torchvision's own files: the ``state_dict`` layout is identical, so the
manifest only records where each file lives (a URL whose name carries its sha256 prefix, as
torch.hub expects) and what it is (accuracy, size, preprocessing). Loading always goes through
``torch.hub.load_state_dict_from_url(check_hash=True, weights_only=True)``; a cached file is
re-hashed before it is trusted, so a file corrupted after download is caught too
(:mod:`densenet_efficient.io.download`).

>>> spec = get_weights("densenet121")
>>> spec.url, spec.meta["acc@1"]
('https://download.pytorch.org/models/densenet121-a639ec97.pth', 74.434)

    model = densenet121(weights="IMAGENET1K_V1")          # downloads

Overrides (for mirrors and tests), read on every lookup:

* ``DENSENET_EFFICIENT_WEIGHTS_URL_BASE``: serve every manifest file from this base URL instead
  (same file names, so the hash check still applies), e.g. an internal mirror.
* ``DENSENET_EFFICIENT_WEIGHTS_MANIFEST``: path of a JSON manifest in the format of
  ``weights/manifest.json``; its entries replace or extend the built-in ones.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from ..errors import UsageError, check_int, shown
from ..io.download import WeightsIntegrityError, check_url, fetch_state_dict, hash_prefix, url_filename
from ..io.json_file import read_json_object
from ..io.state_dict import load_state_dict_into, remap_keys
from .config import ARCHITECTURES
from .imagenet import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "DenseNet121_Weights",
    "DenseNet161_Weights",
    "DenseNet169_Weights",
    "DenseNet201_Weights",
    "WeightsEnum",
    "WeightsSpec",
    "WeightsNotAvailableError",
    "WeightsIntegrityError",
    "builtin_manifest",
    "get_weights",
    "list_weights",
    "load_state_dict_from_manifest",
    "load_weights",
    "manifest",
    "manifest_json",
    "pretrained_cfg",
    "resolve_weights",
    "weights_enum",
]

URL_BASE_ENV = "DENSENET_EFFICIENT_WEIGHTS_URL_BASE"
MANIFEST_ENV = "DENSENET_EFFICIENT_WEIGHTS_MANIFEST"
MANIFEST_FORMAT = "densenet_efficient-weights-manifest/1"
_CHUNK_SLACK = 1 << 16  # a download's bound is checked per chunk read

# torchvision's ImageNet preprocessing for these weights (torchvision.transforms._presets.ImageClassification).
_IMAGENET_PREPROCESSING = {
    "resize_size": 256,
    "crop_size": 224,
    "interpolation": "bilinear",
    "antialias": True,
    "mean": list(IMAGENET_MEAN),
    "std": list(IMAGENET_STD),
}


def _torchvision_imagenet(filename: str, acc1: float, acc5: float, params: int, gflops: float, mb: float):
    return {
        "url": f"https://download.pytorch.org/models/{filename}",
        "num_classes": 1000,
        "dataset": "ImageNet-1K",
        "categories": "imagenet-1k",
        "acc@1": acc1,
        "acc@5": acc5,
        "num_params": params,
        "GFLOPS": gflops,
        "file_size": mb,
        "min_size": [29, 29],
        "preprocessing": _IMAGENET_PREPROCESSING,
        "recipe": "https://github.com/pytorch/vision/pull/116",
        "license": "BSD-3-Clause",
        "docs": "torchvision's IMAGENET1K_V1 weights, ported from LuaTorch (torchvision.models.densenet).",
    }


# The built-in manifest, as data (values copied from torchvision/models/densenet.py, 0.29).
# weights/manifest.json is this dict written out (:func:`manifest_json`); a test
# keeps the two identical.
# torchvision's IMAGENET1K_V1 files: (filename, acc@1, acc@5, parameters, GFLOPS, file MB).
_TORCHVISION_FILES = {
    "densenet121": ("densenet121-a639ec97.pth", 74.434, 91.972, 7978856, 2.834, 30.845),
    "densenet161": ("densenet161-8d451a50.pth", 77.138, 93.560, 28681000, 7.728, 110.369),
    "densenet169": ("densenet169-b2777c0a.pth", 75.600, 92.806, 14149480, 3.36, 54.708),
    "densenet201": ("densenet201-c1103571.pth", 76.896, 93.370, 20013928, 4.291, 77.373),
}
_BUILTIN: dict[str, Any] = {
    "format": MANIFEST_FORMAT,
    "architectures": {
        **{
            arch: {"default": "IMAGENET1K_V1", "weights": {"IMAGENET1K_V1": _torchvision_imagenet(*row)}}
            for arch, row in _TORCHVISION_FILES.items()
        },
        "densenet_bc_100": {"default": None, "weights": {}},
    },
}

_TV_ENUM_NAME = re.compile(r"^DenseNet(\d+)_Weights$")
_TRAIN_HINT = (
    "train them with `densenet-efficient train` (see `densenet-efficient train --help`) and load the "
    "result with densenet_efficient.from_pretrained(<folder>), or build the model without weights"
)


class WeightsNotAvailableError(UsageError):
    """Pretrained weights were asked for an architecture that has none published."""


# -- the manifest -----------------------------------------------------------------------------------


def builtin_manifest() -> dict[str, Any]:
    """The manifest shipped with the package (a deep copy; the source of ``weights/manifest.json``)."""
    return copy.deepcopy(_BUILTIN)


def manifest() -> dict[str, Any]:
    """The effective manifest: the built-in one, with ``$DENSENET_EFFICIENT_WEIGHTS_MANIFEST`` applied."""
    data = builtin_manifest()
    base = os.environ.get(URL_BASE_ENV)
    if base:  # every lookup reads the manifest first: a mirror urllib cannot fetch is refused here
        check_url(base, URL_BASE_ENV)
    path = os.environ.get(MANIFEST_ENV)
    if path:
        extra = _read_manifest(Path(path))
        for arch, entry in extra["architectures"].items():
            base = data["architectures"].setdefault(arch, {"default": None, "weights": {}})
            base["weights"].update(entry.get("weights", {}))
            if "default" in entry:
                base["default"] = entry["default"]
    return data


def _read_manifest(path: Path) -> dict[str, Any]:
    """The manifest ``$DENSENET_EFFICIENT_WEIGHTS_MANIFEST`` names, every entry type-checked
    (:func:`_check_entry`): a file users write by hand is refused naming the field and the value,
    never a ``KeyError`` or ``int("ten")`` deep in a download."""
    try:  # one reader of edited JSON: a FIFO, non-UTF-8, nesting past the parser are one sentence
        data = read_json_object(path, f"{MANIFEST_ENV}={path}")
    except FileNotFoundError:
        raise FileNotFoundError(f"{MANIFEST_ENV} points at {path}, which does not exist") from None
    if data.get("format") != MANIFEST_FORMAT:
        raise UsageError(
            f"{path}: expected a weights manifest with format {MANIFEST_FORMAT!r}, found {shown(data.get('format'))}"
        )
    if not isinstance(data.get("architectures"), dict):
        raise UsageError(f"{path}: expected an 'architectures' object mapping names to weights")
    for arch, entry in data["architectures"].items():
        where = f"{path}: architectures.{arch}"
        if not isinstance(entry, dict):
            raise UsageError(f"{where} must be an object with 'weights' (and 'default'), found {shown(entry)}")
        weights = entry.get("weights", {})
        if not isinstance(weights, dict):
            raise UsageError(f"{where}.weights must be an object mapping names to entries, found {shown(weights)}")
        if "default" in entry and entry["default"] is not None and not isinstance(entry["default"], str):
            raise UsageError(f"{where}.default must be a weights name or null, found {shown(entry['default'])}")
        for name, spec in weights.items():
            _check_entry(spec, f"{where}.weights.{name}")
    return data


def _check_entry(spec: Any, where: str) -> None:
    """Refuse a manifest entry whose fields are of the wrong type or range, naming field and value."""
    if not isinstance(spec, dict):
        raise UsageError(f"{where} must be an object with 'url' and 'num_classes', found {shown(spec)}")
    for key in ("url", "num_classes"):
        if key not in spec:
            raise UsageError(f"{where} has no {key!r}")
    if not isinstance(spec["url"], str):
        raise UsageError(f"{where}.url must be a string, found {shown(spec['url'])}")
    check_url(spec["url"], f"{where}.url")
    check_int(spec["num_classes"], f"{where}.num_classes")
    size = spec.get("file_size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, (int, float)) or not 0 < size < 2**40):
        raise UsageError(f"{where}.file_size must be a positive number of MiB, found {shown(size)}")
    pre = spec.get("preprocessing")
    if pre is not None:
        if not isinstance(pre, dict):
            raise UsageError(f"{where}.preprocessing must be an object, found {shown(pre)}")
        for key in ("crop_size", "resize_size"):
            check_int(pre.get(key), f"{where}.preprocessing.{key}")
        for key in ("mean", "std"):
            value = pre.get(key)
            if not (isinstance(value, list) and len(value) in (1, 3)
                    and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)):  # fmt: skip
                raise UsageError(f"{where}.preprocessing.{key} must be a list of 3 numbers, found {shown(value)}")
        modes = {"nearest", "bilinear", "bicubic", "box", "hamming", "lanczos"}
        if pre.get("interpolation") not in modes:
            raise UsageError(
                f"{where}.preprocessing.interpolation must be one of {', '.join(sorted(modes))}, "
                f"found {shown(pre.get('interpolation'))}"
            )
    categories = spec.get("categories")
    if categories is not None and not (
        isinstance(categories, str) or (isinstance(categories, list) and all(isinstance(c, str) for c in categories))
    ):
        raise UsageError(f"{where}.categories must be a category set name or a list of names, found {shown(categories)}")


@dataclass(frozen=True)
class WeightsSpec:
    """One published weights file: where it is, what it fits, and how its inputs were prepared.

    ``meta`` holds ``acc@1``/``acc@5`` (ImageNet-1K, %), ``num_params``, ``GFLOPS``, ``file_size``
    (MB), ``categories`` (class names), ``min_size``, ``preprocessing``, ``recipe``, ``license``.
    """

    arch: str
    name: str
    url: str
    num_classes: int
    data: Mapping[str, Any] = field(repr=False, compare=False)

    def __str__(self) -> str:
        return f"{self.arch}.{self.name}"

    @property
    def filename(self) -> str:
        return url_filename(self.url)

    @property
    def sha256_prefix(self) -> str:
        """The sha256 prefix carried by the file name (``densenet121-a639ec97.pth`` -> ``a639ec97``)."""
        return hash_prefix(self.filename)

    @property
    def meta(self) -> dict[str, Any]:
        """Metadata (a fresh dict each call, so callers cannot alter the manifest)."""
        meta = {k: copy.deepcopy(v) for k, v in self.data.items() if k not in ("url", "num_classes")}
        if isinstance(meta.get("categories"), str):
            meta["categories"] = list(_categories(meta["categories"]))
        if "min_size" in meta:
            meta["min_size"] = tuple(meta["min_size"])
        return meta

    def transforms(self) -> nn.Module:
        """The preprocessing these weights expect (torchvision's ``ImageClassification`` preset).

        >>> preprocess = get_weights("densenet121").transforms()

            batch = preprocess(image).unsqueeze(0)           # PIL image or uint8 tensor
        """
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms._presets import ImageClassification

        p = self.data["preprocessing"]
        return ImageClassification(
            crop_size=p["crop_size"],
            resize_size=p["resize_size"],
            mean=tuple(p["mean"]),
            std=tuple(p["std"]),
            interpolation=InterpolationMode(p["interpolation"]),
            antialias=p.get("antialias", True),
        )

    @property
    def max_bytes(self) -> int | None:
        """The most bytes a download of this file may take: the manifest's ``file_size`` (MiB, as
        torchvision rounds it to 3 decimals) and 1%; None when the manifest gives no size."""
        size = self.data.get("file_size")
        if isinstance(size, bool) or not isinstance(size, (int, float)) or not 0 < size < 2**40:
            return None
        return math.ceil(size * 2**20 * 1.01) + _CHUNK_SLACK

    def get_state_dict(self, progress: bool = True, model_dir: str | os.PathLike | None = None) -> dict:
        """Download (or reuse the verified cached copy of) this file; keys remapped to the current layout.
        A server sending more than :attr:`max_bytes`, or dripping, is cut off (nothing cached)."""
        return remap_keys(
            fetch_state_dict(self.url, self.filename, model_dir=model_dir, progress=progress, max_bytes=self.max_bytes)
        )


@cache
def _categories(name: str) -> tuple[str, ...]:
    if name == "imagenet-1k":
        # torchvision ships the 1000 ImageNet class names with its weights metadata.
        from torchvision.models import DenseNet121_Weights

        return tuple(DenseNet121_Weights.IMAGENET1K_V1.meta["categories"])
    raise UsageError(f"unknown category set {name!r}; expected 'imagenet-1k' or an explicit list of names")


def _spec(arch: str, name: str, data: Mapping[str, Any]) -> WeightsSpec:
    for key in ("url", "num_classes"):
        if key not in data:
            raise UsageError(f"weights entry {arch}.{name} has no {key!r}")
    filename = url_filename(data["url"])
    if not hash_prefix(filename):
        raise UsageError(
            f"weights entry {arch}.{name}: file name {filename!r} carries no sha256 prefix; "
            "manifest files must be named <name>-<first 8+ hex digits of sha256>.pth"
        )
    url = data["url"]
    base = os.environ.get(URL_BASE_ENV)
    if base:  # checked by manifest(), which every lookup reads first
        url = base.rstrip("/") + "/" + filename
    return WeightsSpec(arch, name, url, int(data["num_classes"]), dict(data))


def list_weights(arch: str | None = None) -> list[str]:
    """Qualified names of the published weights (``"densenet121.IMAGENET1K_V1"``), optionally for one arch."""
    archs = manifest()["architectures"]
    if arch is not None:
        archs = {arch: archs.get(arch, {"weights": {}})}
    return sorted(f"{a}.{n}" for a, entry in archs.items() for n in entry["weights"])


def get_weights(arch: str, name: str = "DEFAULT") -> WeightsSpec:
    """The manifest entry ``arch``/``name`` (``"DEFAULT"`` is the architecture's recommended weights).

    >>> get_weights("densenet161", "IMAGENET1K_V1").filename
    'densenet161-8d451a50.pth'
    """
    archs = manifest()["architectures"]
    if arch not in archs:
        if arch in ARCHITECTURES:
            raise WeightsNotAvailableError(
                f"no pretrained weights are published for {arch} yet; {_TRAIN_HINT}"
            )
        raise UsageError(
            f"unknown architecture {arch!r} for pretrained weights; expected one of {', '.join(sorted(archs))}"
        )
    entry = archs[arch]
    if not entry["weights"]:
        raise WeightsNotAvailableError(f"no pretrained weights are published for {arch} yet; {_TRAIN_HINT}")
    wanted = entry.get("default") if name == "DEFAULT" else name
    if wanted not in entry["weights"]:
        if name == "DEFAULT":  # the manifest's own default names nothing: say so, not "DEFAULT"
            raise UsageError(
                f"the default weights of {arch} in {os.environ.get(MANIFEST_ENV) or 'the manifest'} are "
                f"{shown(wanted)}, which it does not hold; expected one of {', '.join(sorted(entry['weights']))}"
            )
        raise UsageError(
            f"unknown weights {name!r} for {arch}; expected one of DEFAULT, {', '.join(sorted(entry['weights']))}"
        )
    return _spec(arch, wanted, entry["weights"][wanted])


# -- torchvision-style enums --------------------------------------------------------------------------
#
# The enums subclass torchvision's ``WeightsEnum``, and importing anything of torchvision runs its
# package ``__init__``, which imports its whole model zoo and ``torchvision.ops`` (and with it
# ``torch._dynamo``): about as long as importing torch. So they are made on first use (PEP 562
# ``__getattr__`` below, or :func:`weights_enum`), not when this package is imported; the
# builders' signatures name them the same way (``builders._WeightsSignature``).

if TYPE_CHECKING:  # bound by _make_enums on first use
    WeightsEnum: type[Enum]
    DenseNet121_Weights: type[Enum]
    DenseNet161_Weights: type[Enum]
    DenseNet169_Weights: type[Enum]
    DenseNet201_Weights: type[Enum]

#: the enum names this module makes on first use
LAZY_ENUMS = (
    "WeightsEnum",
    "DenseNet121_Weights",
    "DenseNet161_Weights",
    "DenseNet169_Weights",
    "DenseNet201_Weights",
)
#: architecture -> the name of its enum
_ENUM_NAMES = {
    "densenet121": "DenseNet121_Weights",
    "densenet161": "DenseNet161_Weights",
    "densenet169": "DenseNet169_Weights",
    "densenet201": "DenseNet201_Weights",
}
#: enum class name -> architecture (an Enum class cannot carry extra attributes of its own)
_ENUM_ARCH: dict[str, str] = {name: arch for arch, name in _ENUM_NAMES.items()}
#: architecture -> its enum, filled by :func:`_make_enums`
_ENUMS: dict[str, type[Enum]] = {}


@cache
def _make_enums() -> dict[str, type]:
    """Make ``WeightsEnum`` and each architecture's enum once (importing torchvision), and bind them
    as this module's attributes; returns them by name."""
    from torchvision.models import Weights
    from torchvision.models import WeightsEnum as TorchvisionWeightsEnum

    class WeightsEnum(TorchvisionWeightsEnum):
        """torchvision-style enum of one architecture's weights (a subclass of torchvision's
        ``WeightsEnum``, so ``torchvision.models.get_model_weights`` and torchvision's helpers accept
        it); members act like their :class:`WeightsSpec`, read from the manifest on every access.

        >>> from densenet_efficient.models.weights import DenseNet121_Weights
        >>> DenseNet121_Weights.DEFAULT is DenseNet121_Weights.IMAGENET1K_V1
        True
        >>> DenseNet121_Weights.IMAGENET1K_V1.meta["acc@5"]
        91.972
        """

        @property
        def spec(self) -> WeightsSpec:
            return get_weights(_ENUM_ARCH[type(self).__name__], self.name)

        @property
        def url(self) -> str:
            return self.spec.url

        @property
        def meta(self) -> dict[str, Any]:
            return self.spec.meta

        @property
        def num_classes(self) -> int:
            return self.spec.num_classes

        def transforms(self) -> nn.Module:
            return self.spec.transforms()

        def get_state_dict(self, progress: bool = True, model_dir: str | os.PathLike | None = None) -> dict:
            return self.spec.get_state_dict(progress=progress, model_dir=model_dir)

        def __str__(self) -> str:
            return f"{type(self).__name__}.{self.name}"

        def __reduce_ex__(self, protocol: int) -> tuple[Any, ...]:
            # by name: the member's value holds callables, and the manifest may change between processes
            return getattr, (type(self), self.name)

    WeightsEnum.__qualname__ = WeightsEnum.__name__  # made here, but importable from this module by name
    made: dict[str, type] = {"WeightsEnum": WeightsEnum}
    for arch, cls_name in _ENUM_NAMES.items():
        entry = _BUILTIN["architectures"][arch]
        members = []
        for name, data in entry["weights"].items():
            spec = _spec(arch, name, data)
            # torchvision's own member value type; the properties above read the manifest instead
            members.append((name, Weights(url=data["url"], transforms=spec.transforms, meta=spec.meta)))
        default = dict(members)[entry["default"]]
        members.append(("DEFAULT", default))  # the same value: an alias, as in torchvision
        _ENUMS[arch] = made[cls_name] = WeightsEnum(cls_name, members, module=__name__, qualname=cls_name)
    globals().update(made)  # later lookups are plain attribute reads
    return made


def __getattr__(name: str) -> Any:
    """``DenseNet121_Weights`` and the other enums, made on first use (PEP 562)."""
    if name in LAZY_ENUMS:
        return _make_enums()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def weights_enum(arch: str) -> type[Enum] | None:
    """The weights enum of a named architecture (``DenseNet121_Weights``), or None if it has none."""
    return _make_enums().get(_ENUM_NAMES[arch]) if arch in _ENUM_NAMES else None


def pretrained_cfg(spec: WeightsSpec) -> dict[str, Any]:
    """timm's ``pretrained_cfg`` fields for published weights (preprocessing, licence, origin)."""
    data = spec.data
    cfg: dict[str, Any] = {"architecture": spec.arch, "num_classes": spec.num_classes, "origin_url": spec.url}
    p = data.get("preprocessing")
    if p:
        cfg.update(
            interpolation=p["interpolation"],
            crop_pct=round(p["crop_size"] / p["resize_size"], 4),
            mean=tuple(p["mean"]),
            std=tuple(p["std"]),
        )
    if data.get("license"):
        cfg["license"] = str(data["license"]).lower()
    if data.get("docs"):
        cfg["description"] = data["docs"]
    cfg["tag"] = spec.name.lower()
    return cfg


# -- resolving the builders' ``weights=`` / ``pretrained=`` --------------------------------------------


def resolve_weights(arch: str | None, weights: Any, pretrained: bool) -> WeightsSpec | None:
    """The weights a builder was asked for, or None for a randomly initialised model.

    ``weights`` may be a :class:`WeightsSpec`, one of this package's ``DenseNetXXX_Weights``
    members, torchvision's ``DenseNetXXX_Weights`` members (the files are the same), or a name:
    ``"DEFAULT"``, ``"IMAGENET1K_V1"``, ``"DenseNet121_Weights.IMAGENET1K_V1"``,
    ``"densenet121.IMAGENET1K_V1"``. ``pretrained=True`` means ``weights="DEFAULT"``. ``arch`` is
    None for models built from a bare config (``densenet_bc(depth)``), which have no weights.
    """
    if not isinstance(pretrained, bool):
        raise TypeError(f"pretrained must be True or False, got {pretrained!r}")
    if isinstance(weights, bool):
        raise TypeError(
            f"weights must be a weights name or enum member, got {weights!r}; use pretrained=True"
        )
    if weights is None and not pretrained:
        return None
    if weights is None:
        weights = "DEFAULT"
    if arch is None:
        raise WeightsNotAvailableError(
            f"no pretrained weights are published for custom DenseNet-BC configurations; {_TRAIN_HINT}"
        )
    spec = _coerce(arch, weights)
    if spec.arch != arch:
        raise UsageError(f"weights {spec} are for {spec.arch}, not {arch}; use {spec.arch}(weights=...)")
    return spec


def _coerce(arch: str, weights: Any) -> WeightsSpec:
    if isinstance(weights, WeightsSpec):
        return weights
    if isinstance(weights, Enum) and type(weights) in _ENUMS.values():  # ours (made, since one exists)
        return weights.spec
    if isinstance(weights, Enum) and type(weights).__module__.startswith("torchvision"):
        return _from_torchvision(weights)
    if isinstance(weights, str):
        owner, dot, name = weights.rpartition(".")
        if not dot:
            return get_weights(arch, weights)
        m = _TV_ENUM_NAME.match(owner)
        owner_arch = f"densenet{m.group(1)}" if m else owner
        if owner_arch not in ARCHITECTURES:
            raise UsageError(
                f"weights {weights!r} name no DenseNet architecture; expected e.g. "
                f"'IMAGENET1K_V1', 'DenseNet121_Weights.IMAGENET1K_V1' or 'densenet121.IMAGENET1K_V1'"
            )
        return get_weights(owner_arch, name)
    raise TypeError(
        f"weights must be a name such as 'IMAGENET1K_V1', a DenseNet*_Weights member or a WeightsSpec, "
        f"got {type(weights).__name__}"
    )


def _from_torchvision(member: Enum) -> WeightsSpec:
    """Map a torchvision ``DenseNetXXX_Weights`` member onto the manifest (same files)."""
    m = _TV_ENUM_NAME.match(type(member).__name__)
    if not m:
        raise UsageError(f"{type(member).__name__}.{member.name} are not DenseNet weights")
    arch = f"densenet{m.group(1)}"
    known = manifest()["architectures"].get(arch, {"weights": {}})["weights"]
    if member.name in known:
        return get_weights(arch, member.name)
    # Weights torchvision published after this manifest was written: take torchvision's metadata.
    w = member.value
    data = {
        "url": w.url,
        "num_classes": len(w.meta["categories"]),
        "categories": list(w.meta["categories"]),
        "min_size": list(w.meta.get("min_size", (29, 29))),
        "num_params": w.meta.get("num_params"),
        "docs": f"torchvision's {type(member).__name__}.{member.name}",
    }
    return _spec(arch, member.name, data)


# -- download and loading -------------------------------------------------------------------------


def load_state_dict_from_manifest(
    arch: str,
    progress: bool = True,
    model_dir: str | os.PathLike | None = None,
    *,
    name: str = "DEFAULT",
) -> dict[str, torch.Tensor]:
    """Download ``arch``'s manifest weights (hash-checked, ``weights_only``) and return the remapped state_dict.

    ``model_dir`` defaults to torch.hub's cache (``$TORCH_HOME/hub/checkpoints``).

        sd = load_state_dict_from_manifest("densenet121")     # downloads 31 MB
        sd["features.denseblock1.denselayer1.norm1.weight"].shape
        # torch.Size([64])
    """
    return get_weights(arch, name).get_state_dict(progress=progress, model_dir=model_dir)


def load_weights(model: nn.Module, spec: WeightsSpec, progress: bool = True) -> None:
    """Fetch ``spec`` and load it into ``model`` (see :func:`~densenet_efficient.io.state_dict.load_state_dict_into`)."""
    load_state_dict_into(model, spec.get_state_dict(progress=progress), source=f"weights {spec}")


def manifest_json() -> str:
    """The built-in manifest as the text of ``weights/manifest.json``.

    Regenerate the file with::

        python -c "import densenet_efficient.models.weights as w; print(w.manifest_json(), end='')" > weights/manifest.json
    """
    return json.dumps(builtin_manifest(), indent=2) + "\n"
