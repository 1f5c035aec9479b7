"""Convert any DenseNet checkpoint into a verified, Hugging Face Hub-ready folder.

Reads torchvision ``.pth`` files (old ``norm.1`` and current key styles, legacy and zip serialization),
timm checkpoints (``.pth`` or safetensors), efficient_densenet_pytorch checkpoints (``norm_final``,
CIFAR stem, ``module.`` prefixes) and training checkpoints that wrap the weights; infers the
architecture from the tensor shapes; writes ``model.safetensors`` + ``config.json`` + a model card
with provenance through :func:`densenet_efficient.hub.save_hub_folder`; and checks that the folder,
loaded back, computes what the source model computes.

Library::

    >>> import densenet_efficient as de
    >>> result = de.convert("densenet121-a639ec97.pth", "out/densenet121")   # doctest: +SKIP
    >>> result.config.growth_rate, result.max_abs_diff                         # doctest: +SKIP
    (32, 0.0)

Command line::

    densenet-efficient convert densenet121 out/densenet121          # torchvision's file, hash-checked
    densenet-efficient convert ckpt.pth.tar out/bc100 --checkpoint-key state_dict_ema
    densenet-efficient convert --all-torchvision out/
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .checkpoint import Checkpoint, CheckpointError, read_checkpoint
from .models import DenseNet
from .reference import torchvision_densenet
from .registry import ARCHITECTURES, ArchConfig, get_config
from .state_dict import (
    StateDictMismatchError,
    check_compatible,
    fill_legacy_batch_counters,
    legacy_key_styles,
    remap_keys,
)

__all__ = [
    "ConversionError",
    "ConvertResult",
    "TOLERANCE",
    "convert",
    "convert_all_torchvision",
    "infer_config",
    "normalize_keys",
]

#: Largest max-abs output difference between source and converted model that passes verification.
TOLERANCE = 1e-5

_LAYER_KEY = re.compile(r"^features\.denseblock(\d+)\.denselayer(\d+)\.")
_BLOCK_KEY = re.compile(r"^features\.denseblock(\d+)\.")
_TRANSITION_KEY = re.compile(r"^features\.transition(\d+)\.conv\.weight$")
# torch.hub/torchvision convention: "name-<sha256 prefix>.ext" carries the first hex digits of the hash.
# Stricter than torch.hub.HASH_REGEX (8+ digits, right before the extension): user URLs often carry
# other dashes ("run-3.pth") that are not hashes.
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$")
# weights files of a Hub repo folder, in the order timm's loader prefers them
_FOLDER_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


class ConversionError(CheckpointError):
    """The checkpoint cannot be converted (not a DenseNet, inconsistent shapes, failed verification...)."""


@dataclass(frozen=True)
class ConvertResult:
    """What :func:`convert` wrote and how it checked it.

    Attributes:
        out_dir: the folder written (``model.safetensors``, ``config.json``, ``README.md``).
        config: the architecture inferred from the tensors.
        arch: the registry name the config matches (``"densenet121"``), or None for other shapes.
        source: the SRC given (path, URL or registry name).
        source_file: name of the file read.
        sha256: sha256 of that file.
        source_format: container and key style in words.
        reference: the model the converted one was compared with, or None when not verified.
        max_abs_diff: max abs difference of the outputs (None when not verified).
        input_shape: the shape of the verification batch (None when not verified).
    """

    out_dir: Path
    config: ArchConfig
    arch: str | None
    source: str
    source_file: str
    sha256: str
    source_format: str
    reference: str | None
    max_abs_diff: float | None
    input_shape: tuple[int, ...] | None = None
    provenance: dict[str, Any] = field(default_factory=dict, compare=False)

    def summary(self) -> str:
        """Two human lines: what was converted to where, and the verification result."""
        name = self.arch or _describe(self.config)
        check = (
            f"verified against {self.reference}: max abs diff {self.max_abs_diff:.3g} "
            f"on a {'x'.join(map(str, self.input_shape or ()))} batch (tolerance {TOLERANCE:g})"
            if self.max_abs_diff is not None
            else "verification skipped (--no-verify)"
        )
        return f"{self.source_file} ({self.source_format}) -> {self.out_dir} [{name}]\n  {check}"


# -- key normalisation and architecture inference --------------------------------------------------


def normalize_keys(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """Map a DenseNet state dict's keys to torchvision's layout.

    Applies :func:`~densenet_efficient.state_dict.remap_keys` (old ``norm.1`` keys, ``norm_final``,
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

    >>> from densenet_efficient import densenet_bc, infer_config
    >>> infer_config(densenet_bc(40, growth_rate=24).state_dict())
    ArchConfig(growth_rate=24, block_config=(6, 6, 6), num_init_features=48, bn_size=4, num_classes=10, small_inputs=True)

    Raises:
        ConversionError: not a DenseNet, an unsupported variant, or tensors that contradict each other.
    """
    sd, _ = normalize_keys(state_dict)
    if not any(_LAYER_KEY.match(k) for k in sd):
        raise _not_densenet(sd)

    # stem
    conv0 = _shape(sd, "features.conv0.weight")
    if len(conv0) != 4:
        raise ConversionError(
            f"features.conv0.weight should be a 4-D convolution kernel, found shape {conv0}"
        )
    if conv0[1] != 3:
        raise ConversionError(
            f"this package's DenseNets take 3 input channels, the checkpoint's conv0 takes {conv0[1]}"
        )
    if any(k.startswith(("features.conv1.", "features.conv2.")) for k in sd):
        raise ConversionError(
            "the checkpoint has a deep stem (features.conv1/conv2 before the first dense block, as timm's "
            "densenet121d/densenetblur121d/densenet264d); only torchvision's single-conv stem is supported"
        )
    has_norm0 = "features.norm0.weight" in sd
    if conv0[2:] == (7, 7) and has_norm0:
        small_inputs = False
    elif conv0[2:] == (3, 3) and not has_norm0:
        small_inputs = True
    else:
        raise ConversionError(
            f"unsupported stem: a {conv0[2]}x{conv0[3]} conv0 {'with' if has_norm0 else 'without'} norm0 "
            "(supported: torchvision's 7x7 conv0 + norm0 + max-pool, or the CIFAR 3x3 conv0 alone)"
        )
    num_init_features = conv0[0]

    # blocks and layers
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
    bn_size = width // growth_rate

    # DenseNet-BC transitions halve the channels; other compressions build a different model
    features = num_init_features
    for b, n in enumerate(block_config[:-1], start=1):
        features += n * growth_rate
        shape = _shape(sd, f"features.transition{b}.conv.weight")
        if shape[:2] != (features // 2, features):
            raise ConversionError(
                f"features.transition{b}.conv should map {features} channels to {features // 2} "
                f"(compression 0.5, as in torchvision's DenseNet-BC) but has shape {shape}"
            )
        features //= 2

    classifier = _shape(sd, "classifier.weight")
    config = ArchConfig(
        growth_rate=growth_rate,
        block_config=tuple(block_config),
        num_init_features=num_init_features,
        bn_size=bn_size,
        num_classes=classifier[0],
        small_inputs=small_inputs,
    )
    # every other tensor must fit the model these numbers describe (a meta model costs no memory)
    with torch.device("meta"):
        model = DenseNet(**config.to_kwargs())
    try:
        check_compatible(model, fill_legacy_batch_counters(dict(sd), model))
    except StateDictMismatchError as err:
        raise ConversionError(f"the checkpoint's tensors are inconsistent: {err}") from None
    return config


def _describe(config: ArchConfig) -> str:
    return (
        f"DenseNet(k={config.growth_rate}, blocks={tuple(config.block_config)}, "
        f"init={config.num_init_features}, bn_size={config.bn_size}, classes={config.num_classes}, "
        f"{'CIFAR' if config.small_inputs else 'ImageNet'} stem)"
    )


def _check_against(config: ArchConfig, arch: str | None, num_classes: int | None) -> None:
    """Refuse a --arch/--num-classes that contradicts the tensors, naming each disagreement."""
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


# -- sources ---------------------------------------------------------------------------------------


def _download(url: str, workdir: Path, progress: bool) -> Path:
    """Fetch a URL into ``workdir``; a torchvision-style ``name-<hex>.pth`` is hash-checked."""
    name = os.path.basename(urllib.parse.urlparse(url).path) or "checkpoint"
    dst = workdir / name
    m = _HASH_IN_NAME.search(name)
    try:
        torch.hub.download_url_to_file(
            url, str(dst), hash_prefix=m.group(1) if m else None, progress=progress
        )
    except urllib.error.URLError as err:
        raise ConversionError(f"cannot download {url}: {getattr(err, 'reason', err)}") from None
    except RuntimeError as err:  # torch.hub's hash mismatch
        raise ConversionError(
            f"download of {url} failed its integrity check: {err}; by torch.hub's convention its name "
            f"ends in the first hex digits of its sha256 ({m.group(1)}); if that part of the name is not "
            "a hash, download the file yourself and pass its path"
        ) from None
    return dst


def _registry_file(arch: str, progress: bool, model_dir: str | None) -> Path:
    """The published checkpoint of a registered architecture, downloaded with the hash check."""
    from . import weights

    spec = weights.get_weights(arch)  # no published weights (densenet_bc_100): a clear ValueError
    # downloads into the cache (or re-hashes the cached copy) and checks the sha256 prefix
    weights.load_state_dict_from_registry(arch, progress=progress, model_dir=model_dir)
    cache = Path(model_dir) if model_dir is not None else Path(torch.hub.get_dir()) / "checkpoints"
    path = cache / spec.filename
    if not path.is_file():
        raise ConversionError(f"{arch}: the registry download did not leave {path} in the cache")
    return path


def _fetch(src: str | os.PathLike, workdir: Path, progress: bool, model_dir: str | None) -> Path:
    text = os.fspath(src)
    if re.match(r"^https?://", text):
        return _download(text, workdir, progress)
    path = Path(text)
    if path.is_dir():
        # a downloaded Hub repo (timm's densenet121.tv_in1k snapshot, say): take its weights file
        for name in _FOLDER_WEIGHTS:
            if (path / name).is_file():
                return path / name
        raise IsADirectoryError(
            f"{path} is a folder without {' or '.join(_FOLDER_WEIGHTS)}; SRC must be a checkpoint file, "
            "a Hub-style folder, an http(s) URL or a registry name"
        )
    if path.exists():
        return path
    if text in ARCHITECTURES:
        return _registry_file(text, progress, model_dir)
    raise FileNotFoundError(
        f"{text!r} is not a file, an http(s) URL or a registry name ({', '.join(sorted(ARCHITECTURES))})"
    )


def _source_format(ckpt: Checkpoint, prefix: str) -> str:
    container = {
        "torch-zip": "torch zip .pth",
        "torch-legacy": "torch legacy-serialization .pth",
        "safetensors": "safetensors",
    }[ckpt.container]
    parts = [container]
    if ckpt.wrapper_key:
        parts.append(f"weights under '{ckpt.wrapper_key}'")
    styles = legacy_key_styles(ckpt.state_dict)
    if prefix:
        styles.append(f"'{prefix}' prefix")
    parts.append(", ".join(styles) if styles else "torchvision key layout")
    return "; ".join(parts)


def _torchvision_loadable(ckpt: Checkpoint, prefix: str) -> bool:
    """A plain torch file that torchvision's own loader reads: the source model is torchvision's."""
    styles = legacy_key_styles(ckpt.state_dict)
    return (
        ckpt.container != "safetensors"
        and ckpt.wrapper_key is None
        and not prefix
        and all(s.startswith("legacy torchvision") for s in styles)
    )


# -- verification ----------------------------------------------------------------------------------


def _uninitialised(build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` on CPU without running its weight init, for a loader that overwrites every tensor.

    Kaiming-initialising a densenet161 only to overwrite it costs about a second per model.
    """
    with torch.device("meta"):
        model = build()
    return model.to_empty(device="cpu")


def _assigned(build: Callable[[], nn.Module], state_dict: Mapping[str, Any]) -> nn.Module:
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


def _torchvision_densenet(config: ArchConfig) -> nn.Module:
    """torchvision's DenseNet for ``config``; CIFAR configs get the 3x3 stem with no norm0/pool0."""
    return _uninitialised(lambda: torchvision_densenet(config))


class _GivenWeights:
    """Stands in for a torchvision ``WeightsEnum`` member so torchvision's own loader reads our tensors."""

    def __init__(self, state_dict: Mapping[str, Any]) -> None:
        self._state_dict = state_dict

    def get_state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return OrderedDict(self._state_dict)


def _reference(
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
            return _assigned(lambda: torchvision_densenet(config), mapped), "torchvision.models.DenseNet"
    return _assigned(
        lambda: _our_model(config), mapped
    ), "densenet_efficient.DenseNet (naive path) on the source tensors mapped by name"


def _our_model(config: ArchConfig) -> DenseNet:
    return DenseNet(**config.to_kwargs(), memory_efficient=False)


def _verification_batch(model: DenseNet) -> torch.Tensor:
    # Large enough that every block sees a real feature map (not 1x1), small enough to be quick.
    size = max(model.min_input_size(), 32 if model.arch_config.small_inputs else 64)
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


# -- the conversion --------------------------------------------------------------------------------


def convert(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    arch: str | None = None,
    num_classes: int | None = None,
    verify: bool = True,
    checkpoint_key: str | None = None,
    progress: bool = True,
    model_dir: str | None = None,
) -> ConvertResult:
    """Convert a DenseNet checkpoint into a Hugging Face Hub-ready folder, verified by default.

    Args:
        src: a checkpoint file (torch ``.pth``/``.pth.tar`` or ``.safetensors``), a Hub repo folder
            holding ``model.safetensors`` or ``pytorch_model.bin`` (a timm snapshot), an http(s) URL
            (a torchvision-style ``name-<sha256 prefix>.pth`` is hash-checked) or a registry name
            such as ``"densenet121"`` (torchvision's file, hash-checked).
        out_dir: the folder to create; it must not exist. Written in a temporary sibling and
            renamed into place, so an error leaves nothing behind.
        arch: expected registry architecture; an error names each way the tensors disagree.
        num_classes: expected classifier width; an error if the tensors disagree.
        verify: compare source and converted models on one random batch (eval mode, float32) and
            fail above :data:`TOLERANCE` max abs difference.
        checkpoint_key: where the weights sit in a training checkpoint (``"state_dict_ema"``);
            default: the first of :data:`~densenet_efficient.checkpoint.WRAPPER_KEYS` found.
        progress: show download progress bars.
        model_dir: download cache for registry names (default: torch.hub's checkpoint dir).

    Returns:
        A :class:`ConvertResult` (``result.summary()`` prints well).

    Example::

        >>> result = convert("runs/bc100/checkpoint.pth.tar", "hub/densenet-bc-100")  # doctest: +SKIP
        >>> from_pretrained("hub/densenet-bc-100")                                      # doctest: +SKIP
    """
    from . import hub

    out_dir = Path(out_dir)
    if arch is not None:
        get_config(arch)  # unknown name: fail before any work
    if os.path.lexists(out_dir):
        raise FileExistsError(f"output folder {out_dir} already exists; remove it or choose another OUT_DIR")

    with tempfile.TemporaryDirectory(prefix="densenet-convert-") as downloads:
        path = _fetch(src, Path(downloads), progress, model_dir)
        ckpt = read_checkpoint(path, key=checkpoint_key)
        sd, prefix = normalize_keys(ckpt.state_dict)
        config = infer_config(sd)
        _check_against(config, arch, num_classes)
        source_format = _source_format(ckpt, prefix)
        torchvision_file = _torchvision_loadable(ckpt, prefix)

    # The converted model: the source tensors under torchvision's names, float32, with batch counters.
    model = _assigned(lambda: _our_model(config), sd).eval()

    reference = reference_name = max_diff = x = None
    if verify:
        try:
            reference, reference_name = _reference(config, ckpt.state_dict, sd, torchvision_file)
        except (RuntimeError, StateDictMismatchError) as err:
            raise ConversionError(
                f"verification failed: the source model cannot load the tensors ({err})"
            ) from None

    provenance: dict[str, Any] = {
        "source_file": path.name,
        "source_sha256": ckpt.sha256,
        "source_format": source_format,
        "converted_at": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "converted_with": f"densenet_efficient {_version()} (densenet-efficient convert)",
        "verification": "skipped (--no-verify)",
    }

    parent = out_dir.parent
    created = _make_parents(parent)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.convert-", dir=parent))
    try:
        folder = hub.save_hub_folder(model, staging / out_dir.name, provenance=provenance)
        if verify:
            # Verify the folder exactly as users will load it (config.json + model.safetensors), then
            # record the result in its model card, rendered by the hub.model_card save_hub_folder uses.
            loaded = hub.from_pretrained(folder, memory_efficient=False)
            x = _verification_batch(loaded)
            max_diff = (_outputs(reference, x) - _outputs(loaded, x)).abs().max().item()
            if not max_diff <= TOLERANCE:
                raise ConversionError(
                    f"verification failed: the converted model differs from {reference_name} by "
                    f"{max_diff:.3g} (max abs, tolerance {TOLERANCE:g}); nothing was written"
                )
            provenance["verification"] = (
                f"max abs diff {max_diff:.3g} vs {reference_name} on a {'x'.join(map(str, x.shape))} "
                f"float32 random batch, eval mode (tolerance {TOLERANCE:g})"
            )
            provenance["max_abs_diff"] = max_diff
            card = hub.model_card(model, provenance=provenance)
            (Path(folder) / hub.CARD_NAME).write_text(card, encoding="utf-8")
        if os.path.lexists(out_dir):
            raise FileExistsError(f"output folder {out_dir} appeared during the conversion; not replacing it")
        os.rename(folder, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for d in reversed(created):
            _rmdir_quiet(d)
        raise
    shutil.rmtree(staging, ignore_errors=True)

    return ConvertResult(
        out_dir=out_dir,
        config=config,
        arch=hub.architecture_name(config),
        source=os.fspath(src),
        source_file=path.name,
        sha256=ckpt.sha256,
        source_format=source_format,
        reference=reference_name,
        max_abs_diff=max_diff,
        input_shape=tuple(x.shape) if x is not None else None,
        provenance=provenance,
    )


def _version() -> str:
    from . import __version__

    return __version__


def _make_parents(parent: Path) -> list[Path]:
    """Create missing parent folders, returning those created (removed again if the conversion fails)."""
    missing = []
    p = parent.absolute()
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        d.mkdir()
    return list(reversed(missing))


def _rmdir_quiet(d: Path) -> None:
    with contextlib.suppress(OSError):  # not empty: someone else wrote there meanwhile; keep it
        d.rmdir()


def torchvision_architectures() -> list[str]:
    """The ImageNet architectures whose registry weights are torchvision's files."""
    from . import weights

    return [a for a, c in ARCHITECTURES.items() if not c.small_inputs and weights.list_weights(a)]


def convert_all_torchvision(
    out_root: str | os.PathLike, *, verify: bool = True, progress: bool = True, model_dir: str | None = None
) -> list[ConvertResult]:
    """Convert torchvision's four ImageNet DenseNet checkpoints to ``out_root/<arch>`` (hash-checked).

    Every target folder is checked before the first download, so an existing one stops the run
    before anything is written.
    """
    out_root = Path(out_root)
    archs = torchvision_architectures()
    existing = [str(out_root / a) for a in archs if os.path.lexists(out_root / a)]
    if existing:
        raise FileExistsError(
            f"output folders already exist: {', '.join(existing)}; remove them or choose another OUT_ROOT"
        )
    return [
        convert(a, out_root / a, arch=a, verify=verify, progress=progress, model_dir=model_dir) for a in archs
    ]


# -- command line ----------------------------------------------------------------------------------


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``densenet-efficient convert``."""
    parser.description = (
        "Convert a DenseNet checkpoint (torchvision, timm, efficient_densenet_pytorch or a training "
        "checkpoint; .pth or .safetensors; file, URL or registry name) into a verified Hugging Face "
        "Hub-ready folder (model.safetensors, config.json, model card)."
    )
    parser.add_argument(
        "src", nargs="?", metavar="SRC", help="checkpoint file, http(s) URL or registry name (densenet121)"
    )
    parser.add_argument("out_dir", nargs="?", metavar="OUT_DIR", help="folder to create (must not exist)")
    parser.add_argument(
        "--arch", choices=sorted(ARCHITECTURES), help="expected architecture; error if the tensors disagree"
    )
    parser.add_argument(
        "--num-classes", type=int, help="expected classifier width; error if the tensors disagree"
    )
    parser.add_argument(
        "--checkpoint-key",
        metavar="KEY",
        help="where the weights are in a training checkpoint, e.g. state_dict_ema or model/module",
    )
    parser.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip comparing outputs of source and converted model",
    )
    parser.add_argument(
        "--all-torchvision",
        metavar="OUT_ROOT",
        help="convert torchvision's four ImageNet checkpoints into OUT_ROOT/<arch>",
    )
    parser.add_argument("--model-dir", help="download cache (default: torch.hub's checkpoints folder)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``densenet-efficient convert``; user errors raise and exit with code 2."""
    from .cli import CLIError
    from .weights import WeightsIntegrityError

    progress = not args.quiet
    try:
        if args.all_torchvision is not None:
            if (
                args.src is not None
                or args.out_dir is not None
                or args.arch
                or args.num_classes
                or args.checkpoint_key
            ):
                raise CLIError(
                    "--all-torchvision OUT_ROOT takes no SRC/OUT_DIR/--arch/--num-classes/--checkpoint-key"
                )
            results = convert_all_torchvision(
                args.all_torchvision, verify=args.verify, progress=progress, model_dir=args.model_dir
            )
        else:
            if args.src is None or args.out_dir is None:
                raise CLIError("expected SRC and OUT_DIR (or --all-torchvision OUT_ROOT)")
            results = [
                convert(
                    args.src,
                    args.out_dir,
                    arch=args.arch,
                    num_classes=args.num_classes,
                    verify=args.verify,
                    checkpoint_key=args.checkpoint_key,
                    progress=progress,
                    model_dir=args.model_dir,
                )
            ]
    except (StateDictMismatchError, WeightsIntegrityError, OSError) as err:
        # RuntimeError/OSError subclasses the dispatcher does not map: a bad or unreachable input all the same
        raise CLIError(str(err)) from None
    for result in results:
        print(result.summary())
    return 0
